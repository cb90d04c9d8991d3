//! sock_diag (NETLINK_SOCK_DIAG): every TCP socket of a network namespace with its state,
//! addresses, inode and owner uid ([`tcp_sockets`]; the socket inventory's scan), and the one
//! fact about a listening socket that no sockopt gives, its backlog ([`backlog`]:
//! inet_diag_msg.idiag_wqueue of a LISTEN socket is sk_max_ack_backlog).

use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

use super::sock;

/// The TCP_LISTEN state.
const TCP_LISTEN: u32 = 10;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
/// struct inet_diag_msg.
const MSG_LEN: usize = 72;

/// One TCP socket as sock_diag reports it. IPv4 addresses fill the first 4 bytes of the
/// 16-byte arrays (the rest is zero); ports in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiagSock {
    pub family: u16,
    pub state: u32,
    pub src: [u8; 16],
    pub sport: u16,
    pub dst: [u8; 16],
    pub dport: u16,
    /// 0 for a socket no process holds (not yet accepted, orphaned, TIME_WAIT).
    pub inode: u64,
    pub uid: u32,
    pub rqueue: u32,
    pub wqueue: u32,
}

/// A dump request for the TCP sockets of `family` in the states of `states` (bit per state).
fn request(family: u8, states: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + 56);
    m.extend_from_slice(&((NLMSG_HDRLEN + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(&[0u8; 48]);
    m
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn be16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

/// One inet_diag_msg.
fn parse_msg(m: &[u8]) -> Option<DiagSock> {
    if m.len() < MSG_LEN {
        return None;
    }
    Some(DiagSock {
        family: m[0] as u16,
        state: m[1] as u32,
        sport: be16_at(m, 4)?,
        dport: be16_at(m, 6)?,
        src: m.get(8..24)?.try_into().ok()?,
        dst: m.get(24..40)?.try_into().ok()?,
        rqueue: u32_at(m, 56)?,
        wqueue: u32_at(m, 60)?,
        uid: u32_at(m, 64)?,
        inode: u32_at(m, 68)? as u64,
    })
}

/// Walks the messages of one netlink reply buffer, and says whether the dump is over.
fn parse(buf: &[u8], out: &mut Vec<DiagSock>) -> Result<bool> {
    parse_with(buf, out, parse_msg)
}

/// [`parse`] with the message parser of a family.
fn parse_with<T>(buf: &[u8], out: &mut Vec<T>, msg: fn(&[u8]) -> Option<T>) -> Result<bool> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, off).unwrap_or(0) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            bail!("malformed sock_diag reply");
        }
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let err = u32_at(buf, off + NLMSG_HDRLEN).unwrap_or(0) as i32;
                if err != 0 {
                    return Err(std::io::Error::from_raw_os_error(-err))
                        .context("sock_diag request");
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(s) = msg(&buf[off + NLMSG_HDRLEN..off + len]) {
                    out.push(s);
                }
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

fn netlink_socket() -> Result<OwnedFd> {
    sock::socket(
        libc::AF_NETLINK,
        libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
        libc::NETLINK_SOCK_DIAG,
        "NETLINK_SOCK_DIAG",
    )
}

fn netns_inode(path: &str) -> Result<u64> {
    Ok(std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(path).with_context(|| format!("stat {path}"))?,
    ))
}

/// The network namespace of `pid` (its nsfs inode), to group processes by it.
pub fn netns_of(pid: i32) -> Result<u64> {
    netns_inode(&format!("/proc/{pid}/ns/net"))
}

/// A sock_diag socket in the network namespace of `pid` (a socket stays in the namespace it
/// was created in: a short-lived thread enters the target's namespace to create it, cr itself
/// stays where it is).
fn netlink_socket_of(pid: i32) -> Result<OwnedFd> {
    if netns_of(pid)? == netns_inode("/proc/self/ns/net")? {
        return netlink_socket();
    }
    let path = format!("/proc/{pid}/ns/net");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<OwnedFd> {
            let ns = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: setns on a valid namespace fd; it moves this short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("enter the network namespace of PID {pid}"));
            }
            netlink_socket()
        })
        .join()
        .unwrap_or_else(|_| {
            bail!("the thread entering the network namespace of PID {pid} panicked")
        })
    })
}

fn dump(fd: &OwnedFd, family: u8, states: u32, out: &mut Vec<DiagSock>) -> Result<()> {
    let req = request(family, states);
    sock::send(fd, &req, 0).context("send the sock_diag request")?;
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let n = sock::recv(fd, &mut buf, 0).context("read the sock_diag reply")?;
        if n == 0 || parse(&buf[..n], out)? {
            return Ok(());
        }
    }
}

/// Every IPv4 and IPv6 TCP socket in a state of `states` (bit `1 << state`) of the network
/// namespace of `pid` (cr's own when None).
pub fn tcp_sockets(pid: Option<i32>, states: u32) -> Result<Vec<DiagSock>> {
    let fd = match pid {
        Some(p) => netlink_socket_of(p)?,
        None => netlink_socket()?,
    };
    let mut out = Vec::new();
    dump(&fd, libc::AF_INET as u8, states, &mut out)?;
    dump(&fd, libc::AF_INET6 as u8, states, &mut out)?;
    Ok(out)
}

/// The backlog of the listening socket with inode `inode`.
pub fn backlog(family: u32, inode: u64) -> Result<u32> {
    let fd = netlink_socket()?;
    let mut socks = Vec::new();
    dump(&fd, family as u8, 1 << TCP_LISTEN, &mut socks)?;
    socks
        .iter()
        .find(|s| s.inode == inode)
        .map(|s| s.wqueue)
        .with_context(|| {
            format!("socket:[{inode}] not among the listening sockets sock_diag reports")
        })
}

/// One UNIX socket as sock_diag reports it (unix_diag_msg and its attributes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnixDiag {
    pub ty: u32,
    pub state: u32,
    pub inode: u64,
    /// sun_path as bound (empty: unnamed; a leading NUL: abstract).
    pub name: Vec<u8>,
    /// The bound file: (device, inode) (UNIX_DIAG_VFS).
    pub vfs: Option<(u32, u64)>,
    /// The peer's inode (0: none).
    pub peer: u64,
    /// A listener: the inodes of the sockets whose connections wait in its queue, in order.
    pub icons: Vec<u64>,
    /// A listener: the connections waiting and its backlog; otherwise bytes queued to read
    /// (a datagram socket: the first datagram's) and to be read by the peer.
    pub rqueue: u32,
    pub wqueue: u32,
    /// sk_shutdown.
    pub shutdown: u32,
}

const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_VFS: u32 = 2;
const UDIAG_SHOW_PEER: u32 = 4;
const UDIAG_SHOW_ICONS: u32 = 8;
const UDIAG_SHOW_RQLEN: u32 = 0x10;

/// One unix_diag_msg (16 bytes) and its attributes.
fn parse_unix(m: &[u8]) -> Option<UnixDiag> {
    if m.len() < 16 {
        return None;
    }
    let mut d = UnixDiag {
        ty: m[1] as u32,
        state: m[2] as u32,
        inode: u32_at(m, 4)? as u64,
        ..Default::default()
    };
    let mut off = 16;
    while off + 4 <= m.len() {
        let len = u16::from_ne_bytes([m[off], m[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([m[off + 2], m[off + 3]]) & 0x3fff;
        if len < 4 || off + len > m.len() {
            break;
        }
        let a = &m[off + 4..off + len];
        match ty {
            // A path comes with its NUL: keep the name only.
            0 if a.first().is_some_and(|&c| c != 0) => {
                d.name = a.split(|&c| c == 0).next().unwrap_or(&[]).to_vec()
            }
            0 => d.name = a.to_vec(),
            1 if a.len() >= 8 => d.vfs = Some((u32_at(a, 4)?, u32_at(a, 0)? as u64)),
            2 if a.len() >= 4 => d.peer = u32_at(a, 0)? as u64,
            3 => {
                d.icons = a
                    .as_chunks::<4>()
                    .0
                    .iter()
                    .map(|c| u32::from_ne_bytes(*c) as u64)
                    .collect()
            }
            4 if a.len() >= 8 => (d.rqueue, d.wqueue) = (u32_at(a, 0)?, u32_at(a, 4)?),
            6 if !a.is_empty() => d.shutdown = a[0] as u32,
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Some(d)
}

/// Every UNIX socket of the network namespace of `pid`.
pub fn unix_sockets(pid: i32) -> Result<Vec<UnixDiag>> {
    let fd = netlink_socket_of(pid)?;
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + 24);
    m.extend_from_slice(&((NLMSG_HDRLEN + 24) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    let show =
        UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN;
    m.extend_from_slice(&show.to_ne_bytes());
    m.extend_from_slice(&[0xffu8; 8]);
    sock::send(&fd, &m, 0).context("send the UNIX sock_diag request")?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = sock::recv(&fd, &mut buf, 0).context("read the UNIX sock_diag reply")?;
        if n == 0 || parse_with(&buf[..n], &mut out, parse_unix)? {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_reports_its_backlog() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap(),
        );
        // std listens with a backlog of 128.
        assert_eq!(backlog(libc::AF_INET as u32, ino).unwrap(), 128);
    }

    #[test]
    fn sees_a_unix_pair_and_a_listener() {
        let dir = std::env::temp_dir().join(format!("cr-diag-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        let c = std::os::unix::net::UnixStream::connect(&dir).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::io::Write;
        (&a).write_all(b"hello").unwrap();
        let ino = |fd: i32| {
            std::os::unix::fs::MetadataExt::ino(
                &std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap(),
            )
        };
        let all = unix_sockets(std::process::id() as i32).unwrap();
        let find = |i: u64| all.iter().find(|s| s.inode == i).unwrap();
        let (ia, ib) = (ino(a.as_raw_fd()), ino(b.as_raw_fd()));
        assert_eq!((find(ia).peer, find(ib).peer), (ib, ia));
        assert_eq!(find(ib).rqueue, 5);
        let ld = find(ino(l.as_raw_fd()));
        assert_eq!(ld.state, TCP_LISTEN);
        assert_eq!(ld.name, dir.as_os_str().as_encoded_bytes());
        assert_eq!(ld.icons, vec![ino(c.as_raw_fd())]);
        assert!(ld.vfs.is_some());
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn parses_an_inet_diag_msg() {
        let mut m = vec![0u8; MSG_LEN];
        m[0] = libc::AF_INET as u8;
        m[1] = 1;
        m[4..6].copy_from_slice(&8080u16.to_be_bytes());
        m[6..8].copy_from_slice(&40000u16.to_be_bytes());
        m[8..12].copy_from_slice(&[127, 0, 0, 1]);
        m[24..28].copy_from_slice(&[10, 0, 0, 2]);
        m[64..68].copy_from_slice(&1000u32.to_ne_bytes());
        m[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        let s = parse_msg(&m).unwrap();
        assert_eq!(
            (s.family, s.state, s.sport, s.dport),
            (libc::AF_INET as u16, 1, 8080, 40000)
        );
        assert_eq!(&s.src[..4], &[127, 0, 0, 1]);
        assert_eq!(&s.dst[..4], &[10, 0, 0, 2]);
        assert_eq!((s.uid, s.inode), (1000, 4242));
        assert!(parse_msg(&m[..40]).is_none());
    }

    #[test]
    fn sees_its_own_connection_both_ways() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let (cp, ap) = (
            c.local_addr().unwrap().port(),
            a.local_addr().unwrap().port(),
        );
        let all = tcp_sockets(Some(std::process::id() as i32), 1 << 1).unwrap();
        assert!(
            all.iter()
                .any(|s| s.sport == cp && s.dport == ap && s.inode != 0),
            "client side missing"
        );
        assert!(
            all.iter()
                .any(|s| s.sport == ap && s.dport == cp && s.inode != 0),
            "server side missing"
        );
    }
}
