//! Open files whose name was removed ("ghosts"): their content is saved in the image once per
//! inode (`file-ID.img`), however many descriptions point at it. Restore recreates the file
//! under a temporary name (its old name when that is free, so /proc shows the same
//! "path (deleted)" as before), opens it for every description that had it, and unlinks it
//! again once the fd table is in place, on success and on error alike ([`GhostLink`]).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::{path_str, Opener};
use super::probe::{DumpCx, FdKind, Probe};
use super::regular::{inode_identity, open_reg, reg_file};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;

/// Largest unlinked file whose content is saved in the image (CRIU's --ghost-limit, which
/// defaults to 1 MiB there; cr is more generous but still refuses to swallow huge files).
pub const GHOST_LIMIT: u64 = 512 << 20;

pub struct Ghost;

/// Unlinked inodes whose content is saved already (this process): image file name by (dev, ino).
#[derive(Default)]
struct Saved(HashMap<(u64, u64), String>);

/// The recreated files of this process, by (dev, ino) of the original.
#[derive(Default)]
struct Links(HashMap<(u64, u64), GhostLink>);

impl FileKind for Ghost {
    fn name(&self) -> &'static str {
        "an unlinked file"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok(matches!(p.class, FdKind::Unlinked { .. }).then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, id: u32, cx: &mut DumpCx) -> Result<Kind> {
        let FdKind::Unlinked { path } = &p.class else {
            bail!("internal: fd {} is not an unlinked file", p.fd)
        };
        let key = (p.meta.dev(), p.meta.ino());
        let content = match cx.scratch.get::<Saved>().0.get(&key) {
            Some(name) => name.clone(),
            None => {
                let name = format!("file-{id}.img");
                let link = format!("/proc/{}/fd/{}", p.pid, p.fd);
                cx.contents.push((
                    name.clone(),
                    read_ghost(&link, path, p.fd, p.pid, p.meta.size())?,
                ));
                cx.scratch.get::<Saved>().0.insert(key, name.clone());
                name
            }
        };
        Ok(Kind::Reg(reg_file(path.clone(), &p.meta, true, content)))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Reg(r) if r.unlinked)
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        inode_identity(k)
    }

    fn blobs<'k>(&self, k: &'k Kind) -> Vec<&'k str> {
        match k {
            Kind::Reg(r) if r.unlinked && !r.content.is_empty() => vec![r.content.as_str()],
            _ => Vec::new(),
        }
    }

    fn validate(&self, k: &Kind) -> Result<()> {
        let Kind::Reg(r) = k else { return Ok(()) };
        let dir = Path::new(&r.path).parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            bail!(
                "directory {} of the unlinked file {} is gone",
                dir.display(),
                r.path
            );
        }
        Ok(())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Reg(reg)) = &f.kind else {
            bail!("internal: file {} is not an unlinked file", f.id)
        };
        let path = recreate(o, reg, f.id)?;
        open_reg(f, reg, &path, flags, fd_no, o)
    }

    /// Every description is open: the temporary names go (GhostLink's drop).
    fn fixup(&self, o: &mut Opener) -> Result<()> {
        drop(o.local().take::<Links>());
        Ok(())
    }
}

/// Reads the content of an unlinked file through its fd link (a new description: the target's
/// offset is not touched).
fn read_ghost(link: &str, path: &str, fd: i32, pid: i32, size: u64) -> Result<Vec<u8>> {
    if size > GHOST_LIMIT {
        crate::refuse!(None, "fd {fd} of PID {pid} is the unlinked file {path} of {size} bytes: larger than the {GHOST_LIMIT}-byte limit for saving unlinked files");
    }
    std::fs::read(link)
        .with_context(|| format!("read the unlinked file {path} (fd {fd} of PID {pid})"))
}

/// A recreated unlinked file's temporary name, removed when dropped.
struct GhostLink {
    path: PathBuf,
}

impl Drop for GhostLink {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!(
                "removing the temporary link {} of an unlinked file: {e}",
                self.path.display()
            );
        }
    }
}

/// Recreates an unlinked file (once per inode); returns the temporary path to open it by.
fn recreate(o: &mut Opener, reg: &pb::RegFile, id: u32) -> Result<String> {
    let key = (reg.dev, reg.inode);
    if let Some(g) = o.local().get::<Links>().0.get(&key) {
        return path_str(&g.path);
    }
    let content = o
        .dir()
        .read_blob(&reg.content)
        .with_context(|| format!("content of the unlinked file {}", reg.path))?;
    let (path, mut file) = create_ghost(&reg.path, id)?;
    let link = GhostLink { path };
    let shown = link.path.display().to_string();
    file.write_all(&content)
        .with_context(|| format!("write {shown}"))?;
    std::os::unix::fs::fchown(&file, Some(reg.uid), Some(reg.gid))
        .with_context(|| format!("chown {shown} to {}:{}", reg.uid, reg.gid))?;
    // After chown, which clears set-id bits.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
        reg.mode & 0o7777,
    ))
    .with_context(|| format!("chmod {shown} to {:o}", reg.mode & 0o7777))?;
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(reg.mtime_ns.max(0) as u64);
    if let Err(e) = file.set_modified(mtime) {
        log::debug!("set the mtime of {shown}: {e}");
    }
    let p = path_str(&link.path)?;
    log::debug!(
        "unlinked file {} recreated at {p} ({} bytes)",
        reg.path,
        content.len()
    );
    o.local().get::<Links>().0.insert(key, link);
    Ok(p)
}

/// Creates the file that stands in for an unlinked one: at its old name when that is free,
/// else next to it under a name of cr's.
fn create_ghost(path: &str, id: u32) -> Result<(PathBuf, std::fs::File)> {
    let create = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(p)
    };
    let first = PathBuf::from(path);
    match create(&first) {
        Ok(f) => return Ok((first, f)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("recreate the unlinked file {path}")),
    }
    let alt = PathBuf::from(format!("{path}.cr-ghost-{id}"));
    let f = create(&alt)
        .with_context(|| format!("recreate the unlinked file {path} at {}", alt.display()))?;
    Ok((alt, f))
}
