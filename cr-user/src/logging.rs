//! cr's logger: CRIU-like lines (`(seconds.micros) LEVEL: message`) to stderr or to `-o FILE`.
//!
//! With `--log-pid`, messages logged while a task is "current" (see [`TaskScope`]) go to
//! `FILE.PID` instead of `FILE`, so each restored task has its own log.
//! aya-log records from the eBPF side arrive through the same logger.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    start: Instant,
    level: LevelFilter,
    path: Option<PathBuf>,
    per_pid: bool,
    main: Mutex<Option<File>>,
    pids: Mutex<HashMap<i32, File>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();
static CURRENT_TASK: AtomicI32 = AtomicI32::new(0);

/// CRIU's scale (0 errors … 4 trace) to `log`'s.
pub fn level_filter(criu_level: u8) -> LevelFilter {
    match criu_level {
        0 => LevelFilter::Error,
        1 => LevelFilter::Warn,
        2 => LevelFilter::Info,
        3 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Opens (or creates, 0600) a log for appending. A symbolic link is not followed and a file of
/// another user is not appended to: a root cr logging into a user's directory must not be
/// made to write elsewhere.
fn open_log(path: &Path) -> Result<File> {
    use std::os::unix::fs::MetadataExt;
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                anyhow::anyhow!(
                    "log file {} is a symbolic link: not followed",
                    path.display()
                )
            } else {
                anyhow::Error::new(e).context(format!("open log file {}", path.display()))
            }
        })?;
    let m = f
        .metadata()
        .with_context(|| format!("stat log file {}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if m.is_file() && m.uid() != me {
        anyhow::bail!(
            "log file {} belongs to uid {}, not to cr's user ({me}): not appending to it",
            path.display(),
            m.uid()
        );
    }
    Ok(f)
}

/// Installs the logger. `path` None or "-" logs to stderr.
pub fn init(criu_level: u8, path: Option<&Path>, per_pid: bool) -> Result<()> {
    let path = path.filter(|p| *p != Path::new("-")).map(Path::to_path_buf);
    let main = match &path {
        Some(p) => Some(open_log(p)?),
        None => None,
    };
    let level = level_filter(criu_level);
    let logger = Logger {
        start: Instant::now(),
        level,
        path,
        per_pid,
        main: Mutex::new(main),
        pids: Mutex::new(HashMap::new()),
    };
    if LOGGER.set(logger).is_ok() {
        log::set_logger(LOGGER.get().expect("just set"))
            .map_err(|e| anyhow::anyhow!("install the logger: {e}"))?;
        log::set_max_level(level);
    }
    Ok(())
}

/// While alive, log lines are about task `pid` (routed to `LOGFILE.PID` under `--log-pid`).
pub struct TaskScope(i32);

impl TaskScope {
    pub fn enter(pid: i32) -> TaskScope {
        TaskScope(CURRENT_TASK.swap(pid, Ordering::Relaxed))
    }
}

impl Drop for TaskScope {
    fn drop(&mut self) {
        CURRENT_TASK.store(self.0, Ordering::Relaxed);
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // aya's own debug output (relocations, map creation) drowns cr's: show it only at -v4.
        let t = r.target();
        if r.level() == Level::Debug
            && (t.starts_with("aya::") || t.starts_with("aya_obj"))
            && self.level < LevelFilter::Trace
        {
            return;
        }
        let t = self.start.elapsed();
        let lvl = match r.level() {
            Level::Error => "Error",
            Level::Warn => "Warn",
            Level::Info => "Info",
            Level::Debug => "Debug",
            Level::Trace => "Trace",
        };
        let line = format!(
            "({:>3}.{:06}) {lvl}: {}\n",
            t.as_secs(),
            t.subsec_micros(),
            r.args()
        );
        let task = CURRENT_TASK.load(Ordering::Relaxed);
        if self.per_pid && task > 0 {
            if let Some(base) = &self.path {
                let mut pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
                if let std::collections::hash_map::Entry::Vacant(e) = pids.entry(task) {
                    let mut p = base.as_os_str().to_owned();
                    p.push(format!(".{task}"));
                    if let Ok(f) = open_log(Path::new(&p)) {
                        e.insert(f);
                    }
                }
                if let Some(f) = pids.get_mut(&task) {
                    let _ = f.write_all(line.as_bytes());
                    return;
                }
            }
        }
        let mut main = self.main.lock().unwrap_or_else(|e| e.into_inner());
        match main.as_mut() {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
                // Errors also reach the terminal: a user running `cr ... -o log` should see why
                // it failed without opening the log.
                if r.level() == Level::Error {
                    crate::progress::write_stderr(line.as_bytes());
                }
            }
            None => {
                crate::progress::write_stderr(line.as_bytes());
            }
        }
    }

    fn flush(&self) {
        if let Some(f) = self.main.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = f.sync_data();
        }
    }
}
