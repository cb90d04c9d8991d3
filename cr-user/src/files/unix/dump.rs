//! Reading a UNIX socket: what sock_diag says of it and of the tree's other sockets
//! ([`View`]), whether it can be dumped ([`recognise`]), and its entry with its queue
//! ([`dump`]).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{Context, Result};

use super::{show_name, type_name, TCP_LISTEN};
use crate::files::kind::Verdict;
use crate::files::probe::{DumpCx, Probe};
use crate::image::pb;
use crate::kernel::proc;
use crate::kernel::sys::sock::{getsockopt_bytes, getsockopt_int};
use crate::kernel::sys::sock_diag::{unix_sockets, UnixDiag};
use crate::kernel::sys::unix::{accept, peek_queue, Peeked};

/// SO_PASSPIDFD (not in every libc).
pub(super) const SO_PASSPIDFD: i32 = 76;

/// The UNIX sockets of the target's network namespace and which of them the tree holds.
pub struct View {
    diag: HashMap<u64, UnixDiag>,
    /// Socket inodes held by an fd of the tree: (pid, fd) of the first.
    held: HashMap<u64, (i32, i32)>,
    /// Sockets whose connection waits in the accept queue of a listener the tree holds.
    waiting: HashSet<u64>,
    /// Queues read by [`recognise`], used by [`dump`] (also of another process holding the
    /// socket): each is peeked once (a second peek at offset 0 would skip an empty datagram
    /// the first one marked as peeked).
    peeked: RefCell<HashMap<u64, Vec<pb::UnixMessage>>>,
    /// Listeners' waiting connections, read once: those accepted to read their data are
    /// held here until the dump ends (their clients see no reset meanwhile).
    waiting_read: RefCell<HashMap<u64, Vec<pb::UnixWaiting>>>,
    accepted: RefCell<Vec<OwnedFd>>,
}

impl View {
    fn build(pid: i32, tree: &[i32]) -> Result<View> {
        let diag: HashMap<u64, UnixDiag> = unix_sockets(pid)
            .context("list the UNIX sockets (sock_diag)")?
            .into_iter()
            .map(|d| (d.inode, d))
            .collect();
        let mut held = HashMap::new();
        for &p in tree {
            let fds =
                proc::fdinfo::list_fds(p).with_context(|| format!("listing the fds of PID {p}"))?;
            for (fd, target) in fds {
                if let Some(ino) = socket_inode(&target) {
                    held.entry(ino).or_insert((p, fd));
                }
            }
        }
        let waiting = diag
            .values()
            .filter(|d| d.state == TCP_LISTEN && held.contains_key(&d.inode))
            .flat_map(|d| d.icons.iter().copied())
            .collect();
        Ok(View {
            diag,
            held,
            waiting,
            peeked: Default::default(),
            waiting_read: Default::default(),
            accepted: Default::default(),
        })
    }

    /// What the connection from `client` has sent into its not yet accepted socket (which
    /// sock_diag does not list): the client's unread output (sk_wmem_alloc, so with the
    /// kernel's overhead; 0 when nothing waits).
    fn embryo_len(&self, client: u64) -> u32 {
        self.diag.get(&client).map_or(0, |c| c.wqueue)
    }
}

/// "socket:[N]" → N.
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The dump's view, made at its first UNIX socket.
fn view<'c>(cx: &'c DumpCx) -> Result<&'c View> {
    if cx.unix.get().is_none() {
        let v = View::build(cx.pid, cx.tree)?;
        let _ = cx.unix.set(v);
    }
    cx.unix.get().context("internal: no UNIX socket view")
}

/// Who outside the tree holds socket `ino`: " held by PID N (comm)", or "".
fn holder(ino: u64) -> String {
    let want = format!("socket:[{ino}]");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return String::new();
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for f in fds.flatten() {
            if std::fs::read_link(f.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                return format!(", held by PID {pid} ({})", comm.trim());
            }
        }
    }
    String::new()
}

fn refuse(what: String) -> Result<Verdict> {
    Ok(Verdict::Refuse {
        what,
        hint: "",
        allowed_by: None,
    })
}

/// The receive queue of `fd` (peeked; nothing consumed).
fn queue(fd: impl AsFd, d: &UnixDiag) -> Result<Vec<Peeked>> {
    peek_queue(fd, d.ty == libc::SOCK_STREAM as u32, d.shutdown & 1 != 0)
        .context("read the receive queue (MSG_PEEK)")
}

/// What the files in flight are, for a refusal.
fn in_flight(q: &[Peeked]) -> Vec<String> {
    q.iter()
        .flat_map(|m| m.fds.iter())
        .map(|f| {
            std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "?".into())
        })
        .collect()
}

/// Whether fd `p` (a UNIX socket) can be dumped: its peer is in the tree (or it waits in a
/// listener of the tree), its name is absolute, no file is in flight in its queue, and with
/// `-R` no waiting connection of a listener holds data (reading it means accepting it).
pub fn recognise(p: &Probe, cx: &DumpCx) -> Result<Verdict> {
    let v = view(cx)?;
    let ino = p.meta.ino();
    let Some(d) = v.diag.get(&ino) else {
        return refuse(
            "a UNIX socket sock_diag does not show in the process's network namespace".into(),
        );
    };
    let ty = type_name(d.ty);
    if !matches!(
        d.ty as i32,
        libc::SOCK_STREAM | libc::SOCK_DGRAM | libc::SOCK_SEQPACKET
    ) {
        return refuse(format!("a UNIX socket of type {}", d.ty));
    }
    if d.name.first().is_some_and(|&c| c != 0 && c != b'/') {
        return refuse(format!(
            "a UNIX {ty} socket bound to the relative {}: cr restores absolute names only",
            show_name(&d.name)
        ));
    }
    if d.peer != 0 && !v.held.contains_key(&d.peer) && !v.waiting.contains(&ino) {
        let peer_name = v
            .diag
            .get(&d.peer)
            .map(|q| show_name(&q.name))
            .unwrap_or_else(|| "no name".into());
        return refuse(format!(
            "a UNIX {ty} socket connected to a process outside the tree (its peer socket:[{}], {peer_name}{}{})",
            d.peer,
            holder(d.peer),
            if d.name.is_empty() { String::new() } else { format!("; this end has {}", show_name(&d.name)) }
        ));
    }
    let (_, mine) = p
        .sock
        .as_ref()
        .context("internal: a socket without its copy")?;
    if d.state == TCP_LISTEN {
        let busy: Vec<u32> = d
            .icons
            .iter()
            .map(|&c| v.embryo_len(c))
            .filter(|&n| n > 0)
            .collect();
        if cx.leave_running && !busy.is_empty() {
            return refuse(format!(
                "a UNIX {ty} listener ({}) with {} waiting connection(s) that sent data not yet read: \
                 reading it means accepting them, which only a dump that ends the tree may do; dump without -R",
                show_name(&d.name),
                busy.len(),
            ));
        }
        return Ok(Verdict::Dump);
    }
    if v.peeked.borrow().contains_key(&ino) {
        return Ok(Verdict::Dump);
    }
    let q = queue(mine, d)?;
    let fds = in_flight(&q);
    if !fds.is_empty() {
        return refuse(format!(
            "a UNIX {ty} socket with {} file(s) in flight (SCM_RIGHTS, not yet received): {}",
            fds.len(),
            fds.join(", ")
        ));
    }
    let dgram = d.ty == libc::SOCK_DGRAM as u32;
    let q = q.into_iter().map(|m| message(m, dgram)).collect();
    v.peeked.borrow_mut().insert(ino, q);
    Ok(Verdict::Dump)
}

fn message(m: Peeked, dgram: bool) -> pb::UnixMessage {
    let (has_creds, (pid, uid, gid)) = match m.creds {
        Some(c) => (true, c),
        None => (false, (0, 0, 0)),
    };
    pb::UnixMessage {
        data: m.data,
        from: if dgram { m.from } else { Vec::new() },
        has_creds,
        pid,
        uid,
        gid,
    }
}

fn timeo_us(fd: impl AsFd, opt: i32, what: &str) -> Result<u64> {
    let mut b = [0u8; 16];
    getsockopt_bytes(fd, libc::SOL_SOCKET, opt, &mut b, what)?;
    let sec = i64::from_ne_bytes(b[..8].try_into().unwrap_or_default());
    let usec = i64::from_ne_bytes(b[8..].try_into().unwrap_or_default());
    Ok((sec.max(0) as u64) * 1_000_000 + usec.max(0) as u64)
}

/// The entry of the UNIX socket at fd `p` (recognised, so the view exists).
pub fn dump(p: &Probe, cx: &mut DumpCx) -> Result<pb::UnixSocket> {
    let v = cx.unix.get().context("internal: no UNIX socket view")?;
    let ino = p.meta.ino();
    let d = v
        .diag
        .get(&ino)
        .context("internal: the socket left sock_diag")?;
    let (_, mine) = p
        .sock
        .as_ref()
        .context("internal: a socket without its copy")?;
    let int = |opt: i32, what: &str| getsockopt_int(mine, libc::SOL_SOCKET, opt, what);
    let mut u = pb::UnixSocket {
        inode: ino,
        r#type: d.ty,
        state: d.state,
        name: d.name.clone(),
        peer: d.peer,
        shutdown: d.shutdown,
        passcred: int(libc::SO_PASSCRED, "SO_PASSCRED")? != 0,
        passsec: int(libc::SO_PASSSEC, "SO_PASSSEC")? != 0,
        passpidfd: int(SO_PASSPIDFD, "SO_PASSPIDFD").unwrap_or(0) != 0,
        sndbuf: int(libc::SO_SNDBUF, "SO_SNDBUF")? as u32,
        rcvbuf: int(libc::SO_RCVBUF, "SO_RCVBUF")? as u32,
        rcvtimeo_us: timeo_us(mine, libc::SO_RCVTIMEO, "SO_RCVTIMEO")?,
        sndtimeo_us: timeo_us(mine, libc::SO_SNDTIMEO, "SO_SNDTIMEO")?,
        peek_off: int(libc::SO_PEEK_OFF, "SO_PEEK_OFF")?,
        rcvlowat: int(libc::SO_RCVLOWAT, "SO_RCVLOWAT")?,
        ..Default::default()
    };
    if u.name.first().is_some_and(|&c| c != 0) {
        let path = String::from_utf8_lossy(&u.name).into_owned();
        let same = std::fs::symlink_metadata(&path).is_ok_and(|m| {
            m.file_type().is_socket() && d.vfs.is_some_and(|(_, vino)| vino == m.ino())
        });
        u.name_unlinked = !same;
    }
    if d.state == TCP_LISTEN {
        u.backlog = d.wqueue;
        let known = v.waiting_read.borrow().get(&ino).cloned();
        u.waiting = match known {
            Some(w) => w,
            None => {
                let w = read_waiting(p, v, d, mine)?;
                v.waiting_read.borrow_mut().insert(ino, w.clone());
                w
            }
        };
    } else {
        u.queue = v
            .peeked
            .borrow()
            .get(&ino)
            .cloned()
            .context("internal: the queue was not read")?;
    }
    log::debug!(
        "fd {} of PID {}: UNIX {} socket:[{ino}] state {} {} peer {} queue {} waiting {}",
        p.fd,
        p.pid,
        type_name(d.ty),
        d.state,
        show_name(&d.name),
        d.peer,
        u.queue.len(),
        u.waiting.len()
    );
    Ok(u)
}

/// The connections waiting in listener `d` (cr's copy `mine`): when any sent data, every one
/// is accepted (in queue order) and read, and kept open until the dump ends.
fn read_waiting(p: &Probe, v: &View, d: &UnixDiag, mine: &OwnedFd) -> Result<Vec<pb::UnixWaiting>> {
    let accept_all = d.icons.iter().any(|&c| v.embryo_len(c) > 0);
    if accept_all {
        log::warn!(
            "fd {} of PID {}: accepting {} waiting connection(s) of the listener to read the data they sent; \
             if this dump fails they are lost",
            p.fd,
            p.pid,
            d.icons.len()
        );
    }
    let mut out = Vec::new();
    for &c in &d.icons {
        let q = if accept_all {
            let e: OwnedFd = accept(mine).context("accept a waiting connection")?;
            let ed = UnixDiag {
                ty: d.ty,
                ..Default::default()
            };
            let q = queue(&e, &ed)?
                .into_iter()
                .map(|m| message(m, false))
                .collect();
            v.accepted.borrow_mut().push(e);
            q
        } else {
            Vec::new()
        };
        if !v.held.contains_key(&c) {
            log::warn!(
                "fd {} of PID {}: a connection waiting in the listener ({}) from outside the tree is lost",
                p.fd,
                p.pid,
                show_name(&d.name)
            );
            continue;
        }
        out.push(pb::UnixWaiting {
            client: c,
            queue: q,
        });
    }
    Ok(out)
}
