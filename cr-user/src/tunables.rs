//! The `CR_*` environment knobs, read once, here only (README lists them). They tune or force
//! things for tests, benchmarks and debugging; a dump or restore never needs one.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

/// How a tracked dump harvests (`CR_HARVEST`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Harvest {
    /// cr decides (the eBPF harvest unless something escaped it, or the dirty blocks cover
    /// most of the memory).
    #[default]
    Auto,
    /// `CR_HARVEST=ebpf`: the eBPF harvest whenever it is trustworthy, however many blocks.
    Ebpf,
    /// `CR_HARVEST=scan`: always the exact PAGEMAP_SCAN harvest.
    Scan,
}

/// Every knob.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tunables {
    /// `CR_PAGE_IO=direct`: page files are written with O_DIRECT (fast to write; the next
    /// restore then reads them from disk, not from the page cache).
    pub page_io_direct: bool,
    /// `CR_HARVEST=ebpf|scan`.
    pub harvest: Harvest,
    /// `CR_TRACKER_LOG=FILE`: the tracker process logs there (otherwise to /dev/null).
    pub tracker_log: Option<PathBuf>,
    /// `CR_TEST_DIRTY_MAX_ENTRIES=N`: a tracker started now sizes its dirty-page map to N
    /// entries (tests make it tiny to see a full map handled).
    pub dirty_max_entries: Option<u32>,
    /// `CR_TEST_FOLD_PAUSE=STEP`: a `cr periodic --keep` fold prints `FOLD STEP` and stops
    /// itself (SIGSTOP) at that step (written, committed, exchanged, renamed), so that a test
    /// can kill it there.
    pub fold_pause: Option<String>,
    /// `CR_TEST_PROGRESS_AFTER_MS=N`: the progress line on a terminal shows after N ms of
    /// work instead of a second (tests of the line use quick dumps).
    pub progress_after_ms: Option<u64>,
}

impl Tunables {
    /// The knobs in `var` (an environment).
    pub fn parse(var: impl Fn(&str) -> Option<OsString>) -> Tunables {
        let text = |k: &str| var(k).map(|v| v.to_string_lossy().into_owned());
        Tunables {
            page_io_direct: text("CR_PAGE_IO").as_deref() == Some("direct"),
            harvest: match text("CR_HARVEST").as_deref() {
                Some("ebpf") => Harvest::Ebpf,
                Some("scan") => Harvest::Scan,
                _ => Harvest::Auto,
            },
            tracker_log: var("CR_TRACKER_LOG").map(PathBuf::from),
            dirty_max_entries: text("CR_TEST_DIRTY_MAX_ENTRIES").and_then(|v| v.parse().ok()),
            fold_pause: text("CR_TEST_FOLD_PAUSE"),
            progress_after_ms: text("CR_TEST_PROGRESS_AFTER_MS").and_then(|v| v.parse().ok()),
        }
    }
}

/// The knobs of this process's environment, read at the first call.
pub fn get() -> &'static Tunables {
    static T: OnceLock<Tunables> = OnceLock::new();
    T.get_or_init(|| Tunables::parse(|k| std::env::var_os(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_knob() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(Tunables::parse(env(&[])), Tunables::default());
        let t = Tunables::parse(env(&[
            ("CR_PAGE_IO", "direct"),
            ("CR_HARVEST", "scan"),
            ("CR_TRACKER_LOG", "/tmp/t.log"),
            ("CR_TEST_DIRTY_MAX_ENTRIES", "64"),
        ]));
        assert!(t.page_io_direct);
        assert_eq!(t.harvest, Harvest::Scan);
        assert_eq!(t.tracker_log, Some(PathBuf::from("/tmp/t.log")));
        assert_eq!(t.dirty_max_entries, Some(64));
        let t = Tunables::parse(env(&[("CR_HARVEST", "ebpf"), ("CR_PAGE_IO", "cache")]));
        assert_eq!((t.harvest, t.page_io_direct), (Harvest::Ebpf, false));
    }
}
