//! Workload: TCP connections in every state beyond ESTABLISHED and LISTEN, both ends in the
//! tree, over loopback (tests/tests/restore_tcp_states.rs).
//!
//! Usage: `wl_tcp_states all | states | syn-sent`. `states` is A–E, `all` adds F.
//!
//! - A: client shut for writing after a request: the client in FIN_WAIT2, the server in
//!   CLOSE_WAIT with the request unread.
//! - B: FIN_WAIT1: the client filled the server's (small) receive window and its own send
//!   queue, then shut for writing: its FIN waits behind the unsent data.
//! - C: LAST_ACK: the server, in CLOSE_WAIT, filled the client's window and shut for writing.
//! - D: CLOSING: as B, then the server shut for writing too: the FINs crossed; the client in
//!   CLOSING (its FIN still queued), the server in FIN_WAIT2.
//! - E: half-shut for reading (SHUT_RD, no packet sent): reads give EOF at once, writes work.
//! - F: a listener with three connections not yet accepted: one sent data, one nothing, one
//!   data and FIN (CLOSE_WAIT inside the queue).
//! - G (`syn-sent`): a connection in SYN_SENT: its listener's accept queue (backlog 0) is
//!   full, so its SYNs are dropped until the check accepts the connection ahead of it. A
//!   restore may reconnect it (as CRIU does) or the dump may refuse it; either way it must
//!   connect after the check.
//!
//! Before READY each socket has reached its state (TCP_INFO). After the restore: every state
//! as before, then each connection finishes its life — every queued byte in order, EOF where
//! a FIN was sent, replies on half-open sides, and the final states (CLOSE) reached.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use cr_tests::workload::{ready, wait_for_check, Checker};

const ESTABLISHED: u8 = 1;
const SYN_SENT: u8 = 2;
const FIN_WAIT1: u8 = 4;
const FIN_WAIT2: u8 = 5;
const CLOSE: u8 = 7;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(11).wrapping_add(seed) ^ (i >> 10) as u8)
        .collect()
}

fn tcp_info(fd: i32) -> libc::tcp_info {
    // SAFETY: an all-zero tcp_info is valid; getsockopt fills what it knows.
    unsafe {
        let mut i: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut i as *mut libc::tcp_info).cast(),
            &mut len,
        );
        i
    }
}

fn state(fd: &impl AsRawFd) -> u8 {
    tcp_info(fd.as_raw_fd()).tcpi_state
}

/// Waits (bounded) until `fd` is in state `want`; the state it has then.
fn settle(fd: &impl AsRawFd, want: u8) -> u8 {
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(fd) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    state(fd)
}

fn set_rcvbuf(fd: i32, v: i32) {
    // SAFETY: a valid int option.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const i32).cast(),
            4,
        )
    };
}

/// A client with a small receive buffer (set before connecting, so its window is small).
fn small_client(to: SocketAddr) -> TcpStream {
    // SAFETY: a new socket, its option, then owned by the TcpStream.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket");
    set_rcvbuf(fd, 4096);
    // SAFETY: the fd is ours.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let (ss, len) = {
        let SocketAddr::V4(v) = to else {
            panic!("IPv4 only")
        };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        (sin, std::mem::size_of::<libc::sockaddr_in>() as u32)
    };
    // SAFETY: a valid sockaddr_in.
    let r = unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_in).cast(), len) };
    assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
    s
}

/// A listener whose accepted sockets have a small receive buffer.
fn small_listener() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    set_rcvbuf(l.as_raw_fd(), 4096);
    l
}

fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// Writes the pattern until the socket takes no more; the bytes written.
fn fill(s: &mut TcpStream, seed: u8) -> usize {
    s.set_nonblocking(true).unwrap();
    let data = pattern(seed, 8 << 20);
    let mut n = 0;
    loop {
        match s.write(&data[n..]) {
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("fill: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    n
}

/// Reads to EOF (within 10 s): the bytes, or what stopped it.
fn read_to_eof(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v)
        .map_err(|e| format!("{e} after {} bytes", v.len()))?;
    Ok(v)
}

fn read_n(s: &mut TcpStream, n: usize) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).map_err(|e| e.to_string())?;
    Ok(v)
}

struct States {
    a: (TcpStream, TcpStream),
    b: (TcpStream, TcpStream, usize),
    c: (TcpStream, TcpStream, usize),
    d: (TcpStream, TcpStream, usize),
    e: (TcpStream, TcpStream),
    _ls: Vec<TcpListener>,
}

fn set_up_states() -> States {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let small = small_listener();
    // A.
    let (mut ac, as_) = pair(&l);
    ac.write_all(b"request").unwrap();
    ac.shutdown(Shutdown::Write).unwrap();
    assert_eq!(settle(&as_, CLOSE_WAIT), CLOSE_WAIT, "A: server state");
    assert_eq!(settle(&ac, FIN_WAIT2), FIN_WAIT2, "A: client state");
    // B.
    let (mut bc, bs) = pair(&small);
    let tb = fill(&mut bc, 2);
    bc.shutdown(Shutdown::Write).unwrap();
    assert_eq!(state(&bc), FIN_WAIT1, "B: client state");
    // C.
    let mut cc = small_client(l.local_addr().unwrap());
    let (mut cs, _) = l.accept().unwrap();
    cc.write_all(b"req").unwrap();
    cc.shutdown(Shutdown::Write).unwrap();
    assert_eq!(settle(&cs, CLOSE_WAIT), CLOSE_WAIT, "C: server state");
    assert_eq!(
        read_to_eof(&mut cs).as_deref(),
        Ok(&b"req"[..]),
        "C: request"
    );
    let tc = fill(&mut cs, 3);
    cs.shutdown(Shutdown::Write).unwrap();
    assert_eq!(state(&cs), LAST_ACK, "C: server state");
    assert_eq!(settle(&cc, FIN_WAIT2), FIN_WAIT2, "C: client state");
    // D.
    let (mut dc, ds) = pair(&small);
    let td = fill(&mut dc, 4);
    dc.shutdown(Shutdown::Write).unwrap();
    ds.shutdown(Shutdown::Write).unwrap();
    assert_eq!(settle(&dc, CLOSING), CLOSING, "D: client state");
    assert_eq!(settle(&ds, FIN_WAIT2), FIN_WAIT2, "D: server state");
    // E.
    let (ec, es) = pair(&l);
    es.shutdown(Shutdown::Read).unwrap();
    States {
        a: (ac, as_),
        b: (bc, bs, tb),
        c: (cc, cs, tc),
        d: (dc, ds, td),
        e: (ec, es),
        _ls: vec![l, small],
    }
}

fn check_states(s: &mut States, c: &mut Checker) {
    let now = [
        ("A client", state(&s.a.0), FIN_WAIT2),
        ("A server", state(&s.a.1), CLOSE_WAIT),
        ("B client", state(&s.b.0), FIN_WAIT1),
        ("B server", state(&s.b.1), ESTABLISHED),
        ("C client", state(&s.c.0), FIN_WAIT2),
        ("C server", state(&s.c.1), LAST_ACK),
        ("D client", state(&s.d.0), CLOSING),
        ("D server", state(&s.d.1), FIN_WAIT2),
        ("E client", state(&s.e.0), ESTABLISHED),
        ("E server", state(&s.e.1), ESTABLISHED),
    ];
    for (what, got, want) in now {
        c.eq(got, want, &format!("{what}: state after the restore"));
    }
    // A: the request, EOF; the response; EOF on the client; both closed.
    let (ac, as_) = (&mut s.a.0, &mut s.a.1);
    c.eq(
        read_to_eof(as_),
        Ok(b"request".to_vec()),
        "A: the server reads the request",
    );
    c.check(as_.write_all(b"response").is_ok(), "A: the server answers");
    as_.shutdown(Shutdown::Write).ok();
    c.eq(
        read_to_eof(ac),
        Ok(b"response".to_vec()),
        "A: the client reads the answer",
    );
    c.eq(settle(as_, CLOSE), CLOSE, "A: the server's final state");
    c.eq(settle(ac, CLOSE), CLOSE, "A: the client's final state");
    // B: all the queued data, then EOF; FIN_WAIT2; the server still writes.
    let (bc, bs, tb) = (&mut s.b.0, &mut s.b.1, s.b.2);
    match read_to_eof(bs) {
        Ok(v) => c.check(
            v == pattern(2, tb),
            format!(
                "B: the server read {} bytes, want {tb} (the pattern)",
                v.len()
            ),
        ),
        Err(e) => c.check(false, format!("B: the server's read: {e}")),
    }
    c.eq(
        settle(bc, FIN_WAIT2),
        FIN_WAIT2,
        "B: the client once its FIN is acknowledged",
    );
    c.check(bs.write_all(b"bye").is_ok(), "B: the server writes");
    c.eq(read_n(bc, 3), Ok(b"bye".to_vec()), "B: the client reads");
    // C: the client reads all, then EOF; the server's FIN acknowledged.
    let (cc, cs, tc) = (&mut s.c.0, &mut s.c.1, s.c.2);
    match read_to_eof(cc) {
        Ok(v) => c.check(
            v == pattern(3, tc),
            format!(
                "C: the client read {} bytes, want {tc} (the pattern)",
                v.len()
            ),
        ),
        Err(e) => c.check(false, format!("C: the client's read: {e}")),
    }
    c.eq(settle(cs, CLOSE), CLOSE, "C: the server's final state");
    // D: the client has the server's FIN; the server reads all, then EOF.
    let (dc, ds, td) = (&mut s.d.0, &mut s.d.1, s.d.2);
    c.eq(read_to_eof(dc), Ok(Vec::new()), "D: the client reads EOF");
    match read_to_eof(ds) {
        Ok(v) => c.check(
            v == pattern(4, td),
            format!(
                "D: the server read {} bytes, want {td} (the pattern)",
                v.len()
            ),
        ),
        Err(e) => c.check(false, format!("D: the server's read: {e}")),
    }
    c.eq(settle(dc, CLOSE), CLOSE, "D: the client's final state");
    c.eq(settle(ds, CLOSE), CLOSE, "D: the server's final state");
    // E: EOF at once on the SHUT_RD side, which still writes.
    let (ec, es) = (&mut s.e.0, &mut s.e.1);
    let mut b = [0u8; 8];
    // SAFETY: a nonblocking recv into a valid buffer.
    let n = unsafe { libc::recv(es.as_raw_fd(), b.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT) };
    c.eq(
        n,
        0,
        "E: recv on the SHUT_RD side (0: EOF, -1: it would block)",
    );
    c.check(
        es.write_all(b"still-writing").is_ok(),
        "E: the SHUT_RD side writes",
    );
    c.eq(
        read_n(ec, 13),
        Ok(b"still-writing".to_vec()),
        "E: the client reads it",
    );
}

struct Queue {
    l: TcpListener,
    clients: Vec<TcpStream>,
}

fn set_up_queue() -> Queue {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let mut f1 = TcpStream::connect(a).unwrap();
    f1.write_all(b"f1-data").unwrap();
    let f2 = TcpStream::connect(a).unwrap();
    let mut f3 = TcpStream::connect(a).unwrap();
    f3.write_all(b"f3").unwrap();
    f3.shutdown(Shutdown::Write).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcp_info(l.as_raw_fd()).tcpi_unacked < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(tcp_info(l.as_raw_fd()).tcpi_unacked, 3, "F: accept queue");
    Queue {
        l,
        clients: vec![f1, f2, f3],
    }
}

fn check_queue(q: &mut Queue, c: &mut Checker) {
    c.eq(
        tcp_info(q.l.as_raw_fd()).tcpi_unacked,
        3,
        "F: connections waiting in the accept queue",
    );
    for (i, cl) in q.clients.iter_mut().enumerate() {
        match q.l.accept() {
            Ok((mut s, peer)) => {
                c.eq(
                    Some(peer),
                    cl.local_addr().ok(),
                    &format!("F: accept {i}: its client"),
                );
                match i {
                    0 => c.eq(read_n(&mut s, 7), Ok(b"f1-data".to_vec()), "F: f1's data"),
                    2 => c.eq(
                        read_to_eof(&mut s),
                        Ok(b"f3".to_vec()),
                        "F: f3's data and FIN",
                    ),
                    _ => {}
                }
                c.check(
                    s.write_all(b"hello").is_ok(),
                    format!("F: accept {i}: write"),
                );
                c.eq(
                    read_n(cl, 5),
                    Ok(b"hello".to_vec()),
                    &format!("F: client {i} reads"),
                );
            }
            Err(e) => c.check(false, format!("F: accept {i}: {e}")),
        }
    }
}

fn syn_sent() -> ! {
    // SAFETY: a listener with backlog 0: one connection fills its accept queue.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    unsafe { libc::listen(l.as_raw_fd(), 0) };
    let a = l.local_addr().unwrap();
    let g1 = TcpStream::connect(a).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcp_info(l.as_raw_fd()).tcpi_unacked < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: a nonblocking connect of a new socket, owned by the TcpStream after.
    let g2 = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        let SocketAddr::V4(v) = a else { unreachable!() };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert!(r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS));
        TcpStream::from_raw_fd(fd)
    };
    assert_eq!(state(&g2), SYN_SENT, "G: state");
    ready("");
    wait_for_check();
    let mut c = Checker::new();
    let st = state(&g2);
    c.check(
        st == SYN_SENT || st == ESTABLISHED,
        format!("G: state {st} after the restore, want SYN_SENT (or ESTABLISHED)"),
    );
    let (first, _) = l.accept().expect("accept g1");
    drop((first, g1));
    let mut p = libc::pollfd {
        fd: g2.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the SYN is retransmitted within a few seconds.
    let r = unsafe { libc::poll(&mut p, 1, 15_000) };
    c.eq(r, 1, "G: the connection completes once the queue has room");
    c.eq(
        g2.take_error().ok().flatten().map(|e| e.to_string()),
        None,
        "G: SO_ERROR",
    );
    match l.accept() {
        Ok((mut s, _)) => {
            let mut g2 = g2;
            g2.set_nonblocking(false).unwrap();
            c.check(g2.write_all(b"late").is_ok(), "G: write");
            c.eq(
                read_n(&mut s, 4),
                Ok(b"late".to_vec()),
                "G: the server reads",
            );
        }
        Err(e) => c.check(false, format!("G: accept: {e}")),
    }
    c.report()
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "syn-sent" {
        syn_sent();
    }
    let mut s = set_up_states();
    let mut q = (mode == "all").then(set_up_queue);
    assert!(
        mode == "all" || mode == "states",
        "usage: wl_tcp_states all|states|syn-sent"
    );
    ready("");
    wait_for_check();
    let mut c = Checker::new();
    check_states(&mut s, &mut c);
    if let Some(q) = q.as_mut() {
        check_queue(q, &mut c);
    }
    c.report()
}
