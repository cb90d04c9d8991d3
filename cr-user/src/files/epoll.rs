//! epoll instances and their interest lists.
//!
//! Dump: every `tfd:` line of fdinfo is an entry keyed by (target file, fd number `tfd`). The
//! target file need not be at fd `tfd` any more (closed, the file living on through a dup) nor
//! in this process at all (registered by a child that alone holds it): kcmp(KCMP_EPOLL_TFD)
//! finds an fd of the tree that is the target, trying fd `tfd` first, then the fds with the
//! target's inode in this process, then in the other processes of the tree. Entries sharing a
//! `tfd` are told apart by their rank among those (`toff`, the order fdinfo lists them in).
//!
//! Restore: the task makes the epoll (epoll_create1); once every fd of a process is in place
//! (`fixup`), each entry is added with EPOLL_CTL_ADD under its own `tfd`: when the target sits
//! elsewhere it is dup'ed to `tfd` for the call (what was there is put back after), so the
//! key is the dumped one. An entry whose target is in another process is added by that
//! process (which is built later and holds the same epoll). A fired EPOLLONESHOT entry (only
//! the private bits left) is added armed for everything and fired by one epoll_wait while it
//! is the epoll's only ready entry, so it comes back disarmed exactly as it was (EPOLL_CTL_ADD
//! alone would add EPOLLERR|EPOLLHUP).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::proc;
use crate::kernel::sys::kcmp;
use crate::refusal::Refusal;

pub struct Epoll;

/// Bits the kernel keeps in a fired one-shot entry (EP_PRIVATE_BITS).
const PRIVATE_BITS: u32 =
    (libc::EPOLLWAKEUP | libc::EPOLLONESHOT | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32;

/// Every event a file can be ready for (EPOLLERR|EPOLLHUP are always added by the kernel).
const ALL_EVENTS: u32 = (libc::EPOLLIN
    | libc::EPOLLOUT
    | libc::EPOLLPRI
    | libc::EPOLLRDNORM
    | libc::EPOLLRDBAND
    | libc::EPOLLWRNORM
    | libc::EPOLLWRBAND
    | libc::EPOLLMSG
    | libc::EPOLLRDHUP) as u32;

/// Dump: the fds of each process of the tree with the inode of their file, listed once.
#[derive(Default)]
struct FdInodes(HashMap<i32, Vec<(i32, u64)>>);

impl FdInodes {
    fn of(&mut self, pid: i32) -> Result<&[(i32, u64)]> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.0.entry(pid) {
            let mut v = Vec::new();
            for (fd, _) in proc::fdinfo::list_fds(pid)
                .with_context(|| format!("listing the fds of PID {pid}"))?
            {
                if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")) {
                    v.push((fd, m.ino()));
                }
            }
            slot.insert(v);
        }
        Ok(&self.0[&pid])
    }
}

/// An fd of the tree (pid, fd) that is the target of entry (`tfd`, `toff`) of the epoll at fd
/// `efd` of `pid`.
fn find_target(
    cx: &mut DumpCx,
    pid: i32,
    efd: i32,
    t: &proc::fdinfo::EpollTarget,
    toff: u32,
) -> Result<Option<(i32, i32)>> {
    if kcmp::epoll_target_is(pid, t.tfd, pid, efd, t.tfd, toff) {
        return Ok(Some((pid, t.tfd)));
    }
    let others: Vec<i32> = cx.tree.iter().copied().filter(|&p| p != pid).collect();
    for q in std::iter::once(pid).chain(others) {
        let fds: Vec<i32> = cx
            .scratch
            .get::<FdInodes>()
            .of(q)?
            .iter()
            .filter(|&&(_, ino)| ino == t.ino)
            .map(|&(fd, _)| fd)
            .collect();
        for fd in fds {
            if kcmp::epoll_target_is(q, fd, pid, efd, t.tfd, toff) {
                return Ok(Some((q, fd)));
            }
        }
    }
    Ok(None)
}

impl FileKind for Epoll {
    fn name(&self) -> &'static str {
        "an epoll instance"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok((p.target == "anon_inode:[eventpoll]").then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, cx: &mut DumpCx) -> Result<Kind> {
        let mut entries = Vec::new();
        let mut rank: HashMap<i32, u32> = HashMap::new();
        for t in p.info.epoll_targets()? {
            let toff = rank.entry(t.tfd).or_default();
            let off = *toff;
            *toff += 1;
            let Some((target_pid, target_fd)) = find_target(cx, p.pid, p.fd, &t, off)? else {
                return Err(Refusal::new(format!(
                    "PID {}: fd {} is an epoll instance with an entry for fd {} (inode {}) whose file is open at no fd of the dumped tree (held through a mapping, or in flight in a socket); cr cannot name it at restore",
                    p.pid, p.fd, t.tfd, t.ino
                ))
                .into());
            };
            entries.push(pb::EpollEntry {
                tfd: t.tfd,
                events: t.events,
                data: t.data,
                target_pid,
                target_fd,
            });
        }
        Ok(Kind::Epoll(pb::EpollFile { entries }))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Epoll(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        matches!(k, Kind::Epoll(_)).then(|| "epoll".into())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        if !matches!(f.kind, Some(Kind::Epoll(_))) {
            bail!("internal: file {} is not an epoll instance", f.id)
        }
        let fd = o
            .remote()
            .syscall("epoll_create1", libc::SYS_epoll_create1, &[0])
            .with_context(|| format!("make the epoll instance of fd {fd_no}"))?;
        let fd = o.move_high(fd)?;
        o.setfl(fd, flags)?;
        o.local().get::<Created>().0.push(f.id);
        Ok(fd)
    }

    fn fixup(&self, o: &mut Opener) -> Result<()> {
        let pid = o.pid();
        let created = o.local().take::<Created>().0;
        let mut here: Vec<(u32, pb::EpollEntry)> = Vec::new();
        let mut elsewhere: Vec<(i32, u32, pb::EpollEntry)> = Vec::new();
        for id in &created {
            let Some(Kind::Epoll(ep)) = o
                .files()
                .files
                .iter()
                .find(|f| f.id == *id)
                .and_then(|f| f.kind.as_ref())
            else {
                bail!("internal: epoll file {id} vanished from files.img");
            };
            for e in &ep.entries {
                if e.target_pid == pid || e.target_pid == 0 {
                    here.push((*id, *e));
                } else {
                    elsewhere.push((e.target_pid, *id, *e));
                }
            }
        }
        let pending = o.tree().get::<Pending>();
        for (q, id, e) in elsewhere {
            if pending.done.contains(&q) {
                bail!(
                    "epoll file {id} (PID {pid}) has an entry for fd {} whose file only PID {q} holds, and PID {q} is restored before it: cr cannot add that entry",
                    e.tfd
                );
            }
            pending.by_pid.entry(q).or_default().push((id, e));
        }
        let theirs = pending.by_pid.remove(&pid).unwrap_or_default();
        pending.done.insert(pid);
        let fresh: HashSet<u32> = created.into_iter().collect();
        add_all(o, &here, &fresh)?;
        add_all(o, &theirs, &HashSet::new())
    }
}

/// Restore, per process: the epolls this process made (file ids).
#[derive(Default)]
struct Created(Vec<u32>);

/// Restore, tree-wide: entries to add in a later process (which holds their target), and the
/// processes whose fds are done.
#[derive(Default)]
struct Pending {
    by_pid: HashMap<i32, Vec<(u32, pb::EpollEntry)>>,
    done: HashSet<i32>,
}

/// Adds `entries` ((epoll file id, entry)) in the task; `fresh`: epolls with no entry yet, in
/// which a fired one-shot entry can be fired again alone.
fn add_all(o: &mut Opener, entries: &[(u32, pb::EpollEntry)], fresh: &HashSet<u32>) -> Result<()> {
    let disarmed = |e: &pb::EpollEntry| {
        e.events & libc::EPOLLONESHOT as u32 != 0 && e.events & !PRIVATE_BITS == 0
    };
    // Disarmed one-shots first, while their epoll has no other entry that could be ready.
    let order = entries
        .iter()
        .filter(|(_, e)| disarmed(e))
        .chain(entries.iter().filter(|(_, e)| !disarmed(e)));
    for (id, e) in order {
        let epfd = o
            .fds()
            .fds
            .iter()
            .find(|f| f.file_id == *id)
            .map(|f| f.fd)
            .with_context(|| {
                format!(
                    "PID {}: epoll file {id} is at no fd of this process",
                    o.pid()
                )
            })?;
        let what = format!(
            "epoll fd {epfd}: entry for fd {} (events {:#x}, data {:#x})",
            e.tfd, e.events, e.data
        );
        with_target_at(o, e, |o| {
            if disarmed(e) {
                add_disarmed(o, epfd, e, fresh.contains(id), &what)
            } else {
                ctl(o, epfd, libc::EPOLL_CTL_ADD, e.tfd, e.events, e.data)
            }
        })
        .with_context(|| format!("add {what}"))?;
    }
    Ok(())
}

/// A fired one-shot entry: added for every event and fired once, alone, by epoll_wait, which
/// leaves only its private bits; when its target is ready for nothing (or the epoll is not
/// fresh), it is set to the private bits instead, with EPOLLERR|EPOLLHUP that the kernel adds.
fn add_disarmed(
    o: &mut Opener,
    epfd: i32,
    e: &pb::EpollEntry,
    fresh: bool,
    what: &str,
) -> Result<()> {
    if fresh {
        ctl(
            o,
            epfd,
            libc::EPOLL_CTL_ADD,
            e.tfd,
            e.events | ALL_EVENTS,
            e.data,
        )?;
        let buf = o.scratch() + 64;
        let n = o.remote().syscall(
            "epoll_wait",
            libc::SYS_epoll_wait,
            &[epfd as u64, buf, 1, 0],
        )?;
        if n == 1 {
            let mut ev = [0u8; 12];
            o.remote().read_mem(buf, &mut ev)?;
            let data = u64::from_ne_bytes(ev[4..12].try_into().expect("8 bytes"));
            if data != e.data {
                log::warn!("{what}: re-firing it reported data {data:#x} instead");
            }
            return Ok(());
        }
        ctl(o, epfd, libc::EPOLL_CTL_MOD, e.tfd, e.events, e.data)?;
    } else {
        ctl(o, epfd, libc::EPOLL_CTL_ADD, e.tfd, e.events, e.data)?;
    }
    log::info!("{what}: a fired one-shot entry comes back with EPOLLERR|EPOLLHUP armed");
    Ok(())
}

/// Remote epoll_ctl(epfd, op, fd, {events, data}).
fn ctl(o: &mut Opener, epfd: i32, op: i32, fd: i32, events: u32, data: u64) -> Result<()> {
    // struct epoll_event is packed on x86-64: u32 events, u64 data.
    let mut ev = [0u8; 12];
    ev[..4].copy_from_slice(&events.to_ne_bytes());
    ev[4..].copy_from_slice(&data.to_ne_bytes());
    let at = o.scratch();
    o.remote().write_mem(at, &ev)?;
    o.remote().syscall(
        "epoll_ctl",
        libc::SYS_epoll_ctl,
        &[epfd as u64, op as u64, fd as u64, at],
    )?;
    Ok(())
}

/// Runs `f` with the entry's target file at fd `tfd` (its key): dup'ed there for the call
/// when it sits at another fd, what was at `tfd` saved above the table and put back after.
fn with_target_at(
    o: &mut Opener,
    e: &pb::EpollEntry,
    f: impl FnOnce(&mut Opener) -> Result<()>,
) -> Result<()> {
    if e.target_fd == e.tfd {
        return f(o);
    }
    let occupant = o
        .fds()
        .fds
        .iter()
        .find(|x| x.fd == e.tfd)
        .map(|x| x.cloexec);
    let base = o.base();
    let saved = match occupant {
        Some(_) => Some(o.remote().syscall(
            "fcntl(F_DUPFD_CLOEXEC)",
            libc::SYS_fcntl,
            &[e.tfd as u64, libc::F_DUPFD_CLOEXEC as u64, base],
        )?),
        None => None,
    };
    o.remote().syscall(
        "dup3",
        libc::SYS_dup3,
        &[e.target_fd as u64, e.tfd as u64, libc::O_CLOEXEC as u64],
    )?;
    let r = f(o);
    match (saved, occupant) {
        (Some(s), Some(cloexec)) => {
            let fl = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
            o.remote()
                .syscall("dup3", libc::SYS_dup3, &[s, e.tfd as u64, fl])?;
            o.remote().syscall("close", libc::SYS_close, &[s])?;
        }
        _ => {
            o.remote()
                .syscall("close", libc::SYS_close, &[e.tfd as u64])?;
        }
    }
    r
}
