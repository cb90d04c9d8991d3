//! TCP workload (tests/tests/restore_tcp.rs).
//!
//! `wl_tcp local`: a listener on 127.0.0.1, a client connected to it and the accepted socket,
//! with unread data both ways (several queued writes, one larger than a segment). After the
//! check signal: every byte arrives in order, more data flows both ways, the listener accepts a
//! new connection, and the options set before the dump are still set. `wl_tcp local6`: the same
//! on [::1].
//!
//! `wl_tcp stream ADDR`: connects to a peer outside the tree and exchanges two counting byte
//! streams (byte i is i % 251) until the check signal, then keeps going until it has received
//! and sent `AFTER` more bytes. Any reset, gap or wrong byte is a FAIL.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use cr_tests::workload::{check_requested, install_check_flag, ready, wait_for_check, Checker};

/// Deterministic payload: `len` bytes starting at stream offset `off`, tagged by `seed`.
fn payload(seed: u8, off: usize, len: usize) -> Vec<u8> {
    (off..off + len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn getsockopt_int(fd: i32, level: i32, opt: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        libc::getsockopt(
            fd,
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    v
}

fn read_exactly(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// `bind`: the listener's address ("127.0.0.1:0" for `local`, "[::1]:0" for `local6`).
fn local(bind: &str) -> ! {
    let listener = TcpListener::bind(bind).expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let mut client = TcpStream::connect(addr).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    client.set_nodelay(true).expect("nodelay");
    // SAFETY: setsockopt with a valid int.
    unsafe {
        let one: libc::c_int = 1;
        libc::setsockopt(
            server.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&one as *const libc::c_int).cast(),
            4,
        );
    }
    // Unread data both ways, in several writes (one spanning several segments).
    let sizes = [10usize, 3000, 30_000, 7];
    let total: usize = sizes.iter().sum();
    let mut off = 0;
    for n in sizes {
        client.write_all(&payload(1, off, n)).expect("client write");
        server.write_all(&payload(2, off, n)).expect("server write");
        off += n;
    }
    ready(&format!("port={}", addr.port()));
    wait_for_check();

    let mut c = Checker::new();
    let timeout = Some(Duration::from_secs(20));
    client.set_read_timeout(timeout).ok();
    server.set_read_timeout(timeout).ok();
    match read_exactly(&mut server, total) {
        Ok(got) => c.check(got == payload(1, 0, total), "client->server data changed"),
        Err(e) => c.check(false, format!("server read of the queued data: {e}")),
    }
    match read_exactly(&mut client, total) {
        Ok(got) => c.check(got == payload(2, 0, total), "server->client data changed"),
        Err(e) => c.check(false, format!("client read of the queued data: {e}")),
    }
    // More traffic after restore.
    let more = payload(3, 0, 200_000);
    let w = std::thread::scope(|sc| {
        let h = sc.spawn(|| client.write_all(&more));
        let got = read_exactly(&mut server, more.len());
        (h.join(), got)
    });
    match w {
        (Ok(Ok(())), Ok(got)) => c.check(got == more, "data sent after restore changed"),
        (a, b) => c.check(
            false,
            format!(
                "traffic after restore: write {a:?}, read {:?}",
                b.map(|v| v.len())
            ),
        ),
    }
    c.eq(
        getsockopt_int(client.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY) != 0,
        true,
        "TCP_NODELAY of the client",
    );
    c.eq(
        getsockopt_int(server.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE) != 0,
        true,
        "SO_KEEPALIVE of the accepted socket",
    );
    c.eq(
        getsockopt_int(listener.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR) != 0,
        true,
        "SO_REUSEADDR of the listener",
    );
    // The listener still listens.
    match TcpStream::connect(addr) {
        Ok(mut s2) => match listener.accept() {
            Ok((mut a2, _)) => {
                s2.write_all(b"hello").ok();
                a2.set_read_timeout(timeout).ok();
                c.eq(
                    read_exactly(&mut a2, 5).ok(),
                    Some(b"hello".to_vec()),
                    "new connection data",
                );
            }
            Err(e) => c.check(false, format!("accept after restore: {e}")),
        },
        Err(e) => c.check(false, format!("connect to the listener after restore: {e}")),
    }
    c.report()
}

/// Bytes each way that must flow after the check signal.
const AFTER: u64 = 256 << 10;

/// Two counting streams over one nonblocking socket: (sent, received, error).
struct Streams {
    s: TcpStream,
    sent: u64,
    recvd: u64,
}

impl Streams {
    /// One round: write what the socket takes, read what is there, check it.
    fn pump(&mut self) -> Result<(), String> {
        let chunk: Vec<u8> = (self.sent..self.sent + 4096)
            .map(|i| (i % 251) as u8)
            .collect();
        match self.s.write(&chunk) {
            Ok(n) => self.sent += n as u64,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("write after {} bytes: {e}", self.sent)),
        }
        let mut buf = [0u8; 65536];
        match self.s.read(&mut buf) {
            Ok(0) => return Err(format!("peer closed after {} bytes", self.recvd)),
            Ok(n) => {
                for (k, &b) in buf[..n].iter().enumerate() {
                    let i = self.recvd + k as u64;
                    if b != (i % 251) as u8 {
                        return Err(format!("byte {i} is {b}, want {}", i % 251));
                    }
                }
                self.recvd += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("read after {} bytes: {e}", self.recvd)),
        }
        Ok(())
    }
}

fn stream(addr: &str) -> ! {
    install_check_flag();
    let s = TcpStream::connect(addr).expect("connect to the peer");
    s.set_nonblocking(true).expect("nonblocking");
    let mut st = Streams {
        s,
        sent: 0,
        recvd: 0,
    };
    let mut c = Checker::new();
    ready(&format!(
        "local={}",
        st.s.local_addr().map(|a| a.to_string()).unwrap_or_default()
    ));
    let mut failed = None;
    while !check_requested() {
        if let Err(e) = st.pump() {
            failed = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if failed.is_none() {
        let (s0, r0) = (st.sent, st.recvd);
        let deadline = Instant::now() + Duration::from_secs(30);
        while st.sent < s0 + AFTER || st.recvd < r0 + AFTER {
            if Instant::now() > deadline {
                failed = Some(format!(
                    "only {} bytes sent and {} received in 30 s after the check",
                    st.sent - s0,
                    st.recvd - r0
                ));
                break;
            }
            if let Err(e) = st.pump() {
                failed = Some(e);
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if failed.is_none() {
        // Orderly end: FIN, then read what the peer still sends until its FIN (closing with
        // unread data would reset the peer).
        let _ = st.s.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 65536];
        loop {
            if Instant::now() > deadline {
                failed = Some("the peer never closed its side".into());
                break;
            }
            match st.s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(k) = buf[..n]
                        .iter()
                        .enumerate()
                        .position(|(k, &b)| b != ((st.recvd + k as u64) % 251) as u8)
                    {
                        failed = Some(format!("byte {} is wrong", st.recvd + k as u64));
                        break;
                    }
                    st.recvd += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => {
                    failed = Some(format!("read while closing: {e}"));
                    break;
                }
            }
        }
    }
    if let Some(e) = failed {
        c.check(false, e);
    }
    c.report()
}

/// `wl_tcp many N`: N loopback connections (both ends here) with unread data both ways; after
/// the check every byte arrives and each connection still carries a round trip.
fn many(n: usize) -> ! {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = TcpStream::connect(addr).expect("connect");
        let (mut a, _) = listener.accept().expect("accept");
        c.write_all(&payload(i as u8, 0, 100)).expect("write");
        a.write_all(&payload(i as u8 ^ 0x55, 0, 100))
            .expect("write");
        pairs.push((c, a));
    }
    ready(&format!("port={}", addr.port()));
    wait_for_check();
    let mut c = Checker::new();
    for (i, (cl, ac)) in pairs.iter_mut().enumerate() {
        cl.set_read_timeout(Some(Duration::from_secs(20))).ok();
        ac.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let a = read_exactly(ac, 100).ok();
        let b = read_exactly(cl, 100).ok();
        c.check(
            a == Some(payload(i as u8, 0, 100)),
            format!("connection {i}: client->server data"),
        );
        c.check(
            b == Some(payload(i as u8 ^ 0x55, 0, 100)),
            format!("connection {i}: server->client data"),
        );
        let ok = cl.write_all(b"ping").is_ok()
            && read_exactly(ac, 4).ok().as_deref() == Some(b"ping".as_slice());
        c.check(ok, format!("connection {i}: round trip after restore"));
    }
    c.report()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("local") => local("127.0.0.1:0"),
        Some("local6") => local("[::1]:0"),
        Some("many") => many(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(100)),
        Some("stream") => stream(args.get(2).map(String::as_str).unwrap_or("127.0.0.1:1")),
        _ => {
            eprintln!("usage: wl_tcp local | stream ADDR");
            std::process::exit(2)
        }
    }
}
