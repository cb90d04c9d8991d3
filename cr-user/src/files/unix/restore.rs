//! Rebuilding every UNIX socket of the tree at once ([`TreeFiles::build_unix`]), after the
//! processes exist (clean stopped copies of cr at their PIDs) and before any is rebuilt.
//!
//! The calls that decide SO_PEERCRED run inside the process that holds the socket (the first
//! of the tree in order): socketpair there; an accepted connection through a temporary
//! listener at the accepted socket's name, listened on by its holder and connected to by the
//! peer's (so each side's SO_PEERCRED names the other's process); listeners listen there, and
//! waiting connections connect from their own process, in queue order. cr keeps a copy of
//! each socket (pidfd_getfd) and does the rest on it: queues refilled from the peer (a
//! datagram from the socket bound to its sender's address, or an unnamed one), with each
//! message's credentials; then shutdown states and options; names whose path was unlinked
//! are unlinked again. The processes' own fds go with their `close_range` at rebuild.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{bail, Context, Result};

use super::dump::SO_PASSPIDFD;
use super::{show_name, type_name, TCP_ESTABLISHED, TCP_LISTEN};
use crate::files::opener::TreeFiles;
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::proc::maps::{read_maps, VmaName};
use crate::kernel::ptrace::inject::{read_mem, write_mem};
use crate::kernel::ptrace::{locate_syscall, Remote, Tracee};
use crate::kernel::sys::pidfd::{pidfd_getfd, pidfd_open};
use crate::kernel::sys::sock::{self, setsockopt_bytes, setsockopt_int};
use crate::kernel::sys::unix::{
    accept, bind_name, connect_name, send_queued, shutdown, sockaddr_un,
};

/// cr's copy of every UNIX socket of the tree, by file id (the tree's kind state).
#[derive(Default)]
pub struct Built {
    pub socks: HashMap<u32, OwnedFd>,
}

/// A process of the tree, for remote calls before it is rebuilt.
struct Task<'a> {
    t: &'a mut Tracee,
    ip: u64,
    scratch: u64,
    pidfd: OwnedFd,
}

struct Tasks<'a>(HashMap<i32, Task<'a>>);

impl<'a> Tasks<'a> {
    fn new(tasks: &'a mut HashMap<i32, Tracee>, needed: &HashSet<i32>) -> Result<Tasks<'a>> {
        let mut m = HashMap::new();
        for (&pid, t) in tasks.iter_mut() {
            if !needed.contains(&pid) {
                continue;
            }
            let vdso = read_maps(pid)?
                .into_iter()
                .find(|v| v.name == VmaName::Vdso)
                .context("the new task has no vDSO: cr needs it for remote syscalls")?;
            let ip = locate_syscall(pid, vdso.start, vdso.end)?;
            let mut r = Remote::new(t, ip)?;
            let scratch = r.scratch(4096)?.addr;
            r.forget_scratch();
            r.finish()?;
            let pidfd = pidfd_open(pid)?;
            m.insert(
                pid,
                Task {
                    t,
                    ip,
                    scratch,
                    pidfd,
                },
            );
        }
        Ok(Tasks(m))
    }

    fn task(&mut self, pid: i32) -> Result<&mut Task<'a>> {
        self.0
            .get_mut(&pid)
            .with_context(|| format!("internal: PID {pid} was not created"))
    }

    fn call(&mut self, pid: i32, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        let task = self.task(pid)?;
        let mut r = Remote::new(task.t, task.ip)?;
        let v = r.syscall(what, nr, args)?;
        r.finish()?;
        Ok(v)
    }

    fn socket(&mut self, pid: i32, ty: u32) -> Result<u64> {
        let ty = ty as i32 | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        self.call(
            pid,
            "socket(AF_UNIX)",
            libc::SYS_socket,
            &[libc::AF_UNIX as u64, ty as u64, 0],
        )
    }

    fn pair(&mut self, pid: i32, ty: u32) -> Result<(u64, u64)> {
        let s = self.task(pid)?.scratch;
        let ty = ty as i32 | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        self.call(
            pid,
            "socketpair(AF_UNIX)",
            libc::SYS_socketpair,
            &[libc::AF_UNIX as u64, ty as u64, 0, s],
        )?;
        let mut b = [0u8; 8];
        read_mem(pid, s, &mut b)?;
        let a = i32::from_ne_bytes(b[..4].try_into()?);
        let c = i32::from_ne_bytes(b[4..].try_into()?);
        Ok((a as u64, c as u64))
    }

    /// bind or connect (`nr`) of the task's fd `fd` to `name`.
    fn addr_call(&mut self, pid: i32, what: &str, nr: i64, fd: u64, name: &[u8]) -> Result<()> {
        let a = sockaddr_un(name)?;
        let s = self.task(pid)?.scratch;
        write_mem(pid, s, &a)?;
        self.call(pid, what, nr, &[fd, s, a.len() as u64])
            .with_context(|| format!("{what} to {}", show_name(name)))?;
        Ok(())
    }

    fn take(&mut self, pid: i32, fd: u64) -> Result<OwnedFd> {
        pidfd_getfd(&self.task(pid)?.pidfd, fd as i32)
    }
}

fn is_path(name: &[u8]) -> bool {
    name.first().is_some_and(|&c| c != 0)
}

fn path_of(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Frees path `name` for a bind: a socket file no socket is bound to any more (a connect
/// says ECONNREFUSED) is removed. Returns whether such a file was there. A live socket's
/// file, or a file of another type, is an error naming it.
fn prepare_name(name: &[u8]) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    if !is_path(name) {
        return Ok(false);
    }
    let path = path_of(name);
    let m = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("stat {path}")),
    };
    if !m.file_type().is_socket() {
        bail!(
            "{path} exists and is not a socket: the UNIX socket bound there cannot be bound again"
        );
    }
    let probe = sock::socket(
        libc::AF_UNIX,
        libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
        0,
        "probe",
    )?;
    match connect_name(&probe, name) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(&path)
                .with_context(|| format!("remove the stale socket file {path}"))?;
            Ok(true)
        }
        _ => bail!(
            "{path} is bound by a live socket: the UNIX socket bound there cannot be bound again"
        ),
    }
}

/// Sends one queued message from `from` (to `to`, when its receiver is not `from`'s peer).
fn send_message(from: impl AsFd, m: &pb::UnixMessage, to: Option<&[u8]>, what: &str) -> Result<()> {
    let creds = m.has_creds.then_some((m.pid, m.uid, m.gid));
    let mut off = 0;
    loop {
        let r = match send_queued(&from, &m.data[off..], to, creds) {
            Err(e)
                if creds.is_some()
                    && matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::EPERM)) =>
            {
                log::warn!(
                    "{what}: a message's sender (PID {}) is gone: queued with cr's credentials",
                    m.pid
                );
                send_queued(&from, &m.data[off..], to, None)
            }
            r => r,
        };
        let n = r.with_context(|| format!("{what}: queue a message of {} bytes", m.data.len()))?;
        off += n;
        if off >= m.data.len() {
            return Ok(());
        }
        if n == 0 {
            bail!("{what}: the queue took {off} of {} bytes", m.data.len());
        }
    }
}

fn timeval(us: u64) -> Vec<u8> {
    let mut b = ((us / 1_000_000) as i64).to_ne_bytes().to_vec();
    b.extend_from_slice(&((us % 1_000_000) as i64).to_ne_bytes());
    b
}

impl TreeFiles {
    /// Makes every UNIX socket of the image (see the module's docs). `tasks`: every process
    /// of the tree, created and stopped; `tables`: their fd tables in tree order.
    pub fn build_unix(
        &mut self,
        tasks: &mut HashMap<i32, Tracee>,
        tables: &[(i32, &pb::Fds)],
        files: &pb::Files,
    ) -> Result<()> {
        let socks: Vec<(u32, &pb::UnixSocket)> = files
            .files
            .iter()
            .filter_map(|f| match &f.kind {
                Some(Kind::Unix(u)) => Some((f.id, u)),
                _ => None,
            })
            .collect();
        if socks.is_empty() {
            return Ok(());
        }
        let ids: HashSet<u32> = socks.iter().map(|s| s.0).collect();
        let mut owner: HashMap<u32, i32> = HashMap::new();
        for (pid, t) in tables {
            for fd in t.fds.iter().filter(|f| ids.contains(&f.file_id)) {
                owner.entry(fd.file_id).or_insert(*pid);
            }
        }
        let needed = owner.values().copied().collect();
        let mut b = Builder {
            tk: Tasks::new(tasks, &needed)?,
            socks: &socks,
            owner,
            made: HashMap::new(),
            remote: HashMap::new(),
            unlink_after: Vec::new(),
        };
        b.build()?;
        let built = Built {
            socks: b.made.into_iter().map(|(i, fd)| (socks[i].0, fd)).collect(),
        };
        log::debug!("{} UNIX sockets built", built.socks.len());
        self.kinds.put(built);
        Ok(())
    }
}

struct Builder<'a, 's> {
    tk: Tasks<'a>,
    socks: &'s [(u32, &'s pb::UnixSocket)],
    owner: HashMap<u32, i32>,
    /// cr's copy, by index in `socks`.
    made: HashMap<usize, OwnedFd>,
    /// The fd in its holder (until the holder is rebuilt).
    remote: HashMap<usize, (i32, u64)>,
    unlink_after: Vec<String>,
}

impl<'s> Builder<'_, 's> {
    fn u(&self, i: usize) -> &'s pb::UnixSocket {
        self.socks[i].1
    }

    fn owner(&self, i: usize) -> Result<i32> {
        self.owner
            .get(&self.socks[i].0)
            .copied()
            .with_context(|| format!("UNIX socket (file {}) is held by no fd", self.socks[i].0))
    }

    fn what(&self, i: usize) -> String {
        let u = self.u(i);
        format!(
            "UNIX {} socket:[{}] ({})",
            type_name(u.r#type),
            u.inode,
            show_name(&u.name)
        )
    }

    fn mine(&self, i: usize) -> Result<&OwnedFd> {
        self.made
            .get(&i)
            .with_context(|| format!("internal: {} not made", self.what(i)))
    }

    fn build(&mut self) -> Result<()> {
        let n = self.socks.len();
        let by_ino: HashMap<u64, usize> = (0..n).map(|i| (self.u(i).inode, i)).collect();
        let waiting: HashSet<u64> = (0..n)
            .flat_map(|i| self.u(i).waiting.iter().map(|w| w.client))
            .collect();
        let listener_names: HashSet<&[u8]> = (0..n)
            .filter(|&i| self.u(i).state == TCP_LISTEN)
            .map(|i| self.u(i).name.as_slice())
            .collect();
        let mut done: HashSet<usize> = HashSet::new();
        // Sockets whose peer is gone: the other end of their pair, kept for the queue.
        let mut ghosts: HashMap<usize, OwnedFd> = HashMap::new();
        // 1. Pairs and accepted connections.
        for i in 0..n {
            let u = self.u(i);
            if done.contains(&i) || u.state == TCP_LISTEN || waiting.contains(&u.inode) {
                continue;
            }
            if u.peer == 0 {
                if u.state == TCP_ESTABLISHED && u.r#type != libc::SOCK_DGRAM as u32 {
                    let p = self.owner(i)?;
                    let (a, g) = self.tk.pair(p, u.r#type)?;
                    self.made.insert(i, self.tk.take(p, a)?);
                    self.remote.insert(i, (p, a));
                    ghosts.insert(i, self.tk.take(p, g)?);
                    if !u.name.is_empty() {
                        log::warn!("{}: its name is lost (its peer closed)", self.what(i));
                    }
                    done.insert(i);
                }
                continue;
            }
            let Some(&j) = by_ino.get(&u.peer) else {
                continue;
            };
            let q = self.u(j);
            if q.peer != u.inode || done.contains(&j) || q.r#type != u.r#type {
                continue;
            }
            if u.name.is_empty() && q.name.is_empty() {
                let p = self.owner(i)?;
                let (a, c) = self.tk.pair(p, u.r#type)?;
                self.made.insert(i, self.tk.take(p, a)?);
                self.made.insert(j, self.tk.take(p, c)?);
                self.remote.insert(i, (p, a));
                self.remote.insert(j, (p, c));
            } else if u.r#type == libc::SOCK_DGRAM as u32 {
                continue; // bound below, connected in step 3
            } else {
                let (srv, cli) = if q.name.is_empty()
                    || (!u.name.is_empty() && listener_names.contains(u.name.as_slice()))
                {
                    (i, j)
                } else {
                    (j, i)
                };
                self.accepted(srv, cli).with_context(|| {
                    format!("reconnect {} and {}", self.what(srv), self.what(cli))
                })?;
            }
            done.insert(i);
            done.insert(j);
        }
        // 2. Everything else: made, bound, listening.
        for i in 0..n {
            if done.contains(&i) {
                continue;
            }
            let u = self.u(i);
            let p = self.owner(i)?;
            let fd = self.tk.socket(p, u.r#type)?;
            if !u.name.is_empty() {
                prepare_name(&u.name)?;
                self.tk
                    .addr_call(p, "bind", libc::SYS_bind, fd, &u.name)
                    .with_context(|| self.what(i))?;
                if u.name_unlinked {
                    self.unlink_after.push(path_of(&u.name));
                }
            }
            if u.state == TCP_LISTEN {
                self.tk
                    .call(p, "listen", libc::SYS_listen, &[fd, u.backlog as u64])
                    .with_context(|| self.what(i))?;
            }
            self.made.insert(i, self.tk.take(p, fd)?);
            self.remote.insert(i, (p, fd));
        }
        // 3. Connections waiting in listeners, in order; connected datagram sockets.
        for l in 0..n {
            let lu = self.u(l);
            for w in &lu.waiting {
                let Some(&c) = by_ino.get(&w.client) else {
                    log::warn!(
                        "{}: a waiting connection's client is not in the image: lost",
                        self.what(l)
                    );
                    continue;
                };
                let (p, fd) = self.remote[&c];
                self.tk
                    .addr_call(p, "connect", libc::SYS_connect, fd, &lu.name)
                    .with_context(|| format!("{} waiting in {}", self.what(c), self.what(l)))?;
                for m in &w.queue {
                    send_message(self.mine(c)?, m, None, &self.what(c))?;
                }
            }
        }
        for i in 0..n {
            let u = self.u(i);
            if u.r#type != libc::SOCK_DGRAM as u32 || u.peer == 0 {
                continue;
            }
            let Some(&j) = by_ino.get(&u.peer) else {
                log::warn!(
                    "{}: its peer is not in the image: left unconnected",
                    self.what(i)
                );
                continue;
            };
            let q = self.u(j);
            if q.peer == u.inode && q.name.is_empty() && u.name.is_empty() {
                continue; // a socketpair
            }
            if q.name.is_empty() {
                log::warn!("{}: its peer has no name: left unconnected", self.what(i));
                continue;
            }
            let (p, fd) = self.remote[&i];
            self.tk
                .addr_call(p, "connect", libc::SYS_connect, fd, &q.name)
                .with_context(|| self.what(i))?;
        }
        // 4. Queues.
        let mut anon: Option<OwnedFd> = None;
        let mut bumped: HashSet<usize> = HashSet::new();
        let mut temps: Vec<(OwnedFd, Option<String>)> = Vec::new();
        for i in 0..n {
            let u = self.u(i);
            if u.queue.is_empty() {
                continue;
            }
            let what = self.what(i);
            let dgram = u.r#type == libc::SOCK_DGRAM as u32;
            let peer = by_ino.get(&u.peer).copied();
            if !dgram {
                let from = match (peer, ghosts.get(&i)) {
                    (_, Some(g)) => g,
                    (Some(j), None) => {
                        self.bump(j, &mut bumped)?;
                        self.mine(j)?
                    }
                    (None, None) => {
                        log::warn!(
                            "{what}: {} queued messages without a peer: lost",
                            u.queue.len()
                        );
                        continue;
                    }
                };
                for m in &u.queue {
                    send_message(from, m, None, &what)?;
                }
                continue;
            }
            for m in &u.queue {
                if let Some(j) = peer {
                    let to = if self.u(j).peer == u.inode {
                        None
                    } else if !u.name.is_empty() {
                        Some(u.name.as_slice())
                    } else {
                        log::warn!("{what}: a datagram from its peer cannot be queued again: lost");
                        continue;
                    };
                    self.bump(j, &mut bumped)?;
                    send_message(self.mine(j)?, m, to, &what)?;
                    continue;
                }
                if u.name.is_empty() {
                    log::warn!("{what}: a datagram queued on an unnamed, unconnected socket: lost");
                    continue;
                }
                let sender = (0..n).find(|&k| {
                    !m.from.is_empty()
                        && self.u(k).name == m.from
                        && self.u(k).r#type == libc::SOCK_DGRAM as u32
                });
                if let Some(k) = sender {
                    self.bump(k, &mut bumped)?;
                    send_message(self.mine(k)?, m, Some(&u.name), &what)?;
                } else if m.from.is_empty() {
                    if anon.is_none() {
                        anon = Some(sock::socket(
                            libc::AF_UNIX,
                            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                            0,
                            "an unnamed sender",
                        )?);
                    }
                    let a = anon.as_ref().context("internal")?;
                    send_message(a, m, Some(&u.name), &what)?;
                } else {
                    // Its sender is gone: a socket of cr's takes its name for the send.
                    let s = sock::socket(
                        libc::AF_UNIX,
                        libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                        0,
                        "a sender",
                    )?;
                    let existed = prepare_name(&m.from)?;
                    bind_name(&s, &m.from)
                        .with_context(|| format!("bind a sender to {}", show_name(&m.from)))?;
                    send_message(&s, m, Some(&u.name), &what)?;
                    let file = (is_path(&m.from) && !existed).then(|| path_of(&m.from));
                    temps.push((s, file));
                }
            }
        }
        for (s, file) in temps {
            drop(s);
            if let Some(f) = file {
                let _ = std::fs::remove_file(f);
            }
        }
        // 5. Shutdown states and options.
        for i in 0..n {
            let u = self.u(i);
            let what = self.what(i);
            let s = self.mine(i)?;
            let how = match u.shutdown & 3 {
                1 => Some(libc::SHUT_RD),
                2 => Some(libc::SHUT_WR),
                3 => Some(libc::SHUT_RDWR),
                _ => None,
            };
            if let Some(how) = how {
                if let Err(e) = shutdown(s, how) {
                    if e.raw_os_error() != Some(libc::ENOTCONN) {
                        return Err(e).with_context(|| format!("{what}: shutdown"));
                    }
                }
            }
            let int = |opt: i32, v: i32, name: &str| {
                setsockopt_int(s, libc::SOL_SOCKET, opt, v, name).with_context(|| what.clone())
            };
            if u.sndbuf != 0 {
                int(
                    libc::SO_SNDBUFFORCE,
                    (u.sndbuf / 2) as i32,
                    "SO_SNDBUFFORCE",
                )?;
            }
            if u.rcvbuf != 0 {
                int(
                    libc::SO_RCVBUFFORCE,
                    (u.rcvbuf / 2) as i32,
                    "SO_RCVBUFFORCE",
                )?;
            }
            for (opt, us, name) in [
                (libc::SO_RCVTIMEO, u.rcvtimeo_us, "SO_RCVTIMEO"),
                (libc::SO_SNDTIMEO, u.sndtimeo_us, "SO_SNDTIMEO"),
            ] {
                if us != 0 {
                    setsockopt_bytes(s, libc::SOL_SOCKET, opt, &timeval(us), name)
                        .with_context(|| what.clone())?;
                }
            }
            if u.rcvlowat > 1 {
                int(libc::SO_RCVLOWAT, u.rcvlowat, "SO_RCVLOWAT")?;
            }
            if u.peek_off >= 0 {
                int(libc::SO_PEEK_OFF, u.peek_off, "SO_PEEK_OFF")?;
            }
            if u.passsec {
                int(libc::SO_PASSSEC, 1, "SO_PASSSEC")?;
            }
            if u.passpidfd {
                int(SO_PASSPIDFD, 1, "SO_PASSPIDFD")?;
            }
            if u.passcred {
                int(libc::SO_PASSCRED, 1, "SO_PASSCRED")?;
            }
        }
        drop(ghosts);
        // 6. Names whose path had been unlinked.
        for p in std::mem::take(&mut self.unlink_after) {
            std::fs::remove_file(&p).with_context(|| format!("unlink {p} again"))?;
        }
        Ok(())
    }

    /// The sender `i` may queue a whole queue's worth (its dumped SO_SNDBUF is set again
    /// after the queues are full).
    fn bump(&self, i: usize, bumped: &mut HashSet<usize>) -> Result<()> {
        if bumped.insert(i) {
            setsockopt_int(
                self.mine(i)?,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                16 << 20,
                "SO_SNDBUFFORCE",
            )
            .with_context(|| self.what(i))?;
        }
        Ok(())
    }

    /// An accepted connection: `srv` (holding the listener's name) and `cli`, connected
    /// through a temporary listener at `srv`'s name in `srv`'s holder.
    fn accepted(&mut self, srv: usize, cli: usize) -> Result<()> {
        let (s, c) = (self.u(srv), self.u(cli));
        let (ps, pc) = (self.owner(srv)?, self.owner(cli)?);
        let existed = prepare_name(&s.name)?;
        let t = self.tk.socket(ps, s.r#type)?;
        self.tk.addr_call(ps, "bind", libc::SYS_bind, t, &s.name)?;
        self.tk.call(ps, "listen", libc::SYS_listen, &[t, 1])?;
        let listener = self.tk.take(ps, t)?;
        let cfd = self.tk.socket(pc, c.r#type)?;
        if !c.name.is_empty() {
            prepare_name(&c.name)?;
            self.tk
                .addr_call(pc, "bind", libc::SYS_bind, cfd, &c.name)?;
            if c.name_unlinked {
                self.unlink_after.push(path_of(&c.name));
            }
        }
        self.tk
            .addr_call(pc, "connect", libc::SYS_connect, cfd, &s.name)?;
        let sfd = accept(&listener).context("accept on the temporary listener")?;
        self.tk.call(ps, "close", libc::SYS_close, &[t])?;
        drop(listener);
        if is_path(&s.name) && (!existed || s.name_unlinked) {
            let p = path_of(&s.name);
            std::fs::remove_file(&p).with_context(|| format!("remove {p}"))?;
        }
        self.made.insert(cli, self.tk.take(pc, cfd)?);
        self.remote.insert(cli, (pc, cfd));
        self.made.insert(srv, sfd);
        Ok(())
    }
}
