//! The TCP socket inventory of a dump: every TCP socket of the tree with its state, from the
//! tracker's eBPF table when a tracker runs for the target ([`from_table`]: no scan), else
//! from a sock_diag scan of the tree's network namespace ([`scan`]). Both give the same type,
//! so they can be compared (tests/tests/socket_table.rs does).
//!
//! What the inventory holds: the listening, connecting and connected sockets the tree's
//! processes hold (by fd), and the connections their listeners accepted in the kernel that no
//! process accepted yet (lost at restore, as in CRIU). Not held: TIME_WAIT sockets, handshakes
//! in flight (SYN_RECV), unbound or closed sockets (TCP_CLOSE). One difference remains between
//! the sources by nature: a connection the tree closed that is still draining (FIN_WAIT*,
//! LAST_ACK, CLOSING with no fd) is in the table until it is gone, but no scan can tell whose it
//! was. A connect still in SYN_SENT is in the table only if it was bound to a port first.
//!
//! The dump's use ([`survey`], called by `DumpNet::survey` right after the freeze):
//! the inventory, and the per-fd view of the same sockets ([`fd_view`]: pidfd_getfd and
//! getsockname/getpeername/TCP_INFO, which stays the authority for TCP_REPAIR) compared; the
//! established connections held by the tree; the accepted-but-not-yet-accepted ones.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};
use cr_common::sock::{tcp_state, SockKey, AF_INET, AF_INET6, SOCK_F_CHILD};

use crate::bpf::sockets::{Seed, SockMaps};
use crate::kernel::sys::sock;
use crate::kernel::sys::sock_diag::{self as diag, DiagSock};

/// A TCP socket by address: family, local address and port, remote address and port (zero for
/// a listener). IPv4 addresses in the first 4 bytes; ports in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conn {
    pub family: u16,
    pub local: [u8; 16],
    pub lport: u16,
    pub remote: [u8; 16],
    pub rport: u16,
}

impl Conn {
    pub fn key(&self) -> SockKey {
        SockKey {
            laddr: self.local,
            raddr: self.remote,
            lport: self.lport,
            rport: self.rport,
            family: self.family,
            _pad: 0,
        }
    }

    pub fn from_key(k: &SockKey) -> Conn {
        Conn {
            family: k.family,
            local: k.laddr,
            lport: k.lport,
            remote: k.raddr,
            rport: k.rport,
        }
    }

    fn from_diag(d: &DiagSock) -> Conn {
        Conn {
            family: d.family,
            local: d.src,
            lport: d.sport,
            remote: d.dst,
            rport: d.dport,
        }
    }

    /// The address bytes as the image stores them (4 for IPv4, 16 for IPv6).
    pub fn addr_bytes(&self, remote: bool) -> Vec<u8> {
        let a = if remote { &self.remote } else { &self.local };
        if self.family == AF_INET {
            a[..4].to_vec()
        } else {
            a.to_vec()
        }
    }

    /// Whether `listener` (a listening socket's Conn) accepts connections to this one's local
    /// address and port: same family and port, same address or the wildcard.
    pub fn served_by(&self, listener: &Conn) -> bool {
        self.family == listener.family
            && self.lport == listener.lport
            && (listener.local == [0; 16] || listener.local == self.local)
    }
}

impl fmt::Display for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let local = super::socket::show_addr(
            self.family as u32,
            &self.addr_bytes(false),
            self.lport as u32,
        );
        if self.rport == 0 && self.remote == [0; 16] {
            return f.write_str(&local);
        }
        let remote = super::socket::show_addr(
            self.family as u32,
            &self.addr_bytes(true),
            self.rport as u32,
        );
        write!(f, "{local} -> {remote}")
    }
}

/// A TCP state's name, for messages.
pub fn state_name(s: u32) -> &'static str {
    match s {
        tcp_state::ESTABLISHED => "ESTABLISHED",
        tcp_state::SYN_SENT => "SYN_SENT",
        tcp_state::SYN_RECV => "SYN_RECV",
        tcp_state::FIN_WAIT1 => "FIN_WAIT1",
        tcp_state::FIN_WAIT2 => "FIN_WAIT2",
        tcp_state::TIME_WAIT => "TIME_WAIT",
        tcp_state::CLOSE => "CLOSE",
        tcp_state::CLOSE_WAIT => "CLOSE_WAIT",
        tcp_state::LAST_ACK => "LAST_ACK",
        tcp_state::LISTEN => "LISTEN",
        tcp_state::CLOSING => "CLOSING",
        tcp_state::NEW_SYN_RECV => "NEW_SYN_RECV",
        _ => "unknown",
    }
}

/// The states an inventory holds (see the module doc).
const KEPT: [u32; 8] = [
    tcp_state::ESTABLISHED,
    tcp_state::SYN_SENT,
    tcp_state::FIN_WAIT1,
    tcp_state::FIN_WAIT2,
    tcp_state::CLOSE_WAIT,
    tcp_state::LAST_ACK,
    tcp_state::LISTEN,
    tcp_state::CLOSING,
];

fn kept(state: u32) -> bool {
    KEPT.contains(&state)
}

/// A connection a listener accepted in the kernel may wait in these states for accept().
fn acceptable(state: u32) -> bool {
    state == tcp_state::ESTABLISHED || state == tcp_state::CLOSE_WAIT
}

/// One socket of the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sock {
    pub conn: Conn,
    pub state: u32,
    /// Socket inode (scan only; 0 when unknown or when no process holds it).
    pub inode: u64,
    /// A process of the tree holding it (scan), or the one that created it (table; 0 for a
    /// listener's connection or a seeded entry).
    pub pid: i32,
    /// Spawned by a listener of the tree (accepted or not).
    pub from_listener: bool,
    /// Held by an fd of the tree: known by the scan, unknown (None) in the table.
    pub held: Option<bool>,
}

/// Where an inventory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Table,
    Scan,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Table => "the tracker's socket table",
            Source::Scan => "the sock_diag scan",
        })
    }
}

/// The TCP sockets of a tree, sorted by address.
#[derive(Clone, Debug)]
pub struct Inventory {
    pub source: Source,
    pub socks: Vec<Sock>,
}

impl Inventory {
    fn new(source: Source, mut socks: Vec<Sock>) -> Inventory {
        socks.sort_by_key(|s| s.conn);
        socks.dedup_by_key(|s| s.conn);
        Inventory { source, socks }
    }

    pub fn get(&self, c: &Conn) -> Option<&Sock> {
        self.socks
            .binary_search_by_key(c, |s| s.conn)
            .ok()
            .map(|i| &self.socks[i])
    }

    /// The inventory's listener that accepts connections to `c` (exact address first).
    pub fn listener_of(&self, c: &Conn) -> Option<&Sock> {
        let ls = self
            .socks
            .iter()
            .filter(|s| s.state == tcp_state::LISTEN && c.served_by(&s.conn));
        ls.max_by_key(|s| s.conn.local != [0; 16])
    }

    /// (address, state) of every socket: what two inventories of one moment must agree on.
    pub fn states(&self) -> BTreeMap<Conn, u32> {
        self.socks.iter().map(|s| (s.conn, s.state)).collect()
    }

    /// How `self` and `other` differ, one line per socket (empty: they agree).
    pub fn diff(&self, other: &Inventory) -> Vec<String> {
        let (a, b) = (self.states(), other.states());
        let mut out = Vec::new();
        for (c, s) in &a {
            match b.get(c) {
                None => out.push(format!("{c} ({}) only in {}", state_name(*s), self.source)),
                Some(t) if t != s => out.push(format!(
                    "{c} is {} in {} but {} in {}",
                    state_name(*s),
                    self.source,
                    state_name(*t),
                    other.source
                )),
                Some(_) => {}
            }
        }
        for (c, t) in &b {
            if !a.contains_key(c) {
                out.push(format!("{c} ({}) only in {}", state_name(*t), other.source));
            }
        }
        out
    }
}

/// `root` and its descendants, now (processes that exit meanwhile are skipped).
pub use crate::kernel::proc::task::descendants as tree_of;

/// Socket inodes held by `pids`: inode → one holder.
fn socket_inodes(pids: &[i32]) -> Result<HashMap<u64, i32>> {
    let mut out = HashMap::new();
    for &pid in pids {
        let fds = crate::kernel::proc::fdinfo::list_fds(pid)
            .with_context(|| format!("listing the fds of PID {pid}"))?;
        for (_, target) in fds {
            if let Some(ino) = target
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                out.entry(ino).or_insert(pid);
            }
        }
    }
    Ok(out)
}

fn state_mask() -> u32 {
    KEPT.iter().fold(0, |m, s| m | 1 << s)
}

/// The inventory of `pids` (a tree, or any processes) from a sock_diag scan of their network
/// namespaces: the sockets they hold, and the connections waiting in their listeners.
pub fn scan(pids: &[i32]) -> Result<Inventory> {
    let inodes = socket_inodes(pids)?;
    let mut by_ns: BTreeMap<u64, i32> = BTreeMap::new();
    for &pid in pids {
        by_ns
            .entry(
                diag::netns_of(pid)
                    .with_context(|| format!("the network namespace of PID {pid}"))?,
            )
            .or_insert(pid);
    }
    let mut all: Vec<DiagSock> = Vec::new();
    for (_, pid) in by_ns {
        all.extend(diag::tcp_sockets(Some(pid), state_mask())?);
    }
    let mut socks: Vec<Sock> = all
        .iter()
        .filter(|d| kept(d.state))
        .filter_map(|d| {
            let holder = *inodes.get(&d.inode).filter(|_| d.inode != 0)?;
            Some(Sock {
                conn: Conn::from_diag(d),
                state: d.state,
                inode: d.inode,
                pid: holder,
                from_listener: false,
                held: Some(true),
            })
        })
        .collect();
    let listeners: Vec<Conn> = socks
        .iter()
        .filter(|s| s.state == tcp_state::LISTEN)
        .map(|s| s.conn)
        .collect();
    for s in socks.iter_mut().filter(|s| s.state != tcp_state::LISTEN) {
        s.from_listener = listeners.iter().any(|l| s.conn.served_by(l));
    }
    for d in all.iter().filter(|d| d.inode == 0 && acceptable(d.state)) {
        let conn = Conn::from_diag(d);
        if listeners.iter().any(|l| conn.served_by(l)) {
            socks.push(Sock {
                conn,
                state: d.state,
                inode: 0,
                pid: 0,
                from_listener: true,
                held: Some(false),
            });
        }
    }
    Ok(Inventory::new(Source::Scan, socks))
}

/// The inventory of the targets `targets` (tracker targets: tree roots) from the tracker's
/// table, or why the table cannot be trusted.
pub fn from_table(maps: &SockMaps, targets: &[u32]) -> Result<Inventory> {
    let st = maps.stats()?;
    if let Some(why) = st.unusable() {
        bail!("{why}");
    }
    let socks = maps
        .entries()?
        .into_iter()
        .filter(|(_, v)| targets.contains(&v.tgid) && kept(v.state))
        .map(|(k, v)| Sock {
            conn: Conn::from_key(&k),
            state: v.state,
            inode: 0,
            pid: v.pid as i32,
            from_listener: v.flags & SOCK_F_CHILD != 0,
            held: None,
        })
        .collect();
    Ok(Inventory::new(Source::Table, socks))
}

/// The sockets the processes `pids` hold, to seed the tracker's socket table with.
pub fn seeds(pids: &[i32]) -> Result<Vec<Seed>> {
    Ok(scan(pids)?
        .socks
        .into_iter()
        .map(|s| Seed {
            key: s.conn.key(),
            pid: s.pid.max(0) as u32,
            state: s.state,
            from_listener: s.from_listener,
        })
        .collect())
}

/// A TCP socket seen through an fd of the tree.
#[derive(Clone, Debug)]
pub struct FdSock {
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
    pub conn: Conn,
    pub state: u32,
}

/// What socket `fd` (cr's copy) is, if a TCP socket.
fn describe_fd(fd: &OwnedFd) -> Result<Option<(Conn, u32)>> {
    let st = sock::SockType::of(fd)?;
    if !st.is_tcp() {
        return Ok(None);
    }
    let domain = st.domain;
    let mut info = [0u8; 8];
    sock::getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info, "TCP_INFO")?;
    let state = info[0] as u32;
    let me = sock::local_addr(fd)?;
    let (local, lport) = (me.addr, me.port);
    let (remote, rport) = sock::peer_addr(fd)?
        .map(|a| (a.addr, a.port))
        .unwrap_or(([0; 16], 0));
    let family = if domain == libc::AF_INET {
        AF_INET
    } else {
        AF_INET6
    };
    Ok(Some((
        Conn {
            family,
            local,
            lport,
            remote,
            rport,
        },
        state,
    )))
}

/// Every TCP socket the processes `pids` hold, through their fds (pidfd_getfd into cr: the
/// processes must be frozen, or the answer is a moment's).
pub fn fd_view(pids: &[i32]) -> Result<Vec<FdSock>> {
    let mut out = Vec::new();
    for &pid in pids {
        let fds = crate::kernel::proc::fdinfo::list_fds(pid)
            .with_context(|| format!("listing the fds of PID {pid}"))?;
        let socks: Vec<(i32, u64)> = fds
            .iter()
            .filter_map(|(fd, t)| {
                Some((
                    *fd,
                    t.strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()?,
                ))
            })
            .collect();
        if socks.is_empty() {
            continue;
        }
        let pidfd = crate::kernel::sys::pidfd::pidfd_open(pid)?;
        for (fd, inode) in socks {
            let mine = crate::kernel::sys::pidfd::pidfd_getfd(&pidfd, fd)?;
            if let Some((conn, state)) =
                describe_fd(&mine).with_context(|| format!("socket fd {fd} of PID {pid}"))?
            {
                out.push(FdSock {
                    pid,
                    fd,
                    inode,
                    conn,
                    state,
                });
            }
        }
    }
    Ok(out)
}

/// Where a dump's inventory will come from: the tracker's socket table (the maps the dump
/// session got from the tracker), or nothing and why.
pub struct TableSource<'a> {
    maps: Option<&'a SockMaps>,
    why: String,
}

impl<'a> TableSource<'a> {
    /// No table: the dump scans, for this reason.
    pub fn none(why: impl Into<String>) -> TableSource<'a> {
        TableSource {
            maps: None,
            why: why.into(),
        }
    }

    /// The socket table among the maps of the tracker of `pid`, if one runs (the session has
    /// checked that it follows this very process).
    pub fn of(tracker: Option<&'a crate::bpf::maps::TrackMaps>, pid: i32) -> TableSource<'a> {
        match tracker {
            Some(m) => TableSource {
                maps: Some(&m.sockets),
                why: String::new(),
            },
            None => TableSource::none(format!("no tracker runs for PID {pid}")),
        }
    }

    /// The inventory of the tree `pids` of root `root`: the table's when it can be trusted,
    /// else a scan. Logs which, and why.
    pub fn inventory(&self, pids: &[i32], root: i32) -> Result<Inventory> {
        let why = match &self.maps {
            Some(m) => match from_table(m, &[root as u32]) {
                Ok(inv) => {
                    log::info!("TCP sockets of the tree: {} entries from the tracker's socket table (no scan)", inv.socks.len());
                    return Ok(inv);
                }
                Err(e) => format!("{e:#}"),
            },
            None => self.why.clone(),
        };
        let inv = scan(pids)?;
        log::info!(
            "TCP sockets of the tree: {} from a sock_diag scan ({why})",
            inv.socks.len()
        );
        Ok(inv)
    }
}

/// What the dump learns about the tree's TCP sockets right after the freeze.
pub struct Survey {
    /// None when the tree holds no TCP socket (then it has neither connections nor listeners
    /// with connections waiting: nothing to ask the table or to scan for).
    pub inventory: Option<Inventory>,
    /// Every TCP socket fd of the tree.
    pub fds: Vec<FdSock>,
    /// The established connections the tree holds (one fd each, for messages).
    pub established: Vec<FdSock>,
    /// Connections waiting in a listener of the tree that no process accepted: (connection,
    /// its listener).
    pub unaccepted: Vec<(Conn, Conn)>,
}

/// Builds the inventory, the per-fd view, and compares them (logging every disagreement: the
/// fd is trusted).
pub fn survey(pids: &[i32], root: i32, src: &TableSource) -> Result<Survey> {
    let fds = fd_view(pids)?;
    if fds.is_empty() {
        log::debug!("the tree holds no TCP socket");
        return Ok(Survey {
            inventory: None,
            fds,
            established: Vec::new(),
            unaccepted: Vec::new(),
        });
    }
    let inventory = src.inventory(pids, root)?;
    let mut by_conn: BTreeMap<Conn, &FdSock> = BTreeMap::new();
    for f in &fds {
        by_conn.entry(f.conn).or_insert(f);
        match inventory.get(&f.conn) {
            // An unbound socket (TCP_CLOSE) or a handshake in flight is not inventoried.
            None if !kept(f.state) => {}
            None => log::warn!(
                "fd {} of PID {}: TCP {} ({}) is not in {}: the fd is trusted",
                f.fd,
                f.pid,
                f.conn,
                state_name(f.state),
                inventory.source
            ),
            Some(s) if s.state != f.state => log::warn!(
                "fd {} of PID {}: TCP {} is {} by its fd but {} in {}: the fd is trusted",
                f.fd,
                f.pid,
                f.conn,
                state_name(f.state),
                state_name(s.state),
                inventory.source
            ),
            Some(_) => {}
        }
    }
    let held_listeners: Vec<Conn> = fds
        .iter()
        .filter(|f| f.state == tcp_state::LISTEN)
        .map(|f| f.conn)
        .collect();
    let mut unaccepted = Vec::new();
    for s in inventory
        .socks
        .iter()
        .filter(|s| !by_conn.contains_key(&s.conn))
    {
        let listener = held_listeners
            .iter()
            .filter(|l| s.conn.served_by(l))
            .max_by_key(|l| l.local != [0; 16]);
        match listener {
            Some(l) if acceptable(s.state) && s.state != tcp_state::LISTEN => {
                unaccepted.push((s.conn, *l))
            }
            _ if s.held == Some(true) => log::debug!(
                "TCP {} ({}) was held by PID {} but no fd of the tree shows it now",
                s.conn,
                state_name(s.state),
                s.pid
            ),
            _ => log::debug!(
                "TCP {} ({}) of the tree has no fd in it: closed and draining, or passed on",
                s.conn,
                state_name(s.state)
            ),
        }
    }
    let established: Vec<FdSock> = by_conn
        .values()
        .filter(|f| f.state == tcp_state::ESTABLISHED)
        .map(|f| (*f).clone())
        .collect();
    Ok(Survey {
        inventory: Some(inventory),
        fds,
        established,
        unaccepted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4], p: u16, r: [u8; 4], rp: u16) -> Conn {
        let (mut l, mut rr) = ([0u8; 16], [0u8; 16]);
        l[..4].copy_from_slice(&a);
        rr[..4].copy_from_slice(&r);
        Conn {
            family: AF_INET,
            local: l,
            lport: p,
            remote: rr,
            rport: rp,
        }
    }

    #[test]
    fn shows_connections_and_listeners() {
        assert_eq!(
            v4([127, 0, 0, 1], 80, [10, 0, 0, 2], 5000).to_string(),
            "127.0.0.1:80 -> 10.0.0.2:5000"
        );
        assert_eq!(v4([0, 0, 0, 0], 80, [0; 4], 0).to_string(), "0.0.0.0:80");
        let mut six = [0u8; 16];
        six[15] = 1;
        let c = Conn {
            family: AF_INET6,
            local: six,
            lport: 443,
            remote: [0; 16],
            rport: 0,
        };
        assert_eq!(c.to_string(), "[::1]:443");
        assert_eq!(Conn::from_key(&c.key()), c);
    }

    #[test]
    fn listeners_serve_their_address_and_the_wildcard() {
        let conn = v4([127, 0, 0, 1], 80, [127, 0, 0, 1], 5000);
        assert!(conn.served_by(&v4([127, 0, 0, 1], 80, [0; 4], 0)));
        assert!(conn.served_by(&v4([0; 4], 80, [0; 4], 0)));
        assert!(!conn.served_by(&v4([10, 0, 0, 1], 80, [0; 4], 0)));
        assert!(!conn.served_by(&v4([0; 4], 81, [0; 4], 0)));
        let inv = Inventory::new(
            Source::Scan,
            vec![
                Sock {
                    conn: v4([0; 4], 80, [0; 4], 0),
                    state: tcp_state::LISTEN,
                    inode: 1,
                    pid: 1,
                    from_listener: false,
                    held: Some(true),
                },
                Sock {
                    conn: v4([127, 0, 0, 1], 80, [0; 4], 0),
                    state: tcp_state::LISTEN,
                    inode: 2,
                    pid: 1,
                    from_listener: false,
                    held: Some(true),
                },
            ],
        );
        // The exact address wins over the wildcard.
        assert_eq!(inv.listener_of(&conn).map(|s| s.inode), Some(2));
    }

    #[test]
    fn diff_names_what_differs() {
        let s = |c, st| Sock {
            conn: c,
            state: st,
            inode: 0,
            pid: 0,
            from_listener: false,
            held: None,
        };
        let a = Inventory::new(
            Source::Table,
            vec![
                s(
                    v4([127, 0, 0, 1], 1, [127, 0, 0, 1], 2),
                    tcp_state::ESTABLISHED,
                ),
                s(v4([0; 4], 3, [0; 4], 0), tcp_state::LISTEN),
            ],
        );
        let b = Inventory::new(
            Source::Scan,
            vec![
                s(
                    v4([127, 0, 0, 1], 1, [127, 0, 0, 1], 2),
                    tcp_state::CLOSE_WAIT,
                ),
                s(v4([0; 4], 4, [0; 4], 0), tcp_state::LISTEN),
            ],
        );
        let d = a.diff(&b);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d.iter().any(|l| l.ends_with(
                "is ESTABLISHED in the tracker's socket table but CLOSE_WAIT in the sock_diag scan"
            )),
            "{d:?}"
        );
        assert!(
            d.iter()
                .any(|l| l == "0.0.0.0:3 (LISTEN) only in the tracker's socket table"),
            "{d:?}"
        );
        assert!(
            d.iter()
                .any(|l| l == "0.0.0.0:4 (LISTEN) only in the sock_diag scan"),
            "{d:?}"
        );
        assert!(a.diff(&a).is_empty());
    }

    #[test]
    fn scans_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // Not accepted: the scan finds it waiting in our listener.
        let me = std::process::id() as i32;
        let inv = scan(&[me]).unwrap();
        let lp = l.local_addr().unwrap().port();
        let cp = c.local_addr().unwrap().port();
        let listener = v4([127, 0, 0, 1], lp, [0; 4], 0);
        let client = v4([127, 0, 0, 1], cp, [127, 0, 0, 1], lp);
        let child = v4([127, 0, 0, 1], lp, [127, 0, 0, 1], cp);
        assert_eq!(inv.get(&listener).map(|s| s.state), Some(tcp_state::LISTEN));
        assert_eq!(
            inv.get(&client).map(|s| (s.state, s.held)),
            Some((tcp_state::ESTABLISHED, Some(true)))
        );
        assert_eq!(
            inv.get(&child).map(|s| (s.state, s.held, s.from_listener)),
            Some((tcp_state::ESTABLISHED, Some(false), true))
        );
        let fds = fd_view(&[me]).unwrap();
        assert!(fds
            .iter()
            .any(|f| f.conn == client && f.state == tcp_state::ESTABLISHED));
        assert!(fds
            .iter()
            .any(|f| f.conn == listener && f.state == tcp_state::LISTEN));
        assert!(!fds.iter().any(|f| f.conn == child));
    }
}
