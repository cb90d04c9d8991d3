//! Pipes and FIFOs. Unread data is copied with tee(2), which leaves it in the pipe (a dump with
//! --leave-running changes nothing), once per pipe and process.
//!
//! Restore: a pipe is made by the task (pipe2); cr refills it through a write end of its own
//! opened via /proc, non-blocking, after growing it to the dumped capacity. A pipe with ends in
//! several processes is made by the first and taken by the others from cr. A FIFO is held open
//! read-write by cr while the task opens its ends (so no open blocks and the refilled data
//! stays in the buffer) until the tree runs.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, FdKind, Probe};
use super::scratch::Scratch;
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::sys::fd;
use crate::kernel::sys::pidfd::pidfd_getfd;

/// Anonymous pipes.
pub struct Pipe;

/// Named pipes.
pub struct Fifo;

/// Dump, per process: pipes and FIFOs whose data is saved already (by (dev, ino)), and which
/// ends of each pipe the process holds (read, write).
#[derive(Default)]
struct Saved {
    data: HashSet<(u64, u64)>,
    ends: HashMap<u64, (bool, bool)>,
}

/// Restore, per process: the task's two ends of each pipe at temporary fds, and whether each
/// has been handed to a description already.
#[derive(Default)]
struct Made(HashMap<u64, PipeEnds>);

struct PipeEnds {
    rd: u64,
    wr: u64,
    rd_used: bool,
    wr_used: bool,
}

/// Restore, tree-wide: pipes with ends in more than one process, and cr's copy of both ends
/// once created.
#[derive(Default)]
struct Shared(HashMap<u64, Option<SharedPipe>>);

struct SharedPipe {
    rd: OwnedFd,
    wr: OwnedFd,
    rd_used: bool,
    wr_used: bool,
}

/// Restore, tree-wide: FIFOs whose saved data is back already (by any process).
#[derive(Default)]
struct FifosFilled(HashSet<u64>);

/// Saves the unread data of the pipe or FIFO behind `p`, once per process.
fn save_data(p: &Probe, cx: &mut DumpCx, what: &str) -> Result<(Vec<u8>, u32)> {
    let key = (p.meta.dev(), p.meta.ino());
    if !cx.scratch.get::<Saved>().data.insert(key) {
        return Ok((Vec::new(), 0));
    }
    let src = readable_end(p.pidfd, p.pid, p.fd, p.info.flags)?;
    peek_pipe(&src, what)
}

impl FileKind for Pipe {
    fn name(&self) -> &'static str {
        "a pipe"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok(matches!(p.class, FdKind::Pipe).then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, cx: &mut DumpCx) -> Result<Kind> {
        let pipe_id = p.meta.ino();
        let ends = cx.scratch.get::<Saved>().ends.entry(pipe_id).or_default();
        if p.info.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
            ends.1 = true;
        } else {
            ends.0 = true;
        }
        let what = format!("pipe {} (fd {} of PID {})", p.target, p.fd, p.pid);
        let (data, capacity) = save_data(p, cx, &what)?;
        Ok(Kind::Pipe(pb::PipeFile {
            pipe_id,
            data,
            capacity,
        }))
    }

    fn dumped_process(&self, cx: &mut DumpCx) {
        let pid = cx.pid;
        for (ino, (rd, wr)) in &cx.scratch.get::<Saved>().ends {
            if !(rd & wr) {
                log::warn!(
                    "PID {pid}: only the {} end of pipe:[{ino}] is in the dumped tree; after restore its other end is gone",
                    if *rd { "read" } else { "write" }
                );
            }
        }
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Pipe(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        match k {
            Kind::Pipe(p) => Some(format!("pipe:{}", p.pipe_id)),
            _ => None,
        }
    }

    fn plan(&self, tables: &[&pb::Fds], files: &pb::Files, tree: &mut Scratch) {
        let by_id: HashMap<u32, &pb::FileEntry> = files.files.iter().map(|f| (f.id, f)).collect();
        let mut users: HashMap<u64, usize> = HashMap::new();
        for t in tables {
            let mut pipes: HashSet<u64> = HashSet::new();
            for f in &t.fds {
                if let Some(Kind::Pipe(p)) = by_id.get(&f.file_id).and_then(|f| f.kind.as_ref()) {
                    pipes.insert(p.pipe_id);
                }
            }
            for p in pipes {
                *users.entry(p).or_default() += 1;
            }
        }
        tree.put(Shared(
            users
                .into_iter()
                .filter(|&(_, n)| n > 1)
                .map(|(id, _)| (id, None))
                .collect(),
        ));
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Pipe(pipe)) = &f.kind else {
            bail!("internal: file {} is not a pipe", f.id)
        };
        pipe_end(o, pipe.pipe_id, flags, fd_no)
    }

    /// Pipes other processes also hold an end of: cr keeps both ends (and which ends already
    /// have their first description) before the temporaries close.
    fn opened(&self, o: &mut Opener) -> Result<()> {
        let made = o.local().take::<Made>();
        let mut shared = o.tree().take::<Shared>();
        let r = (|| -> Result<()> {
            let ids: Vec<u64> = made
                .0
                .keys()
                .copied()
                .filter(|id| shared.0.contains_key(id))
                .collect();
            for id in ids {
                let e = &made.0[&id];
                let sp = match shared.0.remove(&id).flatten() {
                    Some(mut sp) => {
                        sp.rd_used |= e.rd_used;
                        sp.wr_used |= e.wr_used;
                        sp
                    }
                    None => SharedPipe {
                        rd: o.take_into_cr(e.rd)?,
                        wr: o.take_into_cr(e.wr)?,
                        rd_used: e.rd_used,
                        wr_used: e.wr_used,
                    },
                };
                shared.0.insert(id, Some(sp));
            }
            Ok(())
        })();
        o.tree().put(shared);
        o.local().put(made);
        r
    }
}

/// The task's end of pipe `pipe_id` for a description with `flags`: the first description
/// of each end gets the end pipe2 made, later ones a reopen of it through /proc.
fn pipe_end(o: &mut Opener, pipe_id: u64, flags: u32, fd_no: i32) -> Result<u64> {
    if !o.local().get::<Made>().0.contains_key(&pipe_id) {
        let shared = match o.tree().get::<Shared>().0.get(&pipe_id) {
            Some(Some(sp)) => Some((sp.rd.as_raw_fd(), sp.wr.as_raw_fd(), sp.rd_used, sp.wr_used)),
            _ => None,
        };
        let ends = match shared {
            // Made by another process of the tree: the same pipe, already refilled.
            Some((rd, wr, rd_used, wr_used)) => {
                let what = format!("pipe:[{pipe_id}] (shared with another process)");
                let rd = o.install_from_cr(rd, &what)?;
                let wr = o.install_from_cr(wr, &what)?;
                PipeEnds {
                    rd,
                    wr,
                    rd_used,
                    wr_used,
                }
            }
            None => make_pipe(o, pipe_id)?,
        };
        o.local().get::<Made>().0.insert(pipe_id, ends);
    }
    let acc = flags & libc::O_ACCMODE as u32;
    let Some(ends) = o.local().get::<Made>().0.get_mut(&pipe_id) else {
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
        o.setfl(end, flags)?;
        return Ok(end);
    }
    // Another description of the same end (reopened through /proc at dump time): do the same.
    o.open(
        &format!("/proc/self/fd/{end}"),
        flags,
        &format!("another description of pipe:[{pipe_id}] for fd {fd_no}"),
    )
}

/// pipe2 in the task, both ends moved above the image's fds, then refilled from cr.
fn make_pipe(o: &mut Opener, pipe_id: u64) -> Result<PipeEnds> {
    let scratch = o.scratch();
    o.remote()
        .syscall("pipe2", libc::SYS_pipe2, &[scratch, libc::O_CLOEXEC as u64])?;
    let mut b = [0u8; 8];
    o.remote().read_mem(scratch, &mut b)?;
    let rd = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let wr = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]) as u64;
    let rd = o.move_high(rd)?;
    let wr = o.move_high(wr)?;
    let (data, cap) = saved(o.files(), false, pipe_id);
    if !data.is_empty() || cap != 0 {
        // A write end of cr's own: a new, non-blocking description of the task's pipe.
        let path = format!("/proc/{}/fd/{wr}", o.pid());
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

impl FileKind for Fifo {
    fn name(&self) -> &'static str {
        "a FIFO"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok(matches!(p.class, FdKind::Fifo { .. }).then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, cx: &mut DumpCx) -> Result<Kind> {
        let FdKind::Fifo { path } = &p.class else {
            bail!("internal: fd {} is not a FIFO", p.fd)
        };
        let what = format!("FIFO {path} (fd {} of PID {})", p.fd, p.pid);
        let (data, capacity) = save_data(p, cx, &what)?;
        Ok(Kind::Fifo(pb::FifoFile {
            path: path.clone(),
            pipe_id: p.meta.ino(),
            data,
            capacity,
        }))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Fifo(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        match k {
            Kind::Fifo(p) => Some(format!("fifo:{}", p.pipe_id)),
            _ => None,
        }
    }

    fn validate(&self, k: &Kind) -> Result<()> {
        let Kind::Fifo(p) = k else { return Ok(()) };
        let meta =
            std::fs::metadata(&p.path).with_context(|| format!("FIFO {} is gone", p.path))?;
        if !meta.file_type().is_fifo() {
            bail!("{} is no longer a FIFO", p.path);
        }
        Ok(())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Fifo(fifo)) = &f.kind else {
            bail!("internal: file {} is not a FIFO", f.id)
        };
        fill_fifo(o, fifo)?;
        o.open(
            &fifo.path,
            flags,
            &format!("FIFO {} for fd {fd_no}", fifo.path),
        )
    }
}

/// Puts the saved data (and capacity) of a FIFO back, through an fd of cr's own that stays
/// open until the whole tree runs.
fn fill_fifo(o: &mut Opener, fifo: &pb::FifoFile) -> Result<()> {
    // Once per tree: another process may hold its own description of the same FIFO.
    if !o.tree().get::<FifosFilled>().0.insert(fifo.pipe_id) {
        return Ok(());
    }
    let mine = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo.path)
        .with_context(|| format!("open FIFO {}", fifo.path))?;
    let (data, cap) = saved(o.files(), true, fifo.pipe_id);
    let fd = OwnedFd::from(mine);
    let what = format!("FIFO {}", fifo.path);
    let queued = bytes_in_pipe(&fd, &what)?;
    if queued != 0 {
        log::warn!("FIFO {} already holds {queued} bytes from someone else; the saved data goes after them", fifo.path);
    }
    refill(&fd, data, cap, &what)?;
    o.keep(fd.into());
    Ok(())
}

/// The saved (data, capacity) of a pipe (or FIFO), from whichever entries carry them.
fn saved(files: &pb::Files, fifo: bool, pipe_id: u64) -> (&[u8], u32) {
    let mut out: (&[u8], u32) = (&[], 0);
    for f in &files.files {
        let (data, cap) = match &f.kind {
            Some(Kind::Pipe(p)) if !fifo && p.pipe_id == pipe_id => (p.data.as_slice(), p.capacity),
            Some(Kind::Fifo(p)) if fifo && p.pipe_id == pipe_id => (p.data.as_slice(), p.capacity),
            _ => continue,
        };
        if !data.is_empty() {
            out.0 = data;
        }
        if cap != 0 {
            out.1 = cap;
        }
    }
    out
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

/// fcntl(fd, cmd, arg) on one of cr's own fds, as a Result.
fn fcntl(fd: &OwnedFd, cmd: i32, arg: i32, what: &str) -> Result<i32> {
    fd::fcntl_int(fd, cmd, arg, what)
}

/// FIONREAD: bytes waiting in a pipe.
fn bytes_in_pipe(fd: &OwnedFd, what: &str) -> Result<usize> {
    Ok(fd::ioctl_int(fd, libc::FIONREAD, &format!("FIONREAD on {what}"))? as usize)
}

/// A pipe of cr's own with room for `capacity` bytes, both ends non-blocking.
fn pipe_pair(capacity: i32) -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) =
        fd::pipe2(libc::O_CLOEXEC | libc::O_NONBLOCK).context("pipe2 for a copy of pipe data")?;
    fcntl(
        &w,
        libc::F_SETPIPE_SZ,
        capacity,
        &format!("F_SETPIPE_SZ {capacity} on cr's copy pipe"),
    )?;
    Ok((r, w))
}

/// A readable fd of cr's own on the pipe or FIFO behind fd `fd` of `pid`: a duplicate of the
/// very description when it is readable, else a new read end opened through /proc (the target
/// is frozen, so the brief extra reader changes nothing it can see).
fn readable_end(pidfd: &OwnedFd, pid: i32, fd: i32, flags: u32) -> Result<OwnedFd> {
    if flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32 {
        return pidfd_getfd(pidfd, fd);
    }
    let path = format!("/proc/{pid}/fd/{fd}");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("open {path} to read the pipe's buffer"))?;
    Ok(f.into())
}

/// Copies the unread bytes of a pipe/FIFO without consuming them (tee into a pipe of cr's own
/// of the same capacity, then read that). Returns (data, pipe capacity).
fn peek_pipe(src: &OwnedFd, what: &str) -> Result<(Vec<u8>, u32)> {
    let cap = fcntl(
        src,
        libc::F_GETPIPE_SZ,
        0,
        &format!("F_GETPIPE_SZ on {what}"),
    )?;
    let queued = bytes_in_pipe(src, what)?;
    if queued == 0 {
        return Ok((Vec::new(), cap as u32));
    }
    // Same capacity, hence the same number of buffer slots: tee can copy every buffer.
    let (r, w) = pipe_pair(cap)?;
    let n = fd::tee(src, &w, queued, libc::SPLICE_F_NONBLOCK)
        .with_context(|| format!("tee from {what}"))?;
    if n != queued {
        bail!("{what} holds {queued} unread bytes but tee copied only {n}");
    }
    let mut data = vec![0u8; queued];
    let mut f = std::fs::File::from(r);
    f.read_exact(&mut data)
        .with_context(|| format!("read the copy of {what}'s buffer"))?;
    Ok((data, cap as u32))
}
