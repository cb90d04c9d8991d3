//! Files that no name reaches any more (memfds, unlinked files), recreated once per inode for
//! the whole tree at restore: cr holds each one, and every description of it (in any process)
//! and every mapping of it is opened again through cr's fd (`/proc/CR/fd/N`), so fds and
//! MAP_SHARED mappings stay one file, as before the dump. An unlinked file is made at its old
//! name (so /proc shows the same "path (deleted)"), opened, and unlinked at once: nothing is
//! left on disk whatever happens next.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::image::dir::ImageDir;
use crate::image::pb;
use crate::image::pb::file_entry::Kind;

/// The recreated files of a tree, by (dev, ino) of the original.
#[derive(Default)]
pub struct Objects {
    by_inode: HashMap<(u64, u64), Object>,
}

struct Object {
    file: File,
    /// A memfd's seals, added by [`Objects::seal`]; and its name.
    seals: Option<(u32, String)>,
}

impl Objects {
    /// The path that opens the file of entry `f` (a memfd or an unlinked file) again, creating
    /// it on first use.
    pub fn path_of(&mut self, dir: &ImageDir, f: &pb::FileEntry) -> Result<String> {
        let (key, seals) = match &f.kind {
            Some(Kind::Memfd(m)) => ((m.dev, m.inode), Some((m.seals, m.name.clone()))),
            Some(Kind::Reg(r)) if r.unlinked => ((r.dev, r.inode), None),
            _ => bail!(
                "internal: file {} is neither a memfd nor an unlinked file",
                f.id
            ),
        };
        let o = match self.by_inode.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let file = match &f.kind {
                    Some(Kind::Memfd(m)) => super::memfd::create(m, dir)?,
                    Some(Kind::Reg(r)) => recreate_unlinked(dir, r, f.id)?,
                    _ => unreachable!(),
                };
                e.insert(Object { file, seals })
            }
        };
        Ok(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            o.file.as_raw_fd()
        ))
    }

    /// Adds every memfd's seals: the tree is built, nothing needs to write or map them anew.
    pub fn seal(&self) -> Result<()> {
        for o in self.by_inode.values() {
            if let Some((seals, name)) = &o.seals {
                super::memfd::add_seals(&o.file, name, *seals)?;
            }
        }
        Ok(())
    }
}

/// Unlinks a recreated file's name when dropped (also when recreating it fails midway).
struct TempName(PathBuf);

impl Drop for TempName {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            log::warn!(
                "removing the temporary name {} of an unlinked file: {e}",
                self.0.display()
            );
        }
    }
}

/// Recreates an unlinked file: content, owner, mode, mtime; returns cr's read-write fd of it,
/// its name already gone again.
fn recreate_unlinked(dir: &ImageDir, reg: &pb::RegFile, id: u32) -> Result<File> {
    let content = if reg.content.is_empty() {
        Vec::new()
    } else {
        dir.read_blob(&reg.content)
            .with_context(|| format!("content of the unlinked file {}", reg.path))?
    };
    let (path, mut file) = create_at_old_name(&reg.path, id)?;
    let name = TempName(path);
    let shown = name.0.display().to_string();
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
    log::debug!(
        "unlinked file {} recreated at {shown} ({} bytes), unlinked again",
        reg.path,
        content.len()
    );
    drop(name);
    Ok(file)
}

/// Creates the file that stands in for an unlinked one (read-write): at its old name when that
/// is free, else next to it under a name of cr's.
fn create_at_old_name(path: &str, id: u32) -> Result<(PathBuf, File)> {
    let create = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
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
