//! Regular files and directories: saved by path with their size, mode and identity, opened
//! again by path, never with O_TRUNC or O_CREAT (restore does not change file contents).

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, FdKind, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;

/// The bit that, with O_DIRECTORY, makes O_TMPFILE. It stays in f_flags of a file opened with
/// O_TMPFILE but must not be passed when reopening it.
const O_TMPFILE_BIT: u32 = 0o20000000;

pub struct Regular;

impl FileKind for Regular {
    fn name(&self) -> &'static str {
        "a regular file or directory"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok(matches!(p.class, FdKind::Path { .. }).then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, _cx: &mut DumpCx) -> Result<Kind> {
        let FdKind::Path { path } = &p.class else {
            bail!("internal: fd {} is not a file with a path", p.fd)
        };
        Ok(Kind::Reg(reg_file(
            path.clone(),
            &p.meta,
            false,
            String::new(),
        )))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Reg(r) if !r.unlinked)
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        inode_identity(k)
    }

    fn validate(&self, k: &Kind) -> Result<()> {
        let Kind::Reg(r) = k else { return Ok(()) };
        let meta = std::fs::metadata(&r.path)
            .with_context(|| format!("file {} (open at dump time) is gone", r.path))?;
        let was = r.mode & libc::S_IFMT;
        if was == libc::S_IFREG && !meta.is_file() {
            bail!(
                "{} was a regular file at dump time and is not one now",
                r.path
            );
        }
        if was == libc::S_IFDIR && !meta.is_dir() {
            bail!("{} was a directory at dump time and is not one now", r.path);
        }
        if meta.is_file() && meta.size() != r.size {
            bail!(
                "file {} changed size since the dump ({} bytes then, {} now)",
                r.path,
                r.size,
                meta.size()
            );
        }
        Ok(())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Reg(reg)) = &f.kind else {
            bail!("internal: file {} is not a regular file", f.id)
        };
        open_reg(f, reg, &reg.path, flags, fd_no, o)
    }
}

/// The image entry of a file (unlinked or not) from its stat.
pub(super) fn reg_file(
    path: String,
    meta: &Metadata,
    unlinked: bool,
    content: String,
) -> pb::RegFile {
    pb::RegFile {
        path,
        size: meta.size(),
        mode: meta.mode(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        dev: meta.dev(),
        inode: meta.ino(),
        unlinked,
        content,
        uid: meta.uid(),
        gid: meta.gid(),
    }
}

/// A file's identity across processes: its inode.
pub(super) fn inode_identity(k: &Kind) -> Option<String> {
    match k {
        Kind::Reg(r) => Some(format!("reg:{}:{}", r.dev, r.inode)),
        _ => None,
    }
}

/// Opens the file of `reg` at `path` (its own, or a recreated unlinked file's) and seeks.
pub(super) fn open_reg(
    f: &pb::FileEntry,
    reg: &pb::RegFile,
    path: &str,
    flags: u32,
    fd_no: i32,
    o: &mut Opener,
) -> Result<u64> {
    let mut flags = flags & !O_TMPFILE_BIT;
    if reg.mode & libc::S_IFMT == libc::S_IFREG {
        flags &= !(libc::O_DIRECTORY as u32);
    }
    let what = format!(
        "{}{} for fd {fd_no}",
        reg.path,
        if reg.unlinked { " (unlinked)" } else { "" }
    );
    let t = o.open(path, flags, &what)?;
    o.seek(t, f.pos, &what)?;
    Ok(t)
}
