//! TCP sockets: what a socket fd is, saving a connection with TCP_REPAIR, and rebuilding it.
//!
//! Everything here works on fds of cr's own: the dump takes a copy of the target's socket with
//! pidfd_getfd (the same socket, so repair mode set here is the target's too), and the restore
//! builds the socket in cr and hands it to the task (pidfd_getfd from the task's side).
//!
//! The order follows the kernel's rules for repair mode (as CRIU's soccr does):
//! - dump: socket options first (repair mode forces SO_REUSEADDR on), then TCP_REPAIR=1, then
//!   TCP_INFO, queue lengths, sequence numbers, MSS, timestamp, window, and the queues peeked;
//! - restore: socket, TCP_REPAIR=1, sequence numbers (only allowed while closed), bind, connect
//!   (no SYN in repair mode: the socket is established at once), TCP_REPAIR_OPTIONS, timestamp,
//!   the send queue, the receive queue, TCP_REPAIR_WINDOW (checked against rcv_nxt, so after the receive queue), then
//!   TCP_REPAIR=0 and the socket options.

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};

use crate::image::pb;
use crate::kernel::sys::fd::ioctl_int;
use crate::kernel::sys::sock::{
    self, getsockopt_bytes as getsockopt_raw, getsockopt_int as get_int,
    setsockopt_bytes as set_raw, setsockopt_int as set_int,
};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
/// TCP_REPAIR value that leaves repair mode without a window probe.
const TCP_REPAIR_OFF_NO_WP: i32 = -1;

const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u32 = 1;
const TCPI_OPT_SACK: u32 = 2;
const TCPI_OPT_WSCALE: u32 = 4;

pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_LISTEN: u32 = 10;

/// What a socket fd is, as far as cr is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SockKind {
    Established,
    Listen,
    /// Not restorable: the text says what it is.
    Other(String),
}

/// Puts the socket in (or out of) repair mode.
pub fn set_repair(fd: &OwnedFd, on: bool) -> Result<()> {
    let v = if on { 1 } else { TCP_REPAIR_OFF_NO_WP };
    set_int(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR,
        v,
        if on { "TCP_REPAIR=1" } else { "TCP_REPAIR=off" },
    )
}

/// The first bytes of TCP_INFO: (state, options, snd_wscale, rcv_wscale).
fn tcp_info(fd: &OwnedFd) -> Result<(u32, u32, u32, u32)> {
    let mut b = [0u8; 232];
    let n = getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut b, "TCP_INFO")?;
    if n < 8 {
        bail!("TCP_INFO returned only {n} bytes");
    }
    Ok((
        b[0] as u32,
        b[5] as u32,
        (b[6] & 0xf) as u32,
        (b[6] >> 4) as u32,
    ))
}

/// What the socket `fd` (a copy of cr's own) is.
pub fn classify(fd: &OwnedFd) -> Result<SockKind> {
    let st = sock::SockType::of(fd)?;
    let Some(fam) = st.inet_family().filter(|_| st.is_tcp()) else {
        return Ok(SockKind::Other(st.describe()));
    };
    let (state, ..) = tcp_info(fd)?;
    Ok(match state {
        TCP_ESTABLISHED => SockKind::Established,
        TCP_LISTEN => SockKind::Listen,
        7 => SockKind::Other(format!("an unconnected {fam} TCP socket")),
        s => SockKind::Other(format!(
            "an {fam} TCP socket in state {s} (only listening and established ones are supported)"
        )),
    })
}

/// (family, address bytes, port) of the socket's own address, or of its peer's.
fn sock_name(fd: &OwnedFd, peer: bool) -> Result<(u32, Vec<u8>, u32)> {
    let a = if peer {
        sock::peer_addr(fd)?
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOTCONN))
            .context("getpeername")?
    } else {
        sock::local_addr(fd)?
    };
    Ok((a.family as u32, a.bytes().to_vec(), a.port as u32))
}

pub use crate::kernel::sys::sock::show_addr;

/// Peeks `len` bytes of queue `queue` (the socket is in repair mode).
fn peek_queue(fd: &OwnedFd, queue: i32, len: u32, what: &str) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    set_int(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_QUEUE,
        queue,
        "TCP_REPAIR_QUEUE",
    )?;
    let mut buf = vec![0u8; len as usize];
    let n = sock::recv(fd, &mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        .with_context(|| format!("peek the {what} queue"))?;
    // Short when the queue changed meanwhile: the caller's snapshots notice and read again.
    buf.truncate(n as usize);
    Ok(buf)
}

fn queue_seq(fd: &OwnedFd, queue: i32) -> Result<u32> {
    set_int(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_QUEUE,
        queue,
        "TCP_REPAIR_QUEUE",
    )?;
    Ok(get_int(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")? as u32)
}

/// Socket options that survive a restore, read before repair mode (which forces SO_REUSEADDR).
fn save_options(fd: &OwnedFd, s: &mut pb::TcpSocket) -> Result<()> {
    s.reuseaddr = get_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")? != 0;
    s.reuseport = get_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT")? != 0;
    s.keepalive = get_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE")? != 0;
    s.nodelay = get_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY")? != 0;
    s.sndbuf = get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF")? as u32;
    s.rcvbuf = get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, "SO_RCVBUF")? as u32;
    if s.family == libc::AF_INET6 as u32 {
        s.v6only = get_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")? != 0;
    }
    Ok(())
}

/// The addresses and options of a socket, before anything that changes it.
pub fn describe(fd: &OwnedFd, inode: u64, kind: &SockKind) -> Result<pb::TcpSocket> {
    let (family, src_addr, src_port) = sock_name(fd, false)?;
    let mut s = pb::TcpSocket {
        inode,
        family,
        src_addr,
        src_port,
        ..Default::default()
    };
    if *kind == SockKind::Established {
        let (_, dst_addr, dst_port) = sock_name(fd, true)?;
        s.dst_addr = dst_addr;
        s.dst_port = dst_port;
        s.state = TCP_ESTABLISHED;
    } else {
        s.state = TCP_LISTEN;
    }
    save_options(fd, &mut s)?;
    Ok(s)
}

/// Listening sockets: the backlog (sock_diag's idiag_wqueue) and a note about connections not
/// yet accepted, which are lost as in CRIU.
pub fn save_listen(fd: &OwnedFd, s: &mut pb::TcpSocket) -> Result<()> {
    let pending = ioctl_int(fd, SIOCINQ, "SIOCINQ").unwrap_or(0);
    s.backlog = crate::kernel::sys::sock_diag::backlog(s.family, s.inode).unwrap_or_else(|e| {
        log::warn!(
            "backlog of listening socket {} unknown ({e:#}); using 128",
            show_addr(s.family, &s.src_addr, s.src_port)
        );
        128
    });
    if pending != 0 {
        log::warn!(
            "listening socket {} has {pending} connection(s) not yet accepted: they are lost",
            show_addr(s.family, &s.src_addr, s.src_port)
        );
    }
    Ok(())
}

/// (send queue, unsent, receive queue, send seq, receive seq, window) at one moment.
type Snapshot = (u32, u32, u32, u32, u32, Vec<u32>);

fn queue_snapshot(fd: &OwnedFd) -> Result<Snapshot> {
    let outq = ioctl_int(fd, SIOCOUTQ, "SIOCOUTQ")?;
    let unsq = ioctl_int(fd, SIOCOUTQNSD, "SIOCOUTQNSD")?;
    let inq = ioctl_int(fd, SIOCINQ, "SIOCINQ")?;
    let outq_seq = queue_seq(fd, TCP_SEND_QUEUE)?;
    let inq_seq = queue_seq(fd, TCP_RECV_QUEUE)?;
    let mut w = [0u8; 20];
    let n = getsockopt_raw(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_WINDOW,
        &mut w,
        "TCP_REPAIR_WINDOW",
    )?;
    if n != 20 {
        bail!("TCP_REPAIR_WINDOW returned {n} bytes, not 20");
    }
    let window = w
        .as_chunks::<4>()
        .0
        .iter()
        .map(|c| u32::from_ne_bytes(*c))
        .collect();
    Ok((outq, unsq, inq, outq_seq, inq_seq, window))
}

/// Saves an established connection. The socket must already be in repair mode (and locked).
pub fn save_established(fd: &OwnedFd, s: &mut pb::TcpSocket) -> Result<()> {
    let (state, opts, snd_wscale, rcv_wscale) = tcp_info(fd)?;
    if state != TCP_ESTABLISHED {
        bail!("the connection left the established state (now {state}) while being dumped");
    }
    s.opts = opts;
    s.snd_wscale = snd_wscale;
    s.rcv_wscale = rcv_wscale;
    s.mss = get_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")? as u32;
    s.timestamp = get_int(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP, "TCP_TIMESTAMP")? as u32;
    // A packet that had passed the lock before it was set may still land (an ACK shrinking the
    // send queue, data growing the receive queue): read until two snapshots around the peeks
    // agree, so lengths, sequence numbers and data describe one moment.
    let mut tries = 0;
    let (outq, unsq, inq) = loop {
        let before = queue_snapshot(fd)?;
        let (outq, unsq, inq, outq_seq, inq_seq, ref window) = before;
        s.outq = peek_queue(fd, TCP_SEND_QUEUE, outq, "send")?;
        s.inq = peek_queue(fd, TCP_RECV_QUEUE, inq, "receive")?;
        if queue_snapshot(fd)? == before
            && s.outq.len() == outq as usize
            && s.inq.len() == inq as usize
        {
            s.outq_seq = outq_seq;
            s.inq_seq = inq_seq;
            s.window = window.clone();
            s.unsq_len = unsq;
            break (outq, unsq, inq);
        }
        tries += 1;
        if tries > 100 {
            bail!("the queues kept changing while locked and in repair mode");
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    log::debug!(
        "TCP {} -> {}: snd seq {:#x} ({} queued, {} unsent), rcv seq {:#x} ({} queued), mss {}, opts {:#x}, wscale {}/{}",
        show_addr(s.family, &s.src_addr, s.src_port),
        show_addr(s.family, &s.dst_addr, s.dst_port),
        s.outq_seq,
        outq,
        unsq,
        s.inq_seq,
        inq,
        s.mss,
        s.opts,
        s.snd_wscale,
        s.rcv_wscale
    );
    Ok(())
}

fn new_socket(family: u32) -> Result<OwnedFd> {
    sock::socket(
        family as i32,
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
        libc::IPPROTO_TCP,
        "SOCK_STREAM",
    )
}

fn bind(fd: &OwnedFd, family: u32, addr: &[u8], port: u32, what: &str) -> Result<()> {
    sock::bind(fd, family, addr, port)
        .with_context(|| format!("bind {what} to {}", show_addr(family, addr, port)))
}

/// Writes `data` into the current repair queue (or, out of repair, sends it), all of it.
fn send_all(fd: &OwnedFd, data: &[u8], what: &str) -> Result<()> {
    let mut off = 0;
    while off < data.len() {
        let n = sock::send(fd, &data[off..], libc::MSG_NOSIGNAL).with_context(|| {
            format!(
                "refill the {what} queue ({} of {} bytes in)",
                off,
                data.len()
            )
        })?;
        if n == 0 {
            bail!("refill the {what} queue: the kernel took no bytes");
        }
        off += n;
    }
    Ok(())
}

fn restore_options(fd: &OwnedFd, s: &pb::TcpSocket) -> Result<()> {
    set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        s.reuseaddr as i32,
        "SO_REUSEADDR",
    )?;
    set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEPORT,
        s.reuseport as i32,
        "SO_REUSEPORT",
    )?;
    set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        s.keepalive as i32,
        "SO_KEEPALIVE",
    )?;
    set_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        s.nodelay as i32,
        "TCP_NODELAY",
    )?;
    Ok(())
}

/// Buffer sizes: getsockopt reports twice what was asked for; restore asks for half. Only
/// when they differ from a fresh socket's, so autotuned sockets stay autotuned.
fn restore_buffers(fd: &OwnedFd, s: &pb::TcpSocket) -> Result<()> {
    let cur_snd = get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF")? as u32;
    let cur_rcv = get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, "SO_RCVBUF")? as u32;
    if s.sndbuf != 0 && s.sndbuf != cur_snd && s.sndbuf < cur_snd {
        set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (s.sndbuf / 2) as i32,
            "SO_SNDBUF",
        )?;
    }
    if s.rcvbuf != 0 && s.rcvbuf != cur_rcv && s.rcvbuf < cur_rcv {
        set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (s.rcvbuf / 2) as i32,
            "SO_RCVBUF",
        )?;
    }
    Ok(())
}

/// Rebuilds a socket in cr; the caller installs it in the task.
pub fn restore(s: &pb::TcpSocket) -> Result<OwnedFd> {
    let src = show_addr(s.family, &s.src_addr, s.src_port);
    let fd = new_socket(s.family)?;
    if s.family == libc::AF_INET6 as u32 {
        set_int(
            &fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            s.v6only as i32,
            "IPV6_V6ONLY",
        )?;
    }
    match s.state {
        TCP_LISTEN => {
            // Repair mode for the bind only: it forces address reuse, so a restored connection
            // on the same port (restored before or after) does not make the bind fail.
            set_repair(&fd, true)?;
            bind(&fd, s.family, &s.src_addr, s.src_port, "listening socket")?;
            set_repair(&fd, false)?;
            restore_options(&fd, s).with_context(|| format!("listening socket {src}"))?;
            sock::listen(&fd, s.backlog as i32)
                .with_context(|| format!("listen on {src} (backlog {})", s.backlog))?;
            restore_buffers(&fd, s)?;
            log::debug!("listening socket {src} restored (backlog {})", s.backlog);
        }
        TCP_ESTABLISHED => {
            let dst = show_addr(s.family, &s.dst_addr, s.dst_port);
            restore_established(&fd, s)
                .with_context(|| format!("TCP connection {src} -> {dst}"))?;
            restore_options(&fd, s).with_context(|| format!("TCP connection {src} -> {dst}"))?;
            restore_buffers(&fd, s)?;
            log::debug!("TCP connection {src} -> {dst} restored");
        }
        st => bail!(
            "TCP socket {src} in state {st}: cr restores only listening and established sockets"
        ),
    }
    Ok(fd)
}

fn restore_established(fd: &OwnedFd, s: &pb::TcpSocket) -> Result<()> {
    set_repair(fd, true)?;
    let set_seq = |queue: i32, seq: u32| -> Result<()> {
        set_int(
            fd,
            libc::IPPROTO_TCP,
            TCP_REPAIR_QUEUE,
            queue,
            "TCP_REPAIR_QUEUE",
        )?;
        set_int(
            fd,
            libc::IPPROTO_TCP,
            TCP_QUEUE_SEQ,
            seq as i32,
            "TCP_QUEUE_SEQ",
        )
    };
    set_seq(TCP_RECV_QUEUE, s.inq_seq.wrapping_sub(s.inq.len() as u32))?;
    set_seq(TCP_SEND_QUEUE, s.outq_seq.wrapping_sub(s.outq.len() as u32))?;
    bind(fd, s.family, &s.src_addr, s.src_port, "connection")?;
    sock::connect(fd, s.family, &s.dst_addr, s.dst_port).context("connect in repair mode")?;
    let mut opts: Vec<(u32, u32)> = vec![(TCPOPT_MAXSEG, s.mss)];
    if s.opts & TCPI_OPT_WSCALE != 0 {
        opts.push((TCPOPT_WINDOW, s.snd_wscale | (s.rcv_wscale << 16)));
    }
    if s.opts & TCPI_OPT_SACK != 0 {
        opts.push((TCPOPT_SACK_PERM, 0));
    }
    if s.opts & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push((TCPOPT_TIMESTAMP, 0));
    }
    let raw: Vec<u8> = opts
        .iter()
        .flat_map(|(c, v)| c.to_ne_bytes().into_iter().chain(v.to_ne_bytes()))
        .collect();
    set_raw(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_OPTIONS,
        &raw,
        "TCP_REPAIR_OPTIONS",
    )?;
    if s.opts & TCPI_OPT_TIMESTAMPS != 0 {
        set_int(
            fd,
            libc::IPPROTO_TCP,
            TCP_TIMESTAMP,
            s.timestamp as i32,
            "TCP_TIMESTAMP",
        )?;
    }
    // The whole send queue goes in as sent and awaiting an ACK: the retransmit timer sends it
    // once repair mode is off. (Sending the unsent tail normally would put packets on the wire
    // before the peer of a local connection exists again, and earn an RST.)
    set_int(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_QUEUE,
        TCP_SEND_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    send_all(fd, &s.outq, "send")?;
    set_int(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_QUEUE,
        TCP_RECV_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    send_all(fd, &s.inq, "receive")?;
    if s.window.len() == 5 {
        let raw: Vec<u8> = s.window.iter().flat_map(|v| v.to_ne_bytes()).collect();
        set_raw(
            fd,
            libc::IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            &raw,
            "TCP_REPAIR_WINDOW",
        )?;
    }
    // No window probe: the peer may not exist yet (a connection within the restored tree).
    set_repair(fd, false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_shown() {
        let mut a6 = [0u8; 16];
        a6[15] = 1;
        assert_eq!(show_addr(libc::AF_INET6 as u32, &a6, 443), "[::1]:443");
        assert_eq!(
            show_addr(libc::AF_INET as u32, &[127, 0, 0, 1], 8080),
            "127.0.0.1:8080"
        );
    }
}
