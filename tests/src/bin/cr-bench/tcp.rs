//! The tcp section of cr-bench (issue 6): how long 100 established connections stay locked
//! across `dump --tcp-established` and `restore --tcp-established`, and the downtime their peer
//! actually sees.
//!
//! Setup: two network namespaces joined by a veth pair, created for the section and removed
//! after it (loopback in this namespace when that fails or with `--tcp-loopback`). In one, a
//! peer thread of cr-bench (never dumped); in the other, `wl_tcp_echo`, which holds N
//! connections to the peer and echoes every byte back, and the tool dumping and restoring it.
//!
//! The peer sends, on every connection, a 16-byte message (sequence number, send time) every
//! interval, keeping at most `window` (1 by default) unanswered on each; every echo must be the
//! oldest message in flight, byte for byte, or the stream is broken. The peer's view of the
//! downtime of a connection is the longest gap between two echoes on it, from a mark set just
//! before the dump until every connection has echoed again after the restore. With one message
//! in flight, nothing the peer sends can be lost to the lock (it waits for the echo), so the
//! gap is the time the service was away; with a larger window the peer streams into the locked
//! connection and the gap then includes its retransmission timer (200 ms and more).
//!
//! The time the connections were locked, measured the same way for both tools from the
//! kernel's own notifications in the dumped side's namespace: cr's lock is tc filters (rtnetlink
//! RTM_NEWTFILTER / RTM_DELTFILTER), criu's (`--network-lock nftables`) elements of an
//! nftables set and the table holding it (nfnetlink NEWSETELEM / DELTABLE). Locked = first
//! filter or element added during the dump to the last filter or the table removed by the
//! restore: the longest any connection stayed locked (criu adds one element per connection
//! as it dumps it, ~0.25 ms apart here, so its last connection is locked for less). Rounds
//! alternate between the tools. cr's own figure (the stamp of its lock record to the removal, logged by restore,
//! net/lock.rs) is printed beside it as a check. With `CR_BENCH_LOGS=DIR` the last round's logs
//! of each tool are kept in DIR.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use super::{cr_bin, median, Args, TempDir, Workload};

/// Bytes of one message: sequence number and send time (ns since the peer started), LE.
const MSG: usize = 16;
/// Echoes every connection must deliver after a restore before its gap is read.
const SETTLE_ECHOES: u64 = 3;
/// How long the peer waits for something it expects (all echoes back, every connection echoing).
const PEER_LIMIT: Duration = Duration::from_secs(15);

/// Options of the section (from cr-bench's command line).
#[derive(Clone)]
pub struct TcpArgs {
    pub conns: usize,
    pub interval: Duration,
    pub window: usize,
    pub loopback: bool,
}

impl Default for TcpArgs {
    fn default() -> TcpArgs {
        TcpArgs {
            conns: 100,
            interval: Duration::from_millis(1),
            window: 1,
            loopback: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// Two network namespaces joined by a veth pair (10.214.0.1 in `a`, 10.214.0.2 in `b`),
/// removed when dropped.
struct NetPair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl NetPair {
    fn new() -> Result<NetPair, String> {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("crbench-a{id}"), format!("crbench-b{id}"));
        let (va, vb) = (format!("crbva{id}"), format!("crbvb{id}"));
        ip(&["netns", "add", &a])?;
        // From here the drop removes what was made.
        let pair = NetPair {
            a: a.clone(),
            b: b.clone(),
        };
        ip(&["netns", "add", &b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &a])?;
        ip(&["link", "set", &vb, "netns", &b])?;
        for (ns, dev, addr) in [(&a, &va, "10.214.0.1/24"), (&b, &vb, "10.214.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Moves the calling thread (and the threads and processes it starts afterwards) into the
/// network namespace `name`.
fn enter_netns(name: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))
        .map_err(|e| format!("open netns {name}: {e}"))?;
    // SAFETY: setns on a namespace fd we hold open; it changes this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {name}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where the two sides live.
struct Net {
    pair: Option<NetPair>,
}

impl Net {
    /// Namespace of the dumped side, if not this one.
    fn target_ns(&self) -> Option<&str> {
        self.pair.as_ref().map(|p| p.a.as_str())
    }
    fn peer_ns(&self) -> Option<&str> {
        self.pair.as_ref().map(|p| p.b.as_str())
    }
    fn peer_bind(&self) -> &'static str {
        if self.pair.is_some() {
            "10.214.0.2:0"
        } else {
            "127.0.0.1:0"
        }
    }
    fn describe(&self) -> &'static str {
        if self.pair.is_some() {
            "over a veth pair to a peer in another network namespace"
        } else {
            "over loopback to a peer thread of cr-bench"
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The peer

/// The peer's side of one connection.
struct Conn {
    s: TcpStream,
    next_seq: u64,
    /// Messages sent and not yet echoed: (sequence number, send time).
    inflight: VecDeque<(u64, u64)>,
    rbuf: Vec<u8>,
    last_echo: Option<Instant>,
    /// Longest gap between two echoes since the last mark.
    max_gap: Duration,
    /// Echoes since the last settle request.
    since_settle: u64,
    err: Option<String>,
}

impl Conn {
    fn send(&mut self, t0: Instant) {
        let t = t0.elapsed().as_nanos() as u64;
        let mut m = [0u8; MSG];
        m[..8].copy_from_slice(&self.next_seq.to_le_bytes());
        m[8..].copy_from_slice(&t.to_le_bytes());
        // 16 bytes into a socket with at most `window` messages unanswered: a short write
        // would mean a window of kilobytes; counted as a broken stream.
        match self.s.write(&m) {
            Ok(MSG) => {
                self.inflight.push_back((self.next_seq, t));
                self.next_seq += 1;
            }
            Ok(n) => {
                self.err = Some(format!(
                    "short write of {n} bytes at message {}",
                    self.next_seq
                ))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => self.err = Some(format!("write of message {}: {e}", self.next_seq)),
        }
    }

    /// Reads the echoes that arrived (at `now`) and checks each against the oldest message in
    /// flight.
    fn receive(&mut self, now: Instant, buf: &mut [u8]) {
        loop {
            match self.s.read(buf) {
                Ok(0) => {
                    self.err = Some(format!(
                        "end of stream after {} echoes",
                        self.next_seq - self.inflight.len() as u64
                    ));
                    return;
                }
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.err = Some(format!("read: {e}"));
                    return;
                }
            }
        }
        let whole = self.rbuf.len() / MSG * MSG;
        for m in self.rbuf[..whole].as_chunks::<MSG>().0 {
            let seq = u64::from_le_bytes(m[..8].try_into().unwrap_or_default());
            let t = u64::from_le_bytes(m[8..].try_into().unwrap_or_default());
            match self.inflight.pop_front() {
                Some((s, st)) if s == seq && st == t => {}
                Some((s, _)) => {
                    self.err = Some(format!(
                        "echo of message {s} reads as message {seq} (time {t})"
                    ));
                    return;
                }
                None => {
                    self.err = Some(format!("echo of message {seq} that was never sent"));
                    return;
                }
            }
            if let Some(l) = self.last_echo {
                self.max_gap = self.max_gap.max(now - l);
            }
            self.last_echo = Some(now);
            self.since_settle += 1;
        }
        self.rbuf.drain(..whole);
    }
}

/// Where the peer sends the longest gaps (Err: a stream broke or went silent).
type GapsReply = Sender<Result<Vec<Duration>, String>>;

/// What the bench asks of the peer thread.
enum Cmd {
    /// Longest gaps count from now.
    Mark,
    /// Reply with every connection's longest gap since the mark once each has echoed `n` more
    /// times (or broke).
    Settle(u64, GapsReply),
    /// Stop sending; reply once every message in flight is echoed (Ok: messages echoed in all)
    /// and end the thread, handing the sockets back.
    Finish(Sender<Result<u64, String>>),
}

struct Peer {
    addr: String,
    cmd: Sender<Cmd>,
    handle: std::thread::JoinHandle<Vec<Conn>>,
}

impl Peer {
    /// Starts the peer thread (in namespace `ns`), listening; it accepts `a.conns` connections
    /// and then talks on them.
    fn start(net: &Net, a: &TcpArgs) -> Result<Peer, String> {
        let (tx, rx) = channel();
        let (atx, arx) = channel();
        let ns = net.peer_ns().map(str::to_string);
        let bind = net.peer_bind();
        let a = a.clone();
        let handle = std::thread::spawn(move || {
            let l = ns
                .as_deref()
                .map_or(Ok(()), enter_netns)
                .and_then(|_| {
                    TcpListener::bind(bind).map_err(|e| format!("peer: bind {bind}: {e}"))
                })
                .and_then(|l| {
                    l.local_addr()
                        .map(|ad| (l, ad.to_string()))
                        .map_err(|e| format!("peer: {e}"))
                });
            let l = match l {
                Ok((l, addr)) => {
                    let _ = atx.send(Ok(addr));
                    l
                }
                Err(e) => {
                    let _ = atx.send(Err(e));
                    return Vec::new();
                }
            };
            peer_main(l, &a, rx)
        });
        let addr = arx
            .recv()
            .map_err(|_| "the peer thread died".to_string())??;
        Ok(Peer {
            addr,
            cmd: tx,
            handle,
        })
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Cmd) -> Result<T, String> {
        let (tx, rx) = channel();
        self.cmd
            .send(make(tx))
            .map_err(|_| "the peer thread is gone".to_string())?;
        rx.recv_timeout(PEER_LIMIT + Duration::from_secs(5))
            .map_err(|_| "the peer does not answer".to_string())
    }

    fn mark(&self) {
        let _ = self.cmd.send(Cmd::Mark);
    }

    fn settle(&self, n: u64) -> Result<Vec<Duration>, String> {
        self.ask(|tx| Cmd::Settle(n, tx))?
    }

    /// Stops the traffic; Ok(messages echoed) when every stream came back whole.
    fn finish(&self) -> Result<u64, String> {
        self.ask(Cmd::Finish)?
    }
}

/// The peer thread: accept, then a message on every idle connection each interval, echoes read
/// and checked in between.
fn peer_main(l: TcpListener, a: &TcpArgs, rx: Receiver<Cmd>) -> Vec<Conn> {
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(a.conns);
    while conns.len() < a.conns {
        match l.accept() {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                if s.set_nonblocking(true).is_err() {
                    return conns;
                }
                conns.push(Conn {
                    s,
                    next_seq: 0,
                    inflight: VecDeque::new(),
                    rbuf: Vec::new(),
                    last_echo: None,
                    max_gap: Duration::ZERO,
                    since_settle: 0,
                    err: None,
                });
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return conns,
        }
    }
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|c| libc::pollfd {
            fd: c.s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = vec![0u8; 64 << 10];
    let mut next_tick = Instant::now();
    let mut settle: Option<(u64, GapsReply, Instant)> = None;
    let mut finish: Option<(Sender<Result<u64, String>>, Instant)> = None;
    loop {
        loop {
            match rx.try_recv() {
                Ok(Cmd::Mark) => conns.iter_mut().for_each(|c| c.max_gap = Duration::ZERO),
                Ok(Cmd::Settle(n, tx)) => {
                    conns.iter_mut().for_each(|c| c.since_settle = 0);
                    settle = Some((n, tx, Instant::now() + PEER_LIMIT));
                }
                Ok(Cmd::Finish(tx)) => finish = Some((tx, Instant::now() + PEER_LIMIT)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return conns,
            }
        }
        let now = Instant::now();
        if finish.is_none() && now >= next_tick {
            for c in conns
                .iter_mut()
                .filter(|c| c.err.is_none() && c.inflight.len() < a.window)
            {
                c.send(t0);
            }
            next_tick += a.interval;
            if next_tick < now {
                next_tick = now + a.interval;
            }
        }
        let wait = if finish.is_some() {
            Duration::from_millis(10)
        } else {
            next_tick.saturating_duration_since(Instant::now())
        };
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        fds.iter_mut().for_each(|p| p.revents = 0);
        // SAFETY: fds is a valid array of fds.len() pollfds; ts a valid timespec; no sigmask.
        let r = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        let now = Instant::now();
        if r > 0 {
            for (p, c) in fds.iter_mut().zip(conns.iter_mut()) {
                if p.revents != 0 && c.err.is_none() {
                    c.receive(now, &mut buf);
                }
                if c.err.is_some() {
                    // A broken connection is not polled again (it would report forever).
                    p.fd = -1;
                }
            }
        }
        if let Some((n, _, deadline)) = &settle {
            let done = conns
                .iter()
                .all(|c| c.err.is_some() || c.since_settle >= *n);
            if done || now > *deadline {
                let res = match conns
                    .iter()
                    .enumerate()
                    .find_map(|(i, c)| c.err.as_ref().map(|e| (i, e)))
                {
                    Some((i, e)) => Err(format!("connection {i}: {e}")),
                    None if !done => {
                        let silent = conns.iter().filter(|c| c.since_settle < *n).count();
                        Err(format!(
                            "{silent} connections did not echo {n} times within {PEER_LIMIT:?}"
                        ))
                    }
                    None => Ok(conns.iter().map(|c| c.max_gap).collect()),
                };
                if let Some((_, tx, _)) = settle.take() {
                    let _ = tx.send(res);
                }
            }
        }
        if let Some((_, deadline)) = &finish {
            let drained = conns
                .iter()
                .all(|c| c.err.is_some() || c.inflight.is_empty());
            if drained || now > *deadline {
                let res = match conns
                    .iter()
                    .enumerate()
                    .find_map(|(i, c)| c.err.as_ref().map(|e| (i, e)))
                {
                    Some((i, e)) => Err(format!("connection {i}: {e}")),
                    None if !drained => {
                        Err(format!("messages still unanswered after {PEER_LIMIT:?}"))
                    }
                    None => Ok(conns.iter().map(|c| c.next_seq).sum()),
                };
                if let Some((tx, _)) = finish.take() {
                    let _ = tx.send(res);
                }
                return conns;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lock, as the kernel announces it

/// nlmsg types of the events that make or unmake a lock: tc filters (cr), and nftables set
/// elements and tables (criu): nfnetlink types are (subsystem << 8) | message.
const NFT: u16 = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8;
const NFT_NEWSETELEM: u16 = NFT | libc::NFT_MSG_NEWSETELEM as u16;
const NFT_DELTABLE: u16 = NFT | libc::NFT_MSG_DELTABLE as u16;

/// Listens, from the calling thread's network namespace, to the tc and nftables notifications
/// (subscribing is synchronous: whatever changes after `start` returns is heard).
struct LockWatch {
    stop: std::os::fd::OwnedFd,
    handle: std::thread::JoinHandle<Vec<(Instant, u16)>>,
}

/// A netlink socket of `protocol` subscribed to multicast `group`.
fn netlink(protocol: libc::c_int, group: u32) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(format!(
            "netlink socket ({protocol}): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // A burst of 200 element notifications must not overflow the queue (root may force it).
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt with a valid int; failure only means a smaller buffer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            4,
        )
    };
    // SAFETY: an all-zero sockaddr_nl is valid; the fields that matter are set below.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = 1 << (group - 1);
    // SAFETY: sa is a valid sockaddr_nl of the size given.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    } != 0
    {
        return Err(format!(
            "bind the netlink socket ({protocol}) to group {group}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

impl LockWatch {
    fn start() -> Result<LockWatch, String> {
        let tc = netlink(libc::NETLINK_ROUTE, libc::RTNLGRP_TC)?;
        let nft = netlink(libc::NETLINK_NETFILTER, libc::NFNLGRP_NFTABLES as u32)?;
        let (stop_r, stop_w) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
        let handle = std::thread::spawn(move || {
            let mut events = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut fds =
                [tc.as_raw_fd(), nft.as_raw_fd(), stop_r.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            loop {
                fds.iter_mut().for_each(|p| p.revents = 0);
                // SAFETY: three valid pollfds.
                if unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) } < 0 {
                    if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                        continue;
                    }
                    return events;
                }
                let now = Instant::now();
                for p in &fds[..2] {
                    if p.revents == 0 {
                        continue;
                    }
                    // SAFETY: recv into a buffer of the length given.
                    let n = unsafe {
                        libc::recv(p.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                    };
                    if n <= 0 {
                        // ENOBUFS (events lost) or nothing after all: the figures of this round
                        // may be off; nothing better to do than to go on.
                        continue;
                    }
                    let mut msg = &buf[..n as usize];
                    while msg.len() >= 16 {
                        let len = u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
                        events.push((now, u16::from_ne_bytes([msg[4], msg[5]])));
                        let next = (len + 3) & !3;
                        if len < 16 || next > msg.len() {
                            break;
                        }
                        msg = &msg[next..];
                    }
                }
                if fds[2].revents != 0 {
                    return events;
                }
            }
        });
        Ok(LockWatch {
            stop: stop_w.into(),
            handle,
        })
    }

    /// Stops listening: the events heard, in order.
    fn finish(self) -> LockEvents {
        drop(self.stop);
        LockEvents(self.handle.join().unwrap_or_default())
    }
}

struct LockEvents(Vec<(Instant, u16)>);

impl LockEvents {
    /// First lock rule added to the last one removed (cr: tc filters; criu: nftables set
    /// elements, then the table), in ms.
    fn locked_ms(&self) -> Option<f64> {
        let first = |ty: u16| self.0.iter().find(|e| e.1 == ty).map(|e| e.0);
        let last = |ty: u16| self.0.iter().rev().find(|e| e.1 == ty).map(|e| e.0);
        let (a, b) = match first(libc::RTM_NEWTFILTER) {
            Some(a) => (a, last(libc::RTM_DELTFILTER)?),
            None => (first(NFT_NEWSETELEM)?, last(NFT_DELTABLE)?),
        };
        (b > a).then(|| (b - a).as_secs_f64() * 1e3)
    }
}

// ---------------------------------------------------------------------------------------------
// The tools

/// A checkpoint tool and the flags it needs here.
struct Tool {
    name: &'static str,
    bin: PathBuf,
    dump_extra: Vec<&'static str>,
    restore_extra: Vec<&'static str>,
}

/// cr's own figure: "the connections were locked for X ms" in restore.log.
fn cr_locked_ms(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let pat = "the connections were locked for ";
    let line = text.lines().find(|l| l.contains(pat))?;
    line.split(pat)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The last error line of a log, for a one-line reason.
fn last_error(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rfind(|l| l.contains("Error"))
        .map(|l| l.split_once(") ").map_or(l, |x| x.1).trim().to_string())
        .unwrap_or_else(|| format!("see {}", log.display()))
}

/// A lock a failed restore left: removed by `cr network-unlock` (nothing to do when the
/// dump locked nothing).
fn remove_lock_pins(img: &Path) {
    let _ = Command::new(cr_bin())
        .arg("network-unlock")
        .arg("-D")
        .arg(img)
        .output();
}

/// One dump and restore as measured.
#[derive(Default, Clone)]
struct Round {
    dump_ms: f64,
    restore_ms: f64,
    /// From the kernel's notifications: first lock rule added to the last one removed.
    locked_ms: Option<f64>,
    /// The tool's own figure (cr only).
    says_ms: Option<f64>,
    /// None when the peer could not tell (a stream broke).
    gap_max_ms: Option<f64>,
    gap_median_ms: Option<f64>,
    /// Messages echoed over the whole round.
    echoed: u64,
    /// Why the round's streams are not intact.
    fail: Option<String>,
}

/// Starts the workload and the peer, dumps and restores, reads the peer's gaps.
/// Err: the tool failed (one line).
fn round(tool: &Tool, net: &Net, a: &TcpArgs) -> Result<Round, String> {
    let d = TempDir::new(&format!("bench-tcp-{}", tool.name));
    let peer = Peer::start(net, a)?;
    let mut w = Workload::start("wl_tcp_echo", &[&peer.addr, &a.conns.to_string()], &d);
    // Every connection accepted and echoing.
    peer.settle(SETTLE_ECHOES)?;
    let img = d.join("img");
    std::fs::create_dir_all(&img).map_err(|e| format!("create {}: {e}", img.display()))?;
    let pid = w.pid.to_string();
    let watch = LockWatch::start()?;
    peer.mark();
    let t_dump = Instant::now();
    let st = Command::new(&tool.bin)
        .args(["dump", "-t", &pid, "-D"])
        .arg(&img)
        .args(["--tcp-established", "-o", "dump.log"])
        .args(&tool.dump_extra)
        .status()
        .map_err(|e| format!("run {}: {e}", tool.bin.display()))?;
    let dump_ms = t_dump.elapsed().as_secs_f64() * 1e3;
    if !st.success() {
        return Err(format!(
            "dump failed: {}",
            last_error(&img.join("dump.log"))
        ));
    }
    w.reap_killed();
    let t_restore = Instant::now();
    let st = Command::new(&tool.bin)
        .args(["restore", "-D"])
        .arg(&img)
        .args(["-d", "--tcp-established", "-o", "restore.log"])
        .args(&tool.restore_extra)
        .status()
        .map_err(|e| format!("run {}: {e}", tool.bin.display()))?;
    let restore_ms = t_restore.elapsed().as_secs_f64() * 1e3;
    if !st.success() {
        remove_lock_pins(&img);
        return Err(format!(
            "restore failed: {}",
            last_error(&img.join("restore.log"))
        ));
    }
    if let Some(keep) = std::env::var_os("CR_BENCH_LOGS") {
        // The last round's logs, to read what the tools did.
        let keep = Path::new(&keep);
        let _ = std::fs::create_dir_all(keep);
        for l in ["dump.log", "restore.log"] {
            let _ = std::fs::copy(img.join(l), keep.join(format!("tcp-{}-{l}", tool.name)));
        }
    }
    let mut r = Round {
        dump_ms,
        restore_ms,
        ..Round::default()
    };
    r.locked_ms = watch.finish().locked_ms();
    if tool.name == "cr" {
        r.says_ms = cr_locked_ms(&img.join("restore.log"));
    }
    match peer.settle(SETTLE_ECHOES) {
        Ok(gaps) => {
            let ms: Vec<f64> = gaps.iter().map(|g| g.as_secs_f64() * 1e3).collect();
            r.gap_max_ms = Some(ms.iter().cloned().fold(0.0, f64::max));
            r.gap_median_ms = Some(median(ms));
        }
        Err(e) => r.fail = Some(e),
    }
    match peer.finish() {
        Ok(n) => r.echoed = n,
        Err(e) => r.fail = r.fail.or(Some(e)),
    }
    let (st, res) = w.verify();
    if st != 0 || !res.starts_with("PASS") {
        r.fail = r.fail.or(Some(format!("the workload: {}", res.trim())));
    }
    // The peer's sockets close only now, after the workload's FIN.
    let _ = peer.handle.join();
    Ok(r)
}

/// The peer's gaps with nobody touching the workload (the measurement's own floor).
fn noise(net: &Net, a: &TcpArgs) -> Result<f64, String> {
    let d = TempDir::new("bench-tcp-noise");
    let peer = Peer::start(net, a)?;
    let mut w = Workload::start("wl_tcp_echo", &[&peer.addr, &a.conns.to_string()], &d);
    peer.settle(SETTLE_ECHOES)?;
    peer.mark();
    // A measurement window about as long as a dump and restore.
    std::thread::sleep(Duration::from_millis(300));
    let gaps = peer.settle(1)?;
    peer.finish()?;
    w.verify();
    let _ = peer.handle.join();
    Ok(gaps
        .iter()
        .map(|g| g.as_secs_f64() * 1e3)
        .fold(0.0, f64::max))
}

/// The medians of a tool's rounds and how many of them kept every stream whole.
struct Summary {
    r: Round,
    rounds: usize,
    intact: usize,
    fail: Option<String>,
}

fn summarize(rounds: &[Round]) -> Summary {
    let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let opt = |f: &dyn Fn(&Round) -> Option<f64>| {
        let v: Vec<f64> = rounds.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    Summary {
        r: Round {
            dump_ms: med(&|r| r.dump_ms),
            restore_ms: med(&|r| r.restore_ms),
            locked_ms: opt(&|r| r.locked_ms),
            says_ms: opt(&|r| r.says_ms),
            gap_max_ms: opt(&|r| r.gap_max_ms),
            gap_median_ms: opt(&|r| r.gap_median_ms),
            echoed: rounds.iter().map(|r| r.echoed).sum(),
            fail: None,
        },
        rounds: rounds.len(),
        intact: rounds.iter().filter(|r| r.fail.is_none()).count(),
        fail: rounds.iter().find_map(|r| r.fail.clone()),
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.1}"))
}

/// Runs the section: every tool `a.rounds` times, then the table and the summary line.
pub fn section(a: &Args) {
    let t = &a.tcp;
    let net = Net {
        pair: if t.loopback {
            None
        } else {
            match NetPair::new() {
                Ok(p) => Some(p),
                Err(e) => {
                    println!("tcp: no network namespace pair ({e}): loopback instead");
                    None
                }
            }
        },
    };
    let mut tools = vec![Tool {
        name: "cr",
        bin: cr_bin(),
        dump_extra: vec![],
        restore_extra: vec![],
    }];
    if let Some(c) = &a.criu {
        tools.push(Tool {
            name: "criu",
            bin: c.clone(),
            dump_extra: vec!["--network-lock", "nftables"],
            restore_extra: vec!["--network-lock", "nftables"],
        });
    }
    println!();
    println!(
        "tcp: {} established connections {}; one {MSG}-byte message in flight per connection (window {}) every {:.1} ms; median of {} rounds",
        t.conns,
        net.describe(),
        t.window,
        t.interval.as_secs_f64() * 1e3,
        a.rounds
    );
    // Everything on the dumped side (workload, tool) runs from a thread inside its namespace.
    let results = std::thread::scope(|sc| {
        sc.spawn(|| {
            if let Some(ns) = net.target_ns() {
                enter_netns(ns)?;
            }
            let floor = noise(&net, t);
            // Rounds alternate between the tools, so that a burst of load elsewhere on the
            // machine does not fall on one tool only. A tool that fails is not tried again.
            let mut out: Vec<(&str, Vec<Round>, Option<String>)> =
                tools.iter().map(|tl| (tl.name, Vec::new(), None)).collect();
            for _ in 0..a.rounds {
                for (tool, (_, rounds, why)) in tools.iter().zip(out.iter_mut()) {
                    if why.is_some() {
                        continue;
                    }
                    match round(tool, &net, t) {
                        Ok(r) => rounds.push(r),
                        Err(e) => *why = Some(e),
                    }
                }
            }
            Ok::<_, String>((floor, out))
        })
        .join()
    });
    let (floor, results) = match results {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            println!("tcp: {e}");
            return;
        }
        Err(_) => {
            println!("tcp: the section panicked (see above)");
            return;
        }
    };
    println!(
        "  {:<6} {:>10} {:>13} {:>13} {:>14} {:>9} {:>11}  streams",
        "tool",
        "locked ms",
        "(cr says ms)",
        "peer max gap",
        "peer med. gap",
        "dump ms",
        "restore ms"
    );
    let mut sums: Vec<(&str, Summary)> = Vec::new();
    for (name, rounds, why) in &results {
        if rounds.is_empty() {
            println!(
                "  {name:<6} failed: {}",
                why.as_deref().unwrap_or("no round")
            );
            continue;
        }
        let s = summarize(rounds);
        let streams = match &s.fail {
            None => format!(
                "intact ({} of {} rounds, {} echoes)",
                s.intact, s.rounds, s.r.echoed
            ),
            Some(f) => format!("FAIL ({} of {} rounds intact): {f}", s.intact, s.rounds),
        };
        println!(
            "  {:<6} {:>10} {:>13} {:>13} {:>14} {:>9.1} {:>11.1}  {streams}",
            name,
            fmt_ms(s.r.locked_ms),
            fmt_ms(s.r.says_ms),
            fmt_ms(s.r.gap_max_ms),
            fmt_ms(s.r.gap_median_ms),
            s.r.dump_ms,
            s.r.restore_ms
        );
        if let Some(w) = why {
            println!("  {name:<6} stopped after {} rounds: {w}", rounds.len());
        }
        sums.push((name, s));
    }
    match &floor {
        Ok(f) => println!("  (locked: the first lock rule added to the last removed, from the kernel's notifications; peer gap with no dump: {f:.1} ms)"),
        Err(e) => println!("  (no noise floor: {e})"),
    }
    if net.pair.is_none() {
        println!("  (loopback: lock rules other runs add or remove in this namespace meanwhile count too)");
    }
    // The one line.
    let mut line = format!("tcp  {} conns ", t.conns);
    for (name, s) in &sums {
        let verdict = if s.fail.is_some() { " FAIL" } else { "" };
        line.push_str(&format!(
            " {name}: locked {} ms (peer max gap {} ms){verdict}",
            fmt_ms(s.r.locked_ms),
            fmt_ms(s.r.gap_max_ms)
        ));
    }
    for (name, rounds, why) in &results {
        if let (true, Some(w)) = (rounds.is_empty(), why) {
            line.push_str(&format!("  {name}: failed ({w})"));
        }
    }
    if let (Some((_, c)), Some((_, k))) = (
        sums.iter().find(|s| s.0 == "cr"),
        sums.iter().find(|s| s.0 == "criu"),
    ) {
        let locked = match (k.r.locked_ms, c.r.locked_ms) {
            (Some(k), Some(c)) if c > 0.0 => format!("locked {:.1}x, ", k / c),
            _ => String::new(),
        };
        let gap = match (k.r.gap_max_ms, c.r.gap_max_ms) {
            (Some(k), Some(c)) if c > 0.0 => format!("peer gap {:.1}x", k / c),
            _ => "peer gap -".to_string(),
        };
        line.push_str(&format!("  criu/cr: {locked}{gap}"));
    }
    println!("{line}");
}
