//! Recreating the fd table: each open file description once (remote openat / pipe2), then dup'd
//! to every fd number that shared it, with its offset and flags.
//!
//! Descriptions are first opened at temporary numbers above every fd of the image, then moved
//! into place with dup3, so an fd number the kernel hands out can never clobber one already
//! restored.
//!
//! - Regular files and directories are opened by path, never with O_TRUNC or O_CREAT: restore
//!   does not change file contents.
//! - An unlinked file is recreated from the image under a temporary name (its old name when
//!   that is free, so /proc shows the same "path (deleted)" as before), opened by the task for
//!   every description that had it, and unlinked again before this module returns, on success
//!   and on error alike ([`GhostLink`]).
//! - A pipe is made by the task (pipe2); cr refills it through a write end of its own opened via
//!   /proc, non-blocking, after growing it to the dumped capacity.
//! - A FIFO is held open read-write by cr while the task opens its ends (so no open blocks and
//!   the refilled data stays in the buffer); the caller drops that [`Keepalive`] afterwards.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::image::dir::ImageDir;
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::ptrace::Remote;
use crate::kernel::sys::{fd, process};

use crate::kernel::ptrace::inject::put_str;

/// The bit that, with O_DIRECTORY, makes O_TMPFILE. It stays in f_flags of a file opened with
/// O_TMPFILE but must not be passed when reopening it.
const O_TMPFILE_BIT: u32 = 0o20000000;

/// Checks, before anything is created, that every file the image refers to is still there as it
/// was: a vanished file or one whose size changed is an error naming it.
pub fn validate(files: &pb::Files, vmas: &[pb::Vma]) -> Result<()> {
    for f in &files.files {
        match &f.kind {
            Some(Kind::Reg(r)) if !r.unlinked => {
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
            }
            Some(Kind::Reg(r)) => {
                let dir = Path::new(&r.path).parent().unwrap_or(Path::new("/"));
                if !dir.is_dir() {
                    bail!(
                        "directory {} of the unlinked file {} is gone",
                        dir.display(),
                        r.path
                    );
                }
            }
            Some(Kind::Fifo(p)) => {
                let meta = std::fs::metadata(&p.path)
                    .with_context(|| format!("FIFO {} is gone", p.path))?;
                if !meta.file_type().is_fifo() {
                    bail!("{} is no longer a FIFO", p.path);
                }
            }
            Some(Kind::Chr(c)) => {
                let meta = std::fs::metadata(&c.path)
                    .with_context(|| format!("device {} is gone", c.path))?;
                if !meta.file_type().is_char_device()
                    || (c.rdev != 0 && meta.rdev() as u32 != c.rdev)
                {
                    bail!(
                        "{} is no longer the character device it was at dump time",
                        c.path
                    );
                }
            }
            Some(Kind::Pipe(_)) | Some(Kind::Tcp(_)) => {}
            Some(Kind::Tty(_)) => {
                own_terminal()?;
            }
            None => bail!(
                "files.img: entry {} has no kind (image from a newer cr?)",
                f.id
            ),
        }
    }
    for v in vmas {
        if v.flags & libc::MAP_ANONYMOUS as u32 != 0 || crate::image::vma::is_special(v.kind) {
            continue;
        }
        let meta = std::fs::metadata(&v.path)
            .with_context(|| format!("mapped file {} (at {:#x}) is gone", v.path, v.start))?;
        if meta.size() != v.file_size {
            bail!(
                "mapped file {} changed size since the dump ({} bytes then, {} now)",
                v.path,
                v.file_size,
                meta.size()
            );
        }
    }
    Ok(())
}

/// State kept until the fd table is complete (FIFO copies that keep data alive).
#[derive(Default)]
pub struct Keepalive(Vec<std::fs::File>);

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

/// One pipe being rebuilt: the task's two ends at temporary fds, and whether each has been
/// handed to a description already.
struct PipeEnds {
    rd: u64,
    wr: u64,
    rd_used: bool,
    wr_used: bool,
}

/// The saved (data, capacity) of each pipe or FIFO, from whichever entry carries them.
fn pipe_contents(files: &pb::Files) -> HashMap<(bool, u64), (&[u8], u32)> {
    let mut out: HashMap<(bool, u64), (&[u8], u32)> = HashMap::new();
    for f in &files.files {
        let (key, data, cap) = match &f.kind {
            Some(Kind::Pipe(p)) => ((false, p.pipe_id), p.data.as_slice(), p.capacity),
            Some(Kind::Fifo(p)) => ((true, p.pipe_id), p.data.as_slice(), p.capacity),
            _ => continue,
        };
        let e = out.entry(key).or_insert((&[], 0));
        if !data.is_empty() {
            e.0 = data;
        }
        if cap != 0 {
            e.1 = cap;
        }
    }
    out
}

/// Open file descriptions and pipes that several processes of a tree share (inherited across
/// fork). The first process that needs one creates it as usual; cr then keeps a copy
/// (pidfd_getfd), and every later process takes that copy with a remote pidfd_open(cr) +
/// pidfd_getfd. So there is one description (one offset, one set of flags) and one pipe
/// buffer, as before the dump. Dropped (closing cr's copies) once the tree is built.
#[derive(Default)]
pub struct TreeFiles {
    /// File ids used by more than one process, and cr's copy once created.
    files: HashMap<u32, Option<OwnedFd>>,
    /// Pipes with ends in more than one process, and cr's copy of both ends once created.
    pipes: HashMap<u64, Option<SharedPipe>>,
    /// FIFOs whose saved data is back already (by any process).
    fifos_filled: HashSet<u64>,
}

struct SharedPipe {
    rd: OwnedFd,
    wr: OwnedFd,
    rd_used: bool,
    wr_used: bool,
}

impl TreeFiles {
    /// Finds what is shared, from the fd table of every process of the tree.
    pub fn plan<'f>(tables: impl IntoIterator<Item = &'f pb::Fds>, files: &pb::Files) -> TreeFiles {
        let by_id: HashMap<u32, &pb::FileEntry> = files.files.iter().map(|f| (f.id, f)).collect();
        let mut file_users: HashMap<u32, usize> = HashMap::new();
        let mut pipe_users: HashMap<u64, usize> = HashMap::new();
        for t in tables {
            let ids: HashSet<u32> = t.fds.iter().map(|f| f.file_id).collect();
            let mut pipes: HashSet<u64> = HashSet::new();
            for id in ids {
                *file_users.entry(id).or_default() += 1;
                if let Some(Kind::Pipe(p)) = by_id.get(&id).and_then(|f| f.kind.as_ref()) {
                    pipes.insert(p.pipe_id);
                }
            }
            for p in pipes {
                *pipe_users.entry(p).or_default() += 1;
            }
        }
        TreeFiles {
            files: file_users
                .into_iter()
                .filter(|&(_, n)| n > 1)
                .map(|(id, _)| (id, None))
                .collect(),
            pipes: pipe_users
                .into_iter()
                .filter(|&(_, n)| n > 1)
                .map(|(id, _)| (id, None))
                .collect(),
            fifos_filled: HashSet::new(),
        }
    }
}

/// Rebuilds the fd table in the task `pid`.
struct FdBuilder<'a, 'r, 't, 'm> {
    r: &'r mut Remote<'t>,
    scratch: u64,
    pid: i32,
    dir: &'a ImageDir,
    /// First temporary fd number: above every fd of the image.
    base: u64,
    contents: HashMap<(bool, u64), (&'a [u8], u32)>,
    pipes: HashMap<u64, PipeEnds>,
    fifos_filled: HashSet<u64>,
    ghosts: HashMap<(u64, u64), GhostLink>,
    keep: Keepalive,
    /// Every temporary fd, closed once the table is in place.
    temps: Vec<u64>,
    tree: &'m mut TreeFiles,
    /// The task's pidfd of cr (a temporary fd), once needed.
    cr_pidfd: Option<u64>,
}

impl FdBuilder<'_, '_, '_, '_> {
    /// Installs a copy of cr's fd `mine` in the task (remote pidfd_getfd): the same open file
    /// description, at a temporary fd.
    fn install_from_cr(&mut self, mine: i32, what: &str) -> Result<u64> {
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
    fn take_into_cr(&self, fd: u64) -> Result<OwnedFd> {
        let pidfd = crate::kernel::sys::pidfd::pidfd_open(self.pid)?;
        crate::kernel::sys::pidfd::pidfd_getfd(&pidfd, fd as i32)
    }

    /// Moves a fresh fd of the task above `base` (close-on-exec, closed at the end).
    fn move_high(&mut self, fd: u64) -> Result<u64> {
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
    fn open(&mut self, path: &str, flags: u32, what: &str) -> Result<u64> {
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

    fn seek(&mut self, fd: u64, pos: u64, what: &str) -> Result<()> {
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
    fn setfl(&mut self, fd: u64, flags: u32) -> Result<()> {
        let settable =
            (libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME) as u32;
        self.r.syscall(
            "fcntl(F_SETFL)",
            libc::SYS_fcntl,
            &[fd, libc::F_SETFL as u64, (flags & settable) as u64],
        )?;
        Ok(())
    }

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
        match &f.kind {
            Some(Kind::Reg(reg)) => {
                let mut flags = flags & !O_TMPFILE_BIT;
                if reg.mode & libc::S_IFMT == libc::S_IFREG {
                    flags &= !(libc::O_DIRECTORY as u32);
                }
                let path = if reg.unlinked {
                    self.ghost(reg, f.id)?
                } else {
                    reg.path.clone()
                };
                let what = format!(
                    "{}{} for fd {fd_no}",
                    reg.path,
                    if reg.unlinked { " (unlinked)" } else { "" }
                );
                let t = self.open(&path, flags, &what)?;
                self.seek(t, f.pos, &what)?;
                Ok(t)
            }
            Some(Kind::Chr(c)) => {
                let what = format!("{} for fd {fd_no}", c.path);
                let t = self.open(&c.path, flags, &what)?;
                self.seek(t, f.pos, &what)?;
                Ok(t)
            }
            Some(Kind::Fifo(fifo)) => {
                self.fill_fifo(fifo)?;
                self.open(
                    &fifo.path,
                    flags,
                    &format!("FIFO {} for fd {fd_no}", fifo.path),
                )
            }
            Some(Kind::Pipe(pipe)) => self.pipe_end(pipe.pipe_id, flags, fd_no),
            Some(Kind::Tty(tty)) => {
                // The terminal the tree had is outside it (--shell-job): the task gets cr's.
                let path = own_terminal()?;
                log::info!(
                    "PID {}: fd {fd_no} (terminal {} at dump time) now on {path}",
                    self.pid,
                    tty.path
                );
                self.open(
                    &path,
                    flags | libc::O_NOCTTY as u32,
                    &format!("cr's terminal {path} for fd {fd_no}"),
                )
            }
            Some(Kind::Tcp(tcp)) => {
                let what = format!("TCP socket:[{}] for fd {fd_no}", tcp.inode);
                let mine = crate::tcp::socket::restore(tcp).with_context(|| what.clone())?;
                let t = self.install_from_cr(mine.as_raw_fd(), &what)?;
                self.setfl(t, flags)?;
                Ok(t)
            }
            None => bail!("file {} (fd {fd_no}) has no kind", f.id),
        }
    }

    /// Recreates an unlinked file (once per inode); returns the temporary path to open it by.
    fn ghost(&mut self, reg: &pb::RegFile, id: u32) -> Result<String> {
        let key = (reg.dev, reg.inode);
        if let Some(g) = self.ghosts.get(&key) {
            return path_str(&g.path);
        }
        let content = self
            .dir
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
        let mtime =
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(reg.mtime_ns.max(0) as u64);
        if let Err(e) = file.set_modified(mtime) {
            log::debug!("set the mtime of {shown}: {e}");
        }
        let p = path_str(&link.path)?;
        log::debug!(
            "unlinked file {} recreated at {p} ({} bytes)",
            reg.path,
            content.len()
        );
        self.ghosts.insert(key, link);
        Ok(p)
    }

    /// Puts the saved data (and capacity) of a FIFO back, through an fd of cr's own that stays
    /// open until the whole table is built.
    fn fill_fifo(&mut self, fifo: &pb::FifoFile) -> Result<()> {
        // Once per tree: another process may hold its own description of the same FIFO.
        if !self.fifos_filled.insert(fifo.pipe_id) || !self.tree.fifos_filled.insert(fifo.pipe_id) {
            return Ok(());
        }
        let mine = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo.path)
            .with_context(|| format!("open FIFO {}", fifo.path))?;
        let (data, cap) = self
            .contents
            .get(&(true, fifo.pipe_id))
            .copied()
            .unwrap_or((&[], 0));
        let fd = OwnedFd::from(mine);
        let queued = bytes_in_pipe(&fd)?;
        if queued != 0 {
            log::warn!("FIFO {} already holds {queued} bytes from someone else; the saved data goes after them", fifo.path);
        }
        refill(&fd, data, cap, &format!("FIFO {}", fifo.path))?;
        self.keep.0.push(fd.into());
        Ok(())
    }

    /// The task's end of pipe `pipe_id` for a description with `flags`: the first description
    /// of each end gets the end pipe2 made, later ones a reopen of it through /proc.
    fn pipe_end(&mut self, pipe_id: u64, flags: u32, fd_no: i32) -> Result<u64> {
        if !self.pipes.contains_key(&pipe_id) {
            let shared = match self.tree.pipes.get(&pipe_id) {
                Some(Some(sp)) => {
                    Some((sp.rd.as_raw_fd(), sp.wr.as_raw_fd(), sp.rd_used, sp.wr_used))
                }
                _ => None,
            };
            let ends = match shared {
                // Made by another process of the tree: the same pipe, already refilled.
                Some((rd, wr, rd_used, wr_used)) => {
                    let what = format!("pipe:[{pipe_id}] (shared with another process)");
                    let rd = self.install_from_cr(rd, &what)?;
                    let wr = self.install_from_cr(wr, &what)?;
                    PipeEnds {
                        rd,
                        wr,
                        rd_used,
                        wr_used,
                    }
                }
                None => self.make_pipe(pipe_id)?,
            };
            self.pipes.insert(pipe_id, ends);
        }
        let acc = flags & libc::O_ACCMODE as u32;
        let Some(ends) = self.pipes.get_mut(&pipe_id) else {
            bail!("pipe {pipe_id} vanished from the table")
        };
        // Only a reopen through /proc gives a read-write pipe description: always reopened.
        let (end, first) = if acc == libc::O_RDONLY as u32 {
            (ends.rd, !std::mem::replace(&mut ends.rd_used, true))
        } else if acc == libc::O_WRONLY as u32 {
            (ends.wr, !std::mem::replace(&mut ends.wr_used, true))
        } else {
            (ends.rd, false)
        };
        if first {
            self.setfl(end, flags)?;
            return Ok(end);
        }
        // Another description of the same end (reopened through /proc at dump time): do the same.
        self.open(
            &format!("/proc/self/fd/{end}"),
            flags,
            &format!("another description of pipe:[{pipe_id}] for fd {fd_no}"),
        )
    }

    /// pipe2 in the task, both ends moved above `base`, then refilled from cr.
    fn make_pipe(&mut self, pipe_id: u64) -> Result<PipeEnds> {
        self.r.syscall(
            "pipe2",
            libc::SYS_pipe2,
            &[self.scratch, libc::O_CLOEXEC as u64],
        )?;
        let mut b = [0u8; 8];
        self.r.read_mem(self.scratch, &mut b)?;
        let rd = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u64;
        let wr = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]) as u64;
        let rd = self.move_high(rd)?;
        let wr = self.move_high(wr)?;
        let (data, cap) = self
            .contents
            .get(&(false, pipe_id))
            .copied()
            .unwrap_or((&[], 0));
        if !data.is_empty() || cap != 0 {
            // A write end of cr's own: a new, non-blocking description of the task's pipe.
            let path = format!("/proc/{}/fd/{wr}", self.pid);
            let mine = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
                .with_context(|| format!("open {path} to refill pipe:[{pipe_id}]"))?;
            refill(
                &OwnedFd::from(mine),
                data,
                cap,
                &format!("pipe:[{pipe_id}]"),
            )?;
        }
        Ok(PipeEnds {
            rd,
            wr,
            rd_used: false,
            wr_used: false,
        })
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

/// The path of cr's own terminal (its stdin, stdout or stderr, whichever is one), which the
/// external terminal of a shell job is replaced with.
pub fn own_terminal() -> Result<String> {
    for fd in 0..3 {
        if fd::isatty(fd) {
            let p = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .with_context(|| format!("readlink /proc/self/fd/{fd}"))?;
            return path_str(&p);
        }
    }
    bail!("the image has fds on a terminal outside the dumped tree (--shell-job): run cr restore on a terminal to give them one")
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
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

/// FIONREAD: bytes waiting in a pipe.
fn bytes_in_pipe(fd: &OwnedFd) -> Result<usize> {
    Ok(fd::ioctl_int(fd, libc::FIONREAD, "FIONREAD")? as usize)
}

/// Sets a pipe's capacity and writes `data` into it through `fd` (non-blocking: data that does
/// not fit is an error, never a hang).
fn refill(fd: &OwnedFd, data: &[u8], capacity: u32, what: &str) -> Result<()> {
    if capacity != 0 {
        let cur = fd::fcntl_int(fd, libc::F_GETPIPE_SZ, 0, "F_GETPIPE_SZ").unwrap_or(-1);
        if cur != capacity as i32 {
            fd::fcntl_int(fd, libc::F_SETPIPE_SZ, capacity as i32, &format!("set the capacity of {what} to {capacity} bytes (above /proc/sys/fs/pipe-max-size needs CAP_SYS_RESOURCE)"))?;
        }
    }
    let mut f = std::fs::File::from(
        fd.try_clone()
            .with_context(|| format!("dup an fd of {what}"))?,
    );
    f.write_all(data)
        .with_context(|| format!("put the {} saved bytes back into {what}", data.len()))
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
    let mut b = FdBuilder {
        r,
        scratch,
        pid,
        dir,
        base: max_fd as u64 + 1,
        contents: pipe_contents(files),
        pipes: HashMap::new(),
        fifos_filled: HashSet::new(),
        ghosts: HashMap::new(),
        keep: Keepalive::default(),
        temps: Vec::new(),
        tree,
        cr_pidfd: None,
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
    // Pipes other processes also hold an end of: cr keeps both ends (and which ends already
    // have their first description) before the temporaries close.
    let pipe_ids: Vec<u64> = b
        .pipes
        .keys()
        .copied()
        .filter(|id| b.tree.pipes.contains_key(id))
        .collect();
    for id in pipe_ids {
        let (rd, wr, rd_used, wr_used) = {
            let e = &b.pipes[&id];
            (e.rd, e.wr, e.rd_used, e.wr_used)
        };
        let sp = match b.tree.pipes.remove(&id).flatten() {
            Some(mut sp) => {
                sp.rd_used |= rd_used;
                sp.wr_used |= wr_used;
                sp
            }
            None => SharedPipe {
                rd: b.take_into_cr(rd)?,
                wr: b.take_into_cr(wr)?,
                rd_used,
                wr_used,
            },
        };
        b.tree.pipes.insert(id, Some(sp));
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
    // Unlinked files: every description is open, the temporary names go (GhostLink's drop).
    b.ghosts.clear();
    log::debug!(
        "PID {pid}: {} fds over {} descriptions restored",
        fds.fds.len(),
        descriptions.len()
    );
    Ok(b.keep)
}
