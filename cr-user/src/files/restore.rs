//! Recreating the fd table: each open file description once (by its kind's
//! [`FileKind::open`]), then dup'd to every fd number that shared it, with its offset and flags.
//!
//! Descriptions are first opened at temporary numbers above every fd of the image, then moved
//! into place with dup3, so an fd number the kernel hands out can never clobber one already
//! restored. A description another process of the tree also holds is made once: cr keeps a
//! copy, the other processes take it ([`TreeFiles`]).

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

use super::kind::FileKind;
use super::opener::Opener;
pub use super::opener::{Keepalive, TreeFiles};
use super::scratch::Scratch;
use crate::image::dir::ImageDir;
use crate::image::pb;
use crate::kernel::ptrace::Remote;
use crate::kernel::sys::process;

/// Checks, before anything is created, that every file the image refers to is still there as it
/// was: a vanished file or one whose size changed is an error naming it.
pub fn validate(files: &pb::Files) -> Result<()> {
    for f in &files.files {
        let Some(k) = &f.kind else {
            bail!(
                "files.img: entry {} has no kind (image from a newer cr?)",
                f.id
            );
        };
        if grown_log(files, k) {
            continue;
        }
        kind_of(k, f.id)?.validate(k)?;
    }
    Ok(())
}

/// A regular file that grew since the dump while every description of it in the tree is
/// write-only (a log: going back to an older checkpoint always finds it longer) is accepted,
/// and the log says so. One the tree reads must match as before; one it maps is checked by
/// `mem::restore::validate_mapped`, which a size change fails.
fn grown_log(files: &pb::Files, k: &pb::file_entry::Kind) -> bool {
    use std::os::unix::fs::MetadataExt;
    let pb::file_entry::Kind::Reg(r) = k else {
        return false;
    };
    if r.unlinked || r.mode & libc::S_IFMT != libc::S_IFREG {
        return false;
    }
    let write_only = files.files.iter().all(|f| match &f.kind {
        Some(pb::file_entry::Kind::Reg(o)) if o.path == r.path => {
            f.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32
        }
        _ => true,
    });
    let Ok(meta) = std::fs::metadata(&r.path) else {
        return false;
    };
    if !(write_only && meta.is_file() && meta.size() > r.size && meta.ino() == r.inode) {
        return false;
    }
    log::info!(
        "file {} grew since the checkpoint ({} bytes then, {} now); the tree only writes to it: accepted",
        r.path,
        r.size,
        meta.size()
    );
    true
}

/// The kind of an image entry.
fn kind_of(k: &pb::file_entry::Kind, id: u32) -> Result<&'static dyn FileKind> {
    super::kind_of(k).with_context(|| format!("file {id} is of a kind this cr does not know"))
}

impl Opener<'_, '_, '_, '_> {
    /// Opens one description at a temporary fd, `fd_no` being the first fd that uses it (for
    /// messages).
    fn open_description(&mut self, f: &pb::FileEntry, fd_no: i32) -> Result<u64> {
        if let Some(Some(mine)) = self.tree.files.get(&f.id) {
            let mine = mine.as_raw_fd();
            return self.install_from_cr(
                mine,
                &format!("file {} (shared with another process) for fd {fd_no}", f.id),
            );
        }
        let flags = f.flags
            & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC)
                as u32);
        let Some(k) = &f.kind else {
            bail!("file {} (fd {fd_no}) has no kind", f.id)
        };
        kind_of(k, f.id)?.open(f, flags, fd_no, self)
    }

    /// Raises the task's RLIMIT_NOFILE (soft, and hard if cr may) when the fd numbers of the
    /// image plus the temporaries would not fit; the dumped limits are set later.
    fn make_room(&self, descriptions: usize) -> Result<()> {
        let need = self.base + 2 * descriptions as u64 + 16;
        let (cur, max) = process::get_rlimit(self.pid, libc::RLIMIT_NOFILE)
            .context("read RLIMIT_NOFILE of the new task")?;
        if cur >= need {
            return Ok(());
        }
        process::set_rlimit(self.pid, libc::RLIMIT_NOFILE, need, max.max(need)).with_context(|| {
            format!("raise RLIMIT_NOFILE of the new task to {need} for fd {} (raising the hard limit {max} needs CAP_SYS_RESOURCE)", self.base - 1)
        })?;
        Ok(())
    }
}

/// Rebuilds the fd table of `pid`, one process of a tree: what `tree` says is shared is taken
/// from the process that made it, or made here and kept by cr for the others.
pub fn restore_fds_in_tree(
    r: &mut Remote,
    scratch: u64,
    pid: i32,
    dir: &ImageDir,
    fds: &pb::Fds,
    files: &pb::Files,
    tree: &mut TreeFiles,
) -> Result<Keepalive> {
    let by_id: HashMap<u32, &pb::FileEntry> = files.files.iter().map(|f| (f.id, f)).collect();
    let max_fd = fds.fds.iter().map(|f| f.fd).max().unwrap_or(0);
    if max_fd < 0 {
        bail!("fds image holds a negative fd {max_fd}");
    }
    let descriptions: HashSet<u32> = fds.fds.iter().map(|f| f.file_id).collect();
    let mut b = Opener {
        r,
        scratch,
        pid,
        dir,
        files,
        fds,
        base: max_fd as u64 + 1,
        keep: Keepalive::default(),
        temps: Vec::new(),
        tree,
        cr_pidfd: None,
        local: Scratch::default(),
    };
    b.make_room(descriptions.len())?;
    let mut temp: HashMap<u32, u64> = HashMap::new();
    for fd in &fds.fds {
        if temp.contains_key(&fd.file_id) {
            continue;
        }
        let f = by_id.get(&fd.file_id).with_context(|| {
            format!(
                "fd {} refers to file {} missing from files.img",
                fd.fd, fd.file_id
            )
        })?;
        let t = b.open_description(f, fd.fd)?;
        if matches!(b.tree.files.get(&fd.file_id), Some(None)) {
            let mine = b.take_into_cr(t)?;
            b.tree.files.insert(fd.file_id, Some(mine));
        }
        temp.insert(fd.file_id, t);
    }
    for k in super::KINDS {
        k.opened(&mut b)?;
    }
    for fd in &fds.fds {
        let t = temp[&fd.file_id];
        let flags = if fd.cloexec {
            libc::O_CLOEXEC as u64
        } else {
            0
        };
        b.r.syscall("dup3", libc::SYS_dup3, &[t, fd.fd as u64, flags])
            .with_context(|| format!("install fd {}", fd.fd))?;
    }
    for t in std::mem::take(&mut b.temps) {
        b.r.syscall("close(temp)", libc::SYS_close, &[t])?;
    }
    for k in super::KINDS {
        k.fixup(&mut b)?;
    }
    log::debug!(
        "PID {pid}: {} fds over {} descriptions restored",
        fds.fds.len(),
        descriptions.len()
    );
    Ok(b.keep)
}
