//! An image file, or a whole images directory, as pretty JSON (`cr show`, see
//! `cmd::show`).
//!
//! Fields keep the order of `cr.proto`. `bytes` fields (XSAVE area, siginfo, pipe data) are
//! printed as hex when short and as a length plus the first bytes when long, so the output
//! stays readable. Page files are summarized (size, pages), never dumped.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use prost::Message;
use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};

use crate::image::dir::{ImageDir, INVENTORY};
use crate::image::file::{self, Header, Kind, HEADER_LEN};
use crate::image::pages::PageFile;
use crate::image::pb;

/// The JSON text for `path`: an images directory (an object keyed by file name, the inventory
/// first) or one image file.
pub fn render(path: &Path) -> Result<String> {
    if path.is_dir()
        && !path.join(INVENTORY).exists()
        && !crate::image::fold::sequence(path)?.is_empty()
    {
        render_sequence(path)
    } else if path.is_dir() {
        render_dir(path)
    } else {
        render_file(path)
    }
}

fn render_file(path: &Path) -> Result<String> {
    let mut head = Vec::with_capacity(HEADER_LEN);
    std::fs::File::open(path)
        .and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut head))
        .with_context(|| format!("cannot read image file {}", path.display()))?;
    let h = Header::decode(&head).map_err(|why| anyhow!("{}: {why}", path.display()))?;
    if h.kind == Kind::Pages {
        return pages_summary(&PageFile::open(path)?);
    }
    let (h, payload) = file::read_frame(path, None)?;
    message_json(h.kind, &payload, path)
}

fn render_dir(path: &Path) -> Result<String> {
    let img = ImageDir::open(path)?;
    let mut entries = vec![(INVENTORY.to_string(), pretty(img.inventory())?)];
    for f in img.files() {
        let p = path.join(&f.name);
        let text = if f.name.starts_with("pages-") {
            pages_summary(&*img.page_file(&f.name)?)?
        } else {
            let (h, payload) = img.read_frame(&f.name)?;
            message_json(h.kind, &payload, &p)?
        };
        entries.push((f.name.clone(), text));
    }
    let mut s = String::from("{");
    for (i, (name, text)) in entries.iter().enumerate() {
        s.push_str(if i == 0 { "\n  " } else { ",\n  " });
        s.push_str(&serde_json::to_string(name)?);
        s.push_str(": ");
        // Pretty JSON has no raw newline inside strings, so this indents exactly one level.
        s.push_str(&text.replace('\n', "\n  "));
    }
    s.push_str("\n}");
    Ok(s)
}

/// A `cr periodic` directory: a JSON array, one line per complete checkpoint (oldest first):
/// its name, time, frozen ms, dirty and image MiB, harvest, parent, whether `latest` names it.
fn render_sequence(path: &Path) -> Result<String> {
    #[derive(Serialize)]
    struct Line {
        checkpoint: String,
        time: String,
        frozen_ms: f64,
        dirty_mib: f64,
        image_mib: f64,
        harvest: String,
        parent: String,
        folded: bool,
        latest: bool,
    }
    let latest = std::fs::read_link(path.join("latest"))
        .ok()
        .map(|l| l.to_string_lossy().into_owned());
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let mut s = String::from("[");
    for (i, n) in crate::image::fold::sequence(path)?.into_iter().enumerate() {
        let name = crate::image::fold::seq_name(n);
        let img = ImageDir::open(&path.join(&name))?;
        let inv = img.inventory();
        let st = inv.stats.clone().unwrap_or_default();
        let line = Line {
            time: utc(inv.created_unix_ms),
            frozen_ms: round(st.frozen_us as f64 / 1e3),
            dirty_mib: round(st.pages_written as f64 / 256.0),
            image_mib: round(img.files().map(|f| f.size).sum::<u64>() as f64 / (1u64 << 20) as f64),
            harvest: st.harvest,
            parent: inv.parent_path.clone(),
            folded: inv.flags & crate::image::names::DUMP_F_FOLDED != 0,
            latest: latest.as_deref() == Some(name.as_str()),
            checkpoint: name,
        };
        s.push_str(if i == 0 { "\n  " } else { ",\n  " });
        s.push_str(&serde_json::to_string(&line)?);
    }
    s.push_str("\n]");
    Ok(s)
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(super) fn utc(ms: u64) -> String {
    let (days, rem) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
#[test]
fn utc_dates() {
    assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
    assert_eq!(utc(1_796_657_025_433), "2026-12-07T15:23:45.433Z");
}

fn pages_summary(pf: &PageFile) -> Result<String> {
    #[derive(Serialize)]
    struct Summary {
        kind: &'static str,
        size: u64,
        pages: u64,
        data_crc32c: u32,
    }
    pretty(&Summary {
        kind: Kind::Pages.name(),
        size: pf.size(),
        pages: pf.nr_pages(),
        data_crc32c: pf.data_crc(),
    })
}

/// Decodes a checked payload of `kind` and renders it.
fn message_json(kind: Kind, payload: &[u8], path: &Path) -> Result<String> {
    fn msg<M: Message + Default + Serialize>(
        payload: &[u8],
        kind: Kind,
        path: &Path,
    ) -> Result<String> {
        pretty(&file::decode_msg::<M>(payload, kind, path)?)
    }
    match kind {
        Kind::Inventory => msg::<pb::Inventory>(payload, kind, path),
        Kind::PsTree => msg::<pb::PsTree>(payload, kind, path),
        Kind::Core => msg::<pb::Core>(payload, kind, path),
        Kind::Mm => msg::<pb::Mm>(payload, kind, path),
        Kind::PageMap => msg::<pb::PageMap>(payload, kind, path),
        Kind::Fds => msg::<pb::Fds>(payload, kind, path),
        Kind::Files => msg::<pb::Files>(payload, kind, path),
        Kind::Blob => Ok(serde_json::to_string_pretty(
            &serde_json::json!({ "blob": bytes_summary(payload) }),
        )?),
        Kind::Locks => msg::<pb::Locks>(payload, kind, path),
        Kind::Tcp => Ok(serde_json::to_string_pretty(&serde_json::json!({
            "kind": kind.name(),
            "payload_bytes": payload.len(),
            "note": "this cr cannot decode this kind yet",
        }))?),
        Kind::Pages => bail!("{}: is a page file", path.display()),
    }
}

/// Pretty JSON with `bytes` fields summarized (see [`BytesFormatter`]).
fn pretty<T: Serialize>(v: &T) -> Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, BytesFormatter::default());
    v.serialize(&mut ser).context("cannot render as JSON")?;
    String::from_utf8(out).context("rendered JSON is not UTF-8")
}

/// Fields of cr.proto of type `bytes` (prost makes them `Vec<u8>`, which serde writes as an
/// array of numbers).
const BYTES_FIELDS: &[&str] = &["xsave", "siginfo", "data"];
/// Byte strings up to this long are shown whole (a siginfo is 128 bytes).
const SHOW_WHOLE: usize = 128;

/// Readable form of a byte string: hex if short, else its length and first bytes.
fn bytes_summary(b: &[u8]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    if b.len() <= SHOW_WHOLE {
        hex(b)
    } else {
        format!(
            "<{} bytes, crc32c {:#010x}> {}…",
            b.len(),
            crc32c::crc32c(b),
            hex(&b[..32])
        )
    }
}

/// serde_json's pretty formatter, except that the array value of a field named in
/// [`BYTES_FIELDS`] is collected and written as one string ([`bytes_summary`]). Working at the
/// formatter level keeps the struct field order (a `serde_json::Value` would sort keys).
#[derive(Default)]
struct BytesFormatter {
    inner: PrettyFormatter<'static>,
    in_key: bool,
    key: String,
    /// The key whose value is being written next.
    value_key: Option<String>,
    /// Bytes of the field being collected.
    bytes: Option<Vec<u8>>,
}

impl Formatter for BytesFormatter {
    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.in_key = true;
        self.key.clear();
        self.inner.begin_object_key(w, first)
    }
    fn end_object_key<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.in_key = false;
        self.inner.end_object_key(w)
    }
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if self.in_key {
            self.key.push_str(fragment);
        }
        self.inner.write_string_fragment(w, fragment)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.value_key = Some(std::mem::take(&mut self.key));
        self.inner.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.value_key = None;
        self.inner.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object(w)
    }
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        if self
            .value_key
            .take()
            .is_some_and(|k| BYTES_FIELDS.contains(&k.as_str()))
        {
            self.bytes = Some(Vec::new());
            return Ok(());
        }
        self.inner.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        match self.bytes.take() {
            Some(b) => w.write_all(serde_json::to_string(&bytes_summary(&b))?.as_bytes()),
            None => self.inner.end_array(w),
        }
    }
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if self.bytes.is_some() {
            return Ok(());
        }
        self.inner.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        if self.bytes.is_some() {
            return Ok(());
        }
        self.inner.end_array_value(w)
    }
    fn write_u8<W: ?Sized + Write>(&mut self, w: &mut W, value: u8) -> std::io::Result<()> {
        if let Some(b) = &mut self.bytes {
            b.push(value);
            return Ok(());
        }
        self.inner.write_u8(w, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::dir::{core_file, pagemap_file, ImageWriter, FILES, PSTREE};
    use crate::image::pages::{PageWriter, PAGE_SIZE};
    use crate::image::testutil::TempDir;

    fn write_sample(d: &Path) {
        let w = ImageWriter::create(d).unwrap();
        w.write_msg(
            PSTREE,
            Kind::PsTree,
            &pb::PsTree {
                tasks: vec![pb::PsTreeEntry {
                    pid: 3,
                    threads: vec![3, 4],
                    ..Default::default()
                }],
            },
        )
        .unwrap();
        let core = pb::Core {
            tid: 3,
            regs: Some(pb::GpRegs {
                rip: 0x401000,
                ..Default::default()
            }),
            xsave: vec![0xab; 2696],
            pending: vec![pb::PendingSignal {
                signo: 10,
                siginfo: vec![1, 2, 0xff],
                shared: false,
            }],
            ..Default::default()
        };
        w.write_msg(&core_file(3), Kind::Core, &core).unwrap();
        let files = pb::Files {
            files: vec![pb::FileEntry {
                id: 1,
                kind: Some(pb::file_entry::Kind::Pipe(pb::PipeFile {
                    pipe_id: 9,
                    data: b"hi".to_vec(),
                    capacity: 65536,
                })),
                ..Default::default()
            }],
        };
        w.write_msg(FILES, Kind::Files, &files).unwrap();
        let mut pw = PageWriter::create(&w, 3, 2).unwrap();
        pw.write_run(0x1000, &vec![5u8; 2 * PAGE_SIZE]).unwrap();
        let pm = pw.finish().unwrap();
        w.write_msg(&pagemap_file(3), Kind::PageMap, &pm).unwrap();
        w.commit(pb::Inventory {
            root_pid: 3,
            ..Default::default()
        })
        .unwrap();
    }

    #[test]
    fn directory_as_one_json_object() {
        let t = TempDir::new("show-dir");
        write_sample(t.path());
        let text = render(t.path()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            text.trim_start().starts_with("{\n  \"inventory.img\": {"),
            "{text}"
        );
        assert_eq!(v["inventory.img"]["root_pid"], 3);
        assert_eq!(
            v["pstree.img"]["tasks"][0]["threads"],
            serde_json::json!([3, 4])
        );
        let core = &v["core-3.img"];
        assert_eq!(core["regs"]["rip"], 0x401000);
        assert!(
            core["xsave"]
                .as_str()
                .unwrap()
                .starts_with("<2696 bytes, crc32c "),
            "{}",
            core["xsave"]
        );
        assert_eq!(core["pending"][0]["siginfo"], "0102ff");
        assert_eq!(v["files.img"]["files"][0]["kind"]["Pipe"]["data"], "6869");
        assert_eq!(v["pages-3.img"]["pages"], 2);
        assert_eq!(v["pagemap-3.img"]["runs"][0]["vaddr"], 0x1000);
        // Field order follows cr.proto (tid before regs before xsave).
        let c = text.find("\"tid\"").unwrap();
        assert!(
            c < text.find("\"regs\"").unwrap()
                && text.find("\"regs\"").unwrap() < text.find("\"xsave\"").unwrap()
        );
    }

    #[test]
    fn single_files_and_errors() {
        let t = TempDir::new("show-file");
        write_sample(t.path());
        let v: serde_json::Value =
            serde_json::from_str(&render(&t.path().join("core-3.img")).unwrap()).unwrap();
        assert_eq!(v["tid"], 3);
        let v: serde_json::Value =
            serde_json::from_str(&render(&t.path().join("pages-3.img")).unwrap()).unwrap();
        assert_eq!(v["size"], 3 * PAGE_SIZE);

        let junk = t.path().join("junk.img");
        std::fs::write(&junk, "hello").unwrap();
        let e = format!("{:#}", render(&junk).unwrap_err());
        assert!(e.contains("junk.img: not a cr image file"), "{e}");

        let p = t.path().join("pstree.img");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len() - 1;
        b[n] ^= 4;
        std::fs::write(&p, &b).unwrap();
        let e = format!("{:#}", render(&p).unwrap_err());
        assert!(e.contains("pstree.img: checksum mismatch"), "{e}");
        let e = format!("{:#}", render(t.path()).unwrap_err());
        assert!(e.contains("pstree.img: checksum mismatch"), "{e}");

        let empty = TempDir::new("show-empty");
        let e = format!("{:#}", render(empty.path()).unwrap_err());
        assert!(e.contains("not a complete cr image"), "{e}");
    }
}
