//! Recreating the fd table: each open file description once (remote openat / pipe2), then dup'd
//! to every fd number that shared it, with its offset and flags.
//!
//! Descriptions are first opened at temporary numbers above every fd of the image, then moved
//! into place with dup3, so an fd number the kernel hands out can never clobber one already
//! restored.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::image::dir::ImageDir;
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::ptrace::Remote;

use super::memory::put_str;

/// Checks, before anything is created, that every file the image refers to is still there as it
/// was: a vanished file or one whose size changed is an error naming it.
pub fn validate(files: &pb::Files, vmas: &[pb::Vma]) -> Result<()> {
    for f in &files.files {
        match &f.kind {
            Some(Kind::Reg(r)) if !r.unlinked => {
                let meta = std::fs::metadata(&r.path).with_context(|| format!("file {} (open at dump time) is gone", r.path))?;
                if meta.is_file() && meta.size() != r.size {
                    bail!("file {} changed size since the dump ({} bytes then, {} now)", r.path, r.size, meta.size());
                }
            }
            Some(Kind::Reg(r)) => {
                let dir = Path::new(&r.path).parent().unwrap_or(Path::new("/"));
                if !dir.is_dir() {
                    bail!("directory {} of the unlinked file {} is gone", dir.display(), r.path);
                }
            }
            Some(Kind::Fifo(p)) => {
                let meta = std::fs::metadata(&p.path).with_context(|| format!("FIFO {} is gone", p.path))?;
                if !meta.file_type().is_fifo() {
                    bail!("{} is no longer a FIFO", p.path);
                }
            }
            Some(Kind::Chr(c)) => {
                std::fs::metadata(&c.path).with_context(|| format!("device {} is gone", c.path))?;
            }
            Some(Kind::Pipe(_)) => {}
            None => bail!("files.img: entry {} has no kind (image from a newer cr?)", f.id),
        }
    }
    for v in vmas {
        if v.flags & libc::MAP_ANONYMOUS as u32 != 0 || crate::image::vma::is_special(v.kind) {
            continue;
        }
        let meta = std::fs::metadata(&v.path).with_context(|| format!("mapped file {} (at {:#x}) is gone", v.path, v.start))?;
        if meta.size() != v.file_size {
            bail!("mapped file {} changed size since the dump ({} bytes then, {} now)", v.path, v.file_size, meta.size());
        }
    }
    Ok(())
}

/// State kept until the fd table is complete (FIFO writers that keep data alive).
#[derive(Default)]
pub struct Keepalive(Vec<std::fs::File>);

fn fcntl_setfl(r: &mut Remote, fd: u64, flags: u32) -> Result<()> {
    // Only these can be changed with F_SETFL; access mode and creation flags cannot.
    let settable = (libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME) as u32;
    r.syscall("fcntl(F_SETFL)", libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, (flags & settable) as u64])?;
    Ok(())
}

/// Rebuilds the fd table of `pid`.
pub fn restore_fds(r: &mut Remote, scratch: u64, pid: i32, dir: &ImageDir, fds: &pb::Fds, files: &pb::Files) -> Result<Keepalive> {
    let by_id: HashMap<u32, &pb::FileEntry> = files.files.iter().map(|f| (f.id, f)).collect();
    let base = fds.fds.iter().map(|f| f.fd).max().unwrap_or(0) as u64 + 1;
    let pidfd = crate::sys::pidfd::pidfd_open(pid)?;
    let mut keep = Keepalive::default();
    // Temporary fd of each description, and the spare pipe ends nobody claimed.
    let mut temp: HashMap<u32, u64> = HashMap::new();
    let mut pipes: HashMap<u64, (Option<u64>, Option<u64>)> = HashMap::new();
    let mut to_close: Vec<u64> = Vec::new();
    let to_high = |r: &mut Remote, fd: u64| -> Result<u64> {
        let hi = r.syscall("fcntl(F_DUPFD_CLOEXEC)", libc::SYS_fcntl, &[fd, libc::F_DUPFD_CLOEXEC as u64, base])?;
        r.syscall("close", libc::SYS_close, &[fd])?;
        Ok(hi)
    };
    for fd in &fds.fds {
        if temp.contains_key(&fd.file_id) {
            continue;
        }
        let f = by_id.get(&fd.file_id).with_context(|| format!("fd {} refers to file {} missing from files.img", fd.fd, fd.file_id))?;
        let open_flags = f.flags & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) as u32);
        let tfd = match &f.kind {
            Some(Kind::Reg(reg)) => {
                let path = if reg.unlinked { recreate_unlinked(dir, reg, f.id)? } else { reg.path.clone() };
                let p = put_str(r, scratch, 0, &path)?;
                let res = r.syscall("openat", libc::SYS_openat, &[libc::AT_FDCWD as u64, p, open_flags as u64, 0]);
                if reg.unlinked {
                    let _ = std::fs::remove_file(&path);
                }
                let t = res.with_context(|| format!("open {} for fd {}", reg.path, fd.fd))?;
                if f.pos != 0 {
                    r.syscall("lseek", libc::SYS_lseek, &[t, f.pos, libc::SEEK_SET as u64])
                        .with_context(|| format!("seek {} to {} for fd {}", reg.path, f.pos, fd.fd))?;
                }
                to_high(r, t)?
            }
            Some(Kind::Chr(c)) => {
                let p = put_str(r, scratch, 0, &c.path)?;
                let t = r
                    .syscall("openat", libc::SYS_openat, &[libc::AT_FDCWD as u64, p, open_flags as u64, 0])
                    .with_context(|| format!("open {} for fd {}", c.path, fd.fd))?;
                to_high(r, t)?
            }
            Some(Kind::Fifo(fifo)) => {
                // cr holds the FIFO open read-write while the task opens its end, so the open
                // does not block and the saved data stays in the buffer.
                let mut mine = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo.path)
                    .with_context(|| format!("open FIFO {}", fifo.path))?;
                if !fifo.data.is_empty() {
                    mine.write_all(&fifo.data).with_context(|| format!("refill FIFO {}", fifo.path))?;
                }
                keep.0.push(mine);
                let p = put_str(r, scratch, 0, &fifo.path)?;
                let t = r
                    .syscall("openat(fifo)", libc::SYS_openat, &[libc::AT_FDCWD as u64, p, open_flags as u64, 0])
                    .with_context(|| format!("open FIFO {} for fd {}", fifo.path, fd.fd))?;
                to_high(r, t)?
            }
            Some(Kind::Pipe(pipe)) => {
                let ends = match pipes.get(&pipe.pipe_id) {
                    Some(e) => *e,
                    None => {
                        r.syscall("pipe2", libc::SYS_pipe2, &[scratch, libc::O_CLOEXEC as u64])?;
                        let mut b = [0u8; 8];
                        r.read_mem(scratch, &mut b)?;
                        let rd = i32::from_ne_bytes(b[0..4].try_into().expect("4")) as u64;
                        let wr = i32::from_ne_bytes(b[4..8].try_into().expect("4")) as u64;
                        let (rd, wr) = (to_high(r, rd)?, to_high(r, wr)?);
                        // Refill the buffer through a copy of the write end taken into cr.
                        let mine = crate::sys::pidfd::pidfd_getfd(&pidfd, wr as i32)?;
                        if pipe.capacity != 0 {
                            // SAFETY: fcntl on our own fd (a copy of the task's pipe end).
                            if unsafe { libc::fcntl(mine.as_raw_fd(), libc::F_SETPIPE_SZ, pipe.capacity as i32) } < 0 {
                                return Err(std::io::Error::last_os_error()).with_context(|| format!("set pipe capacity {}", pipe.capacity));
                            }
                        }
                        if !pipe.data.is_empty() {
                            let mut w = std::fs::File::from(mine);
                            w.write_all(&pipe.data).context("refill a pipe")?;
                        }
                        (Some(rd), Some(wr))
                    }
                };
                let reading = (f.flags & libc::O_ACCMODE as u32) == libc::O_RDONLY as u32;
                let (rd, wr) = ends;
                let t = if reading { rd } else { wr };
                let Some(t) = t else {
                    bail!("pipe {} has two descriptions of one end (fd {}): not supported", pipe.pipe_id, fd.fd);
                };
                pipes.insert(pipe.pipe_id, if reading { (None, wr) } else { (rd, None) });
                fcntl_setfl(r, t, f.flags)?;
                t
            }
            None => bail!("file {} has no kind", f.id),
        };
        temp.insert(fd.file_id, tfd);
    }
    for (rd, wr) in pipes.values() {
        to_close.extend(rd.iter().chain(wr.iter()));
    }
    for fd in &fds.fds {
        let t = temp[&fd.file_id];
        let flags = if fd.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        r.syscall("dup3", libc::SYS_dup3, &[t, fd.fd as u64, flags]).with_context(|| format!("install fd {}", fd.fd))?;
    }
    for t in temp.values().chain(to_close.iter()) {
        r.syscall("close(temp)", libc::SYS_close, &[*t])?;
    }
    Ok(keep)
}

/// Recreates an unlinked file's content next to its old path; returns the temporary path
/// (removed again once the task has it open).
fn recreate_unlinked(dir: &ImageDir, reg: &pb::RegFile, id: u32) -> Result<String> {
    let content = dir.read_blob(&reg.content)?;
    let path = format!("{}.cr-unlinked-{id}", reg.path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(reg.mode & 0o7777)
        .open(&path)
        .with_context(|| format!("recreate the unlinked file {} at {path}", reg.path))?;
    f.write_all(&content).with_context(|| format!("write {path}"))?;
    Ok(path)
}
