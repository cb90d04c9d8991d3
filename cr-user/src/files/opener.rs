//! What a kind of open file works with while the fd table of a restored task is rebuilt
//! ([`Opener`]): remote syscalls in the task, temporary fds, passing cr's fds in, and state per
//! process and per tree. Descriptions several processes share are made once ([`TreeFiles`]).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};

use super::scratch::Scratch;
use crate::image::dir::ImageDir;
use crate::image::pb;
use crate::kernel::ptrace::inject::put_str;
use crate::kernel::ptrace::Remote;

/// State kept until the fd table is complete (FIFO copies that keep data alive).
#[derive(Default)]
pub struct Keepalive(pub(super) Vec<std::fs::File>);

/// Open file descriptions that several processes of a tree share (inherited across fork).
/// The first process that needs one creates it as usual; cr then keeps a copy
/// (pidfd_getfd), and every later process takes that copy with a remote pidfd_open(cr) +
/// pidfd_getfd. So there is one description (one offset, one set of flags), as before the
/// dump. Kinds keep what else they share across the tree (a pipe's two ends) in [`Opener::tree`].
/// Dropped (closing cr's copies) once the tree is built.
#[derive(Default)]
pub struct TreeFiles {
    /// File ids used by more than one process, and cr's copy once created.
    pub(super) files: HashMap<u32, Option<OwnedFd>>,
    /// The kinds' tree-wide state.
    pub(super) kinds: Scratch,
    /// memfds and unlinked files, recreated once per inode for fds and mappings alike.
    pub(super) objects: super::objects::Objects,
}

impl TreeFiles {
    /// Finds what is shared, from the fd table of every process of the tree.
    pub fn plan<'f>(tables: impl IntoIterator<Item = &'f pb::Fds>, files: &pb::Files) -> TreeFiles {
        let tables: Vec<&pb::Fds> = tables.into_iter().collect();
        let mut file_users: HashMap<u32, usize> = HashMap::new();
        for t in &tables {
            let ids: HashSet<u32> = t.fds.iter().map(|f| f.file_id).collect();
            for id in ids {
                *file_users.entry(id).or_default() += 1;
            }
        }
        let mut kinds = Scratch::default();
        for k in super::KINDS {
            k.plan(&tables, files, &mut kinds);
        }
        TreeFiles {
            files: file_users
                .into_iter()
                .filter(|&(_, n)| n > 1)
                .map(|(id, _)| (id, None))
                .collect(),
            kinds,
            objects: Default::default(),
        }
    }

    /// The path a task opens to map the file of entry `file_id` (a memfd or an unlinked file,
    /// recreated on first use: the same file its fds get).
    pub fn mapped_path(
        &mut self,
        dir: &ImageDir,
        files: &pb::Files,
        file_id: u32,
    ) -> Result<String> {
        let f = files
            .files
            .iter()
            .find(|f| f.id == file_id)
            .with_context(|| {
                format!("a mapping refers to file {file_id}, missing from files.img")
            })?;
        self.objects.path_of(dir, f)
    }

    /// Once every process is built: the memfds get their seals.
    pub fn seal(&self) -> Result<()> {
        self.objects.seal()
    }
}

/// Rebuilds the fd table in the task `pid`: what [`FileKind::open`] works with.
pub struct Opener<'a, 'r, 't, 'm> {
    pub(super) r: &'r mut Remote<'t>,
    pub(super) scratch: u64,
    pub(super) pid: i32,
    pub(super) dir: &'a ImageDir,
    pub(super) files: &'a pb::Files,
    /// The fd table being rebuilt.
    pub(super) fds: &'a pb::Fds,
    /// First temporary fd number: above every fd of the image.
    pub(super) base: u64,
    pub(super) keep: Keepalive,
    /// Every temporary fd, closed once the table is in place.
    pub(super) temps: Vec<u64>,
    pub(super) tree: &'m mut TreeFiles,
    /// The task's pidfd of cr (a temporary fd), once needed.
    pub(super) cr_pidfd: Option<u64>,
    /// The kinds' state for this process (dropped with the Opener, on error too).
    pub(super) local: Scratch,
}

impl<'t> Opener<'_, '_, 't, '_> {
    /// The task being rebuilt.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Remote syscalls in the task.
    pub fn remote(&mut self) -> &mut Remote<'t> {
        self.r
    }

    /// Scratch memory of the task (syscall arguments).
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// The image (blobs).
    pub fn dir(&self) -> &ImageDir {
        self.dir
    }

    /// Every description of the image (files.img).
    pub fn files(&self) -> &pb::Files {
        self.files
    }

    /// The fd table being rebuilt (the image's).
    pub fn fds(&self) -> &pb::Fds {
        self.fds
    }

    /// The first temporary fd number (above every fd of the image).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The kinds' state for this process.
    pub fn local(&mut self) -> &mut Scratch {
        &mut self.local
    }

    /// The kinds' state shared by the whole tree ([`FileKind::plan`] made it).
    pub fn tree(&mut self) -> &mut Scratch {
        &mut self.tree.kinds
    }

    /// The path that opens the file of `f` again (a memfd or an unlinked file, recreated once
    /// per inode for the whole tree: see [`super::objects`]).
    pub fn object_path(&mut self, f: &pb::FileEntry) -> Result<String> {
        self.tree.objects.path_of(self.dir, f)
    }

    /// Keeps `f` (cr's own file) open until the tree runs.
    pub fn keep(&mut self, f: std::fs::File) {
        self.keep.0.push(f);
    }

    /// Installs a copy of cr's fd `mine` in the task (remote pidfd_getfd): the same open file
    /// description, at a temporary fd.
    pub fn install_from_cr(&mut self, mine: i32, what: &str) -> Result<u64> {
        let pidfd = match self.cr_pidfd {
            Some(p) => p,
            None => {
                let p = self.r.syscall(
                    "pidfd_open(cr)",
                    libc::SYS_pidfd_open,
                    &[std::process::id() as u64, 0],
                )?;
                let p = self.move_high(p)?;
                self.cr_pidfd = Some(p);
                p
            }
        };
        let fd = self
            .r
            .syscall(
                "pidfd_getfd",
                libc::SYS_pidfd_getfd,
                &[pidfd, mine as u64, 0],
            )
            .with_context(|| format!("take {what} from cr"))?;
        self.move_high(fd)
    }

    /// A copy, in cr, of the task's fd `fd`.
    pub fn take_into_cr(&self, fd: u64) -> Result<OwnedFd> {
        let pidfd = crate::kernel::sys::pidfd::pidfd_open(self.pid)?;
        crate::kernel::sys::pidfd::pidfd_getfd(&pidfd, fd as i32)
    }

    /// Moves a fresh fd of the task above `base` (close-on-exec, closed at the end).
    pub fn move_high(&mut self, fd: u64) -> Result<u64> {
        let hi = self.r.syscall(
            "fcntl(F_DUPFD_CLOEXEC)",
            libc::SYS_fcntl,
            &[fd, libc::F_DUPFD_CLOEXEC as u64, self.base],
        )?;
        self.r.syscall("close", libc::SYS_close, &[fd])?;
        self.temps.push(hi);
        Ok(hi)
    }

    /// Remote openat(AT_FDCWD, path, flags) → a temporary fd.
    pub fn open(&mut self, path: &str, flags: u32, what: &str) -> Result<u64> {
        let p = put_str(self.r, self.scratch, 0, path)?;
        let fd = self
            .r
            .syscall(
                "openat",
                libc::SYS_openat,
                &[libc::AT_FDCWD as u64, p, flags as u64, 0],
            )
            .with_context(|| format!("open {what}"))?;
        self.move_high(fd)
    }

    /// Remote lseek to `pos` (nothing for 0).
    pub fn seek(&mut self, fd: u64, pos: u64, what: &str) -> Result<()> {
        if pos != 0 {
            let got = self
                .r
                .syscall("lseek", libc::SYS_lseek, &[fd, pos, libc::SEEK_SET as u64])
                .with_context(|| format!("seek {what} to {pos}"))?;
            if got != pos {
                bail!("seek {what} to {pos} landed at {got}");
            }
        }
        Ok(())
    }

    /// F_SETFL with the flags that can be changed after open.
    pub fn setfl(&mut self, fd: u64, flags: u32) -> Result<()> {
        let settable =
            (libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME) as u32;
        self.r.syscall(
            "fcntl(F_SETFL)",
            libc::SYS_fcntl,
            &[fd, libc::F_SETFL as u64, (flags & settable) as u64],
        )?;
        Ok(())
    }
}

/// A path as UTF-8 (as the image stores paths).
pub(super) fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}
