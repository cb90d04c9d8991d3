//! Collecting the fd table and the open files behind it.
//!
//! Each fd points at an open file description; fds sharing one description (dup, fork) get one
//! `FileEntry` (found with kcmp), so offsets stay shared after restore. Unread pipe data is
//! copied with tee(2), which leaves it in the pipe: a dump with --leave-running changes nothing.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use anyhow::{bail, Context, Result};

use crate::image::pb;
use crate::proc;

/// Character devices that need no state beyond their path.
const PLAIN_CHAR_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// The fd table of one process and the descriptions it points at.
#[derive(Default)]
pub struct FdTable {
    pub fds: pb::Fds,
    pub files: Vec<pb::FileEntry>,
    /// Content of unlinked files: (image file name, bytes).
    pub contents: Vec<(String, Vec<u8>)>,
}

const KCMP_FILE: i32 = 0;

/// kcmp(pid, pid, KCMP_FILE, a, b) == 0: the two fds share one open file description.
fn same_description(pid: i32, a: i32, b: i32) -> Result<bool> {
    // SAFETY: kcmp takes integers only.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("kcmp(KCMP_FILE) of fds {a} and {b} of PID {pid}"));
    }
    Ok(r == 0)
}

fn pipe_pair(capacity: i32) -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: pipe2 returned two fresh fds that we own now.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own fd. Root may grow a pipe past pipe-max-size.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, capacity) } < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("F_SETPIPE_SZ {capacity}"));
    }
    Ok((r, w))
}

/// Copies the unread bytes of the pipe/FIFO behind /proc/PID/fd/FD without consuming them.
/// Returns (data, pipe capacity).
fn peek_pipe(pid: i32, fd: i32) -> Result<(Vec<u8>, u32)> {
    let path = format!("/proc/{pid}/fd/{fd}");
    // Opening a pipe through /proc gives a new read end of the same pipe.
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("open {path} to read the pipe's buffer"))?;
    // SAFETY: fcntl on our own fd.
    let cap = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("F_GETPIPE_SZ on {path}"));
    }
    let (r, w) = pipe_pair(cap)?;
    // SAFETY: tee between two pipe fds we own; no pointers.
    let n = unsafe { libc::tee(src.as_raw_fd(), w.as_raw_fd(), cap as usize, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok((Vec::new(), cap as u32));
        }
        return Err(e).with_context(|| format!("tee from {path}"));
    }
    let mut data = vec![0u8; n as usize];
    let mut got = 0;
    while got < data.len() {
        // SAFETY: reading into the unfilled tail of `data`.
        let k = unsafe { libc::read(r.as_raw_fd(), data[got..].as_mut_ptr().cast(), data.len() - got) };
        if k <= 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("read the copy of {path}'s buffer"));
        }
        got += k as usize;
    }
    Ok((data, cap as u32))
}

/// Collects the fd table of `pid`. `next_id` numbers descriptions across the whole tree.
pub fn collect(pid: i32, next_id: &mut u32, shell_job: bool) -> Result<FdTable> {
    let mut table = FdTable::default();
    let fds = proc::fdinfo::list_fds(pid).with_context(|| format!("listing the fds of PID {pid}"))?;
    // Descriptions seen so far: (fd, file id) to compare new fds against with kcmp.
    let mut seen: Vec<(i32, u32, u64)> = Vec::new();
    let mut pipes_with_data: HashMap<u64, ()> = HashMap::new();
    for (fd, target) in fds {
        let info = proc::fdinfo::read_fdinfo(pid, fd).with_context(|| format!("fd {fd} of PID {pid}"))?;
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).with_context(|| format!("stat fd {fd} ({target}) of PID {pid}"))?;
        let ino = meta.ino();
        let mut shared_with = None;
        for &(ofd, id, oino) in &seen {
            if oino == ino && same_description(pid, ofd, fd)? {
                shared_with = Some(id);
                break;
            }
        }
        if let Some(id) = shared_with {
            table.fds.fds.push(pb::Fd { fd, file_id: id, cloexec });
            continue;
        }
        let id = *next_id;
        *next_id += 1;
        let flags = info.flags & !(libc::O_CLOEXEC as u32);
        let kind = if target.starts_with("pipe:[") {
            let pipe_id = ino;
            let (data, capacity) = if pipes_with_data.insert(pipe_id, ()).is_none() { peek_pipe(pid, fd)? } else { (Vec::new(), 0) };
            pb::file_entry::Kind::Pipe(pb::PipeFile { pipe_id, data, capacity })
        } else if target.starts_with("socket:[") {
            bail!("fd {fd} of PID {pid} is a socket ({target}): sockets are not supported yet (TCP comes with --tcp-established)");
        } else if target.starts_with("anon_inode:") {
            bail!("fd {fd} of PID {pid} is {target}: this kind of file is not supported yet");
        } else if !target.starts_with('/') {
            bail!("fd {fd} of PID {pid} points at {target}: not supported");
        } else {
            let ft = meta.file_type();
            let (path, deleted) = match target.strip_suffix(" (deleted)") {
                Some(p) => (p.to_string(), true),
                None => (target.clone(), false),
            };
            if ft.is_char_device() {
                if path.starts_with("/dev/pts/") || path.starts_with("/dev/tty") || path == "/dev/console" || path == "/dev/ptmx" {
                    if !shell_job {
                        bail!("fd {fd} of PID {pid} is the terminal {path}; dump it with --shell-job (-j)");
                    }
                    bail!("fd {fd} of PID {pid} is the terminal {path}: --shell-job is not supported yet");
                }
                if !PLAIN_CHAR_DEVICES.contains(&path.as_str()) {
                    bail!("fd {fd} of PID {pid} is the device {path}: not supported");
                }
                pb::file_entry::Kind::Chr(pb::CharDev { path, rdev: meta.rdev() as u32 })
            } else if ft.is_fifo() {
                let pipe_id = ino;
                let (data, _) = if pipes_with_data.insert(pipe_id, ()).is_none() { peek_pipe(pid, fd)? } else { (Vec::new(), 0) };
                pb::file_entry::Kind::Fifo(pb::FifoFile { path, pipe_id, data })
            } else if ft.is_file() || ft.is_dir() {
                let unlinked = deleted && meta.nlink() == 0;
                let content = if unlinked {
                    let name = format!("file-{id}.img");
                    let bytes = std::fs::read(format!("/proc/{pid}/fd/{fd}"))
                        .with_context(|| format!("read the unlinked file {path} (fd {fd} of PID {pid})"))?;
                    table.contents.push((name.clone(), bytes));
                    name
                } else {
                    String::new()
                };
                pb::file_entry::Kind::Reg(pb::RegFile {
                    path,
                    size: meta.size(),
                    mode: meta.mode(),
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                    dev: meta.dev(),
                    inode: ino,
                    unlinked,
                    content,
                })
            } else {
                bail!("fd {fd} of PID {pid} ({target}) has an unsupported file type");
            }
        };
        table.files.push(pb::FileEntry { id, flags, pos: info.pos, kind: Some(kind) });
        table.fds.fds.push(pb::Fd { fd, file_id: id, cloexec });
        seen.push((fd, id, ino));
    }
    Ok(table)
}
