//! Workload of the socket-table cross-check (tests/tests/socket_table.rs): a tree whose TCP
//! sockets go through every kind of life, in phases the harness starts one at a time, so that
//! a tracker started between phases sees some sockets only by its seeding scan and others only
//! by their events.
//!
//! Usage: `wl_sockets CMD_FIFO ACK_FIFO [late]`. Both FIFOs are opened read-write before READY
//! (so no open blocks); commands arrive on CMD_FIFO one per line, each answered on ACK_FIFO
//! with `ok [info]` or `err why`. Without `late`, phase `a` runs before READY.
//!
//! - `a`: listeners on 0.0.0.0, 127.0.0.1, [::] (dual-stack) and [::1]; a connection to each
//!   of two (accepted, one of them IPv4 on the IPv6 wildcard: v4-mapped); connections left in
//!   the accept queues of two (not accepted); a connection half-closed by its client; a
//!   connection closed by both ends; a connection waiting in a listener that `b` closes; and a
//!   child process (which acts in `b`).
//! - `b ADDR`: closes phase a's first connection and the half-closed one (both ends), and the
//!   listener with a waiting connection (which is reset); new listeners on 127.0.0.1 and [::]
//!   with accepted, v4-mapped and waiting connections; a connection half-closed by its server;
//!   one closed by both ends; a connection to ADDR (outside the tree); a second child forked
//!   now, which listens, connects and accepts; the first child listens and connects too.
//!   Answers `ok PORT`: the new 127.0.0.1 listener, which the harness then connects to twice.
//! - `c`: accepts one of the harness's two connections.
//! - `end`: waits for SIGUSR1, reports PASS (no step failed) or FAIL.
//!
//! Every close waits until its connection is gone from /proc/net/tcp{,6} (TIME_WAIT aside), so
//! the harness compares settled states.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use cr_tests::workload::{ready, wait_for_check, Checker};

type Res<T> = Result<T, String>;

fn listen(addr: &str) -> Res<TcpListener> {
    TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))
}

fn port(l: &TcpListener) -> u16 {
    l.local_addr().map(|a| a.port()).unwrap_or(0)
}

fn connect(addr: SocketAddr) -> Res<TcpStream> {
    TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))
}

/// A connection to `l` at `host` (which must have nothing else waiting), accepted.
fn pair(l: &TcpListener, host: &str) -> Res<(TcpStream, TcpStream)> {
    let addr: SocketAddr = format!("{host}:{}", port(l))
        .parse()
        .map_err(|e| format!("{host}: {e}"))?;
    let c = connect(addr)?;
    let (s, _) = l.accept().map_err(|e| format!("accept on {addr}: {e}"))?;
    Ok((c, s))
}

/// (local port, remote port) of a connection.
fn ports(s: &TcpStream) -> (u16, u16) {
    (
        s.local_addr().map(|a| a.port()).unwrap_or(0),
        s.peer_addr().map(|a| a.port()).unwrap_or(0),
    )
}

/// (local port, remote port, state) of every socket in /proc/net/tcp and tcp6.
fn proc_net_tcp() -> Vec<(u16, u16, u8)> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for line in text.lines().skip(1) {
            let w: Vec<&str> = line.split_whitespace().collect();
            let port = |s: &str| {
                s.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if let (Some(l), Some(r), Some(st)) = (
                w.get(1).and_then(|s| port(s)),
                w.get(2).and_then(|s| port(s)),
                w.get(3).and_then(|s| u8::from_str_radix(s, 16).ok()),
            ) {
                out.push((l, r, st));
            }
        }
    }
    out
}

/// Waits until no socket of the given connections (by ports, both directions) is in a state
/// other than TIME_WAIT: their closing handshakes are over.
fn settle(conns: &[(u16, u16)]) -> Res<()> {
    const TIME_WAIT: u8 = 6;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let busy: Vec<(u16, u16, u8)> = proc_net_tcp()
            .into_iter()
            .filter(|&(l, r, st)| {
                st != TIME_WAIT
                    && conns
                        .iter()
                        .any(|&(a, b)| (l, r) == (a, b) || (l, r) == (b, a))
            })
            .collect();
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("connections still closing after 10 s: {busy:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pipe() -> Res<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a valid out-array of two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A child process: on each byte from the parent it runs `step` (with the step's number) and
/// answers one line. It dies with the parent.
struct Child {
    to: std::fs::File,
    from: BufReader<std::fs::File>,
    pid: i32,
}

fn spawn_child(
    step: fn(u8, &mut Vec<TcpStream>, &mut Vec<TcpListener>, &Ctx) -> Res<String>,
    ctx: &Ctx,
) -> Res<Child> {
    let (r1, w1) = pipe()?;
    let (r2, w2) = pipe()?;
    // SAFETY: fork while single-threaded.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: plain prctl: die with the parent.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        drop((w1, r2));
        // The parent's sockets are the parent's: a copy here would keep them open after the
        // parent closes them.
        let keep = [r1.as_raw_fd(), w2.as_raw_fd()];
        for fd in 3..4096 {
            if !keep.contains(&fd) {
                // SAFETY: closing inherited fds this child never uses (their owners live in
                // the parent's copy of memory and are never dropped here: the child _exits).
                unsafe { libc::close(fd) };
            }
        }
        let mut from = std::fs::File::from(r1);
        let mut to = std::fs::File::from(w2);
        let (mut streams, mut listeners) = (Vec::new(), Vec::new());
        let mut b = [0u8; 1];
        while from.read_exact(&mut b).is_ok() {
            let line = match step(b[0], &mut streams, &mut listeners, ctx) {
                Ok(s) => format!("ok {s}\n"),
                Err(e) => format!("err {e}\n"),
            };
            if to.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
        // SAFETY: leave without running the parent's atexit state.
        unsafe { libc::_exit(0) };
    }
    drop((r1, w2));
    Ok(Child {
        to: std::fs::File::from(w1),
        from: BufReader::new(std::fs::File::from(r2)),
        pid,
    })
}

impl Child {
    fn run(&mut self, step: u8) -> Res<String> {
        self.to
            .write_all(&[step])
            .map_err(|e| format!("to child {}: {e}", self.pid))?;
        let mut line = String::new();
        self.from
            .read_line(&mut line)
            .map_err(|e| format!("from child {}: {e}", self.pid))?;
        match line.trim().strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(format!("child {}: {}", self.pid, line.trim())),
        }
    }
}

/// Ports a child needs from the parent's listeners.
#[derive(Clone, Copy, Default)]
struct Ctx {
    l4w: u16,
    l6w: u16,
}

/// What a child does at each step: listen on 127.0.0.1, connect to its own listener (accepted)
/// and to one of the parent's (left waiting there).
fn child_step(
    step: u8,
    streams: &mut Vec<TcpStream>,
    listeners: &mut Vec<TcpListener>,
    ctx: &Ctx,
) -> Res<String> {
    let l = listen("127.0.0.1:0")?;
    let (c, s) = pair(&l, "127.0.0.1")?;
    let target: SocketAddr = if step.is_multiple_of(2) {
        format!("127.0.0.1:{}", ctx.l4w)
    } else {
        format!("[::1]:{}", ctx.l6w)
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    streams.extend([c, s, connect(target)?]);
    let p = port(&l);
    listeners.push(l);
    Ok(format!("{}", p))
}

#[derive(Default)]
struct State {
    l4w: Option<TcpListener>,
    l4l: Option<TcpListener>,
    l6w: Option<TcpListener>,
    l6l: Option<TcpListener>,
    /// Has a connection waiting; closed in `b`.
    l4x: Option<TcpListener>,
    l4b: Option<TcpListener>,
    l6b: Option<TcpListener>,
    /// Closed (both ends) in `b`.
    a1: Vec<TcpStream>,
    h1: Vec<TcpStream>,
    /// The client whose connection waits in l4x (reset when l4x closes).
    x: Option<TcpStream>,
    keep: Vec<TcpStream>,
    children: Vec<Child>,
    ctx: Ctx,
}

fn phase_a(st: &mut State) -> Res<String> {
    let l4w = listen("0.0.0.0:0")?;
    let l4l = listen("127.0.0.1:0")?;
    let l6w = listen("[::]:0")?;
    let l6l = listen("[::1]:0")?;
    let l4x = listen("127.0.0.1:0")?;
    st.ctx = Ctx {
        l4w: port(&l4w),
        l6w: port(&l6w),
    };
    let (c, s) = pair(&l4l, "127.0.0.1")?;
    st.a1 = vec![c, s];
    // IPv4 on the dual-stack wildcard: the accepted side is an IPv6 socket with v4-mapped
    // addresses.
    let (c, s) = pair(&l6w, "127.0.0.1")?;
    st.keep.extend([c, s]);
    st.keep.push(connect(
        format!("127.0.0.1:{}", port(&l4w))
            .parse()
            .map_err(|e| format!("{e}"))?,
    )?);
    st.keep.push(connect(
        format!("[::1]:{}", port(&l6l))
            .parse()
            .map_err(|e| format!("{e}"))?,
    )?);
    let (c, s) = pair(&l4l, "127.0.0.1")?;
    c.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    st.h1 = vec![c, s];
    let (c, s) = pair(&l4l, "127.0.0.1")?;
    let closed = ports(&c);
    drop((c, s));
    st.x = Some(connect(
        format!("127.0.0.1:{}", port(&l4x))
            .parse()
            .map_err(|e| format!("{e}"))?,
    )?);
    (st.l4w, st.l4l, st.l6w, st.l6l, st.l4x) =
        (Some(l4w), Some(l4l), Some(l6w), Some(l6l), Some(l4x));
    let child = spawn_child(child_step, &st.ctx)?;
    let pid = child.pid;
    st.children.push(child);
    // The half-closed connection has settled too: FIN sent and acknowledged.
    settle(&[closed])?;
    Ok(format!("child={pid}"))
}

fn phase_b(st: &mut State, outside: &str) -> Res<String> {
    let mut gone: Vec<(u16, u16)> = st.a1.iter().chain(&st.h1).map(ports).collect();
    st.a1.clear();
    st.h1.clear();
    if let Some(x) = &st.x {
        gone.push(ports(x));
    }
    drop(st.l4x.take());
    let l4b = listen("127.0.0.1:0")?;
    let l6b = listen("[::]:0")?;
    let (c, s) = pair(&l4b, "127.0.0.1")?;
    st.keep.extend([c, s]);
    let (c, s) = pair(&l6b, "127.0.0.1")?;
    st.keep.extend([c, s]);
    let (c, s) = pair(&l4b, "127.0.0.1")?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    st.keep.extend([c, s]);
    let (c, s) = pair(&l6b, "[::1]")?;
    gone.push(ports(&c));
    drop((c, s));
    st.keep.push(connect(
        format!("[::1]:{}", port(&l6b))
            .parse()
            .map_err(|e| format!("{e}"))?,
    )?);
    st.keep.push(connect(
        outside.parse().map_err(|e| format!("{outside}: {e}"))?,
    )?);
    let mut young = spawn_child(child_step, &st.ctx)?;
    young.run(0)?;
    let pid = young.pid;
    st.children.push(young);
    if let Some(old) = st.children.first_mut() {
        old.run(1)?;
    }
    settle(&gone)?;
    let p = port(&l4b);
    (st.l4b, st.l6b) = (Some(l4b), Some(l6b));
    Ok(format!("{p} child={pid}"))
}

fn phase_c(st: &mut State) -> Res<String> {
    let l = st.l4b.as_ref().ok_or("no phase b")?;
    let (s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    st.keep.push(s);
    Ok(String::new())
}

fn fifo(path: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cmd), Some(ack)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: wl_sockets CMD_FIFO ACK_FIFO [late]");
        std::process::exit(2)
    };
    let late = args.get(3).map(String::as_str) == Some("late");
    // The children forked in phase a must be in the tree's session (ready() does this too,
    // later).
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    let cmds = BufReader::new(fifo(cmd));
    let mut acks = fifo(ack);
    let mut st = State::default();
    let mut c = Checker::new();
    let mut info = String::new();
    if !late {
        match phase_a(&mut st) {
            Ok(i) => info = i,
            Err(e) => c.check(false, format!("phase a: {e}")),
        }
    }
    ready(&info);
    for line in cmds.lines() {
        let Ok(line) = line else { break };
        let mut w = line.split_whitespace();
        let r = match w.next() {
            Some("a") => phase_a(&mut st),
            Some("b") => phase_b(&mut st, w.next().unwrap_or("127.0.0.1:1")),
            Some("c") => phase_c(&mut st),
            Some("end") => break,
            other => Err(format!("unknown command {other:?}")),
        };
        let reply = match &r {
            Ok(i) => format!("ok {i}\n"),
            Err(e) => format!("err {e}\n"),
        };
        if let Err(e) = r {
            c.check(false, format!("{line}: {e}"));
        }
        if acks.write_all(reply.as_bytes()).is_err() {
            break;
        }
    }
    let _ = acks.write_all(b"ok\n");
    wait_for_check();
    c.check(!st.keep.is_empty() || late, "no connection held");
    c.report()
}
