//! Workload: UDP and UDP-Lite over IPv4 and IPv6 (tests/tests/restore_udp.rs).
//!
//! Usage: `wl_udp [PEER4 PEER6]`. For each of UDP/IPv4, UDP/IPv6, UDP-Lite/IPv4 and
//! UDP-Lite/IPv6, on loopback:
//!
//! - a server S, bound, with SO_RCVBUF, SO_REUSEADDR, packet info (IP_PKTINFO /
//!   IPV6_RECVPKTINFO), TOS / traffic class, IPV6_V6ONLY, and for UDP-Lite a receive checksum
//!   coverage;
//! - a client C1 connected to S, with a TTL / hop limit, SO_SNDBUF and for UDP-Lite a send
//!   checksum coverage; a client C2 bound but not connected, with SO_BROADCAST (IPv4);
//! - datagrams queued at S from both clients, interleaved, one of them empty, one of 60000
//!   bytes; two queued at C1 and one at C2 from S.
//!
//! With PEER4 and PEER6 (UDP sockets of the harness, outside the tree), S of plain UDP asks
//! each for three datagrams, which stay queued behind the others; after the restore S answers
//! each at the address it came from (`ack-N`), and the harness checks the answers arrived.
//!
//! After the restore every socket's options, name and peer are as before; each queue gives
//! back its datagrams in order, with their sizes, contents and senders (and packet info at S);
//! then the queues are empty, and new datagrams flow between all three sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use cr_tests::workload::{ready, wait_for_check, Checker};

const SOL_UDPLITE: i32 = 136;
const UDPLITE_SEND_CSCOV: i32 = 10;
const UDPLITE_RECV_CSCOV: i32 = 11;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sys(r: i32, what: &str) -> i32 {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn to_raw(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family's struct fits in it.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        match a {
            SocketAddr::V4(v) => {
                let s = &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                s.sin_family = libc::AF_INET as u16;
                s.sin_port = v.port().to_be();
                s.sin_addr.s_addr = u32::from(*v.ip()).to_be();
                (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
            }
            SocketAddr::V6(v) => {
                let s = &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                s.sin6_family = libc::AF_INET6 as u16;
                s.sin6_port = v.port().to_be();
                s.sin6_addr.s6_addr = v.ip().octets();
                (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
            }
        }
    }
}

fn from_raw(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family says which struct the storage holds.
    unsafe {
        match ss.ss_family as i32 {
            libc::AF_INET => {
                let s = &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr))),
                    u16::from_be(s.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let s = &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                Some(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(s.sin6_addr.s6_addr)),
                    u16::from_be(s.sin6_port),
                ))
            }
            _ => None,
        }
    }
}

fn name(fd: i32, peer: bool) -> Option<SocketAddr> {
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        let p = (&mut ss as *mut libc::sockaddr_storage).cast();
        let r = if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        };
        if r < 0 {
            return None;
        }
        from_raw(&ss)
    }
}

fn getopt(fd: i32, level: i32, opt: i32) -> Result<i32, i32> {
    let mut v: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let r = unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut i32).cast(), &mut len) };
    if r == 0 {
        Ok(v)
    } else {
        Err(errno())
    }
}

fn setopt(fd: i32, level: i32, opt: i32, v: i32) {
    // SAFETY: a valid int option.
    let r = unsafe { libc::setsockopt(fd, level, opt, (&v as *const i32).cast(), 4) };
    sys(r, &format!("setsockopt {level}/{opt}"));
}

fn bind(fd: i32, a: &SocketAddr) {
    let (ss, len) = to_raw(a);
    // SAFETY: a valid address.
    sys(
        unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) },
        &format!("bind {a}"),
    );
}

fn connect(fd: i32, a: &SocketAddr) {
    let (ss, len) = to_raw(a);
    // SAFETY: a valid address.
    sys(
        unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) },
        &format!("connect {a}"),
    );
}

fn send(fd: i32, data: &[u8], to: Option<&SocketAddr>) -> Result<(), i32> {
    let n = match to {
        Some(a) => {
            let (ss, len) = to_raw(a);
            // SAFETY: a valid buffer and address.
            unsafe {
                libc::sendto(
                    fd,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_DONTWAIT,
                    (&ss as *const libc::sockaddr_storage).cast(),
                    len,
                )
            }
        }
        // SAFETY: a valid buffer.
        None => unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) },
    };
    if n == data.len() as isize {
        Ok(())
    } else {
        Err(errno())
    }
}

/// One datagram, not waiting: (sender, data, whether packet info came with it).
fn recv(fd: i32) -> Result<(Option<SocketAddr>, Vec<u8>, bool), i32> {
    let mut b = vec![0u8; 65536];
    let mut cbuf = [0u64; 32];
    // SAFETY: valid buffers; control messages walked with the CMSG macros.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        };
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_name = (&mut ss as *mut libc::sockaddr_storage).cast();
        mh.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = libc::recvmsg(fd, &mut mh, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(errno());
        }
        b.truncate(n as usize);
        let mut info = false;
        let mut cm = libc::CMSG_FIRSTHDR(&mh);
        while !cm.is_null() {
            let (l, t) = ((*cm).cmsg_level, (*cm).cmsg_type);
            info |= (l == libc::IPPROTO_IP && t == libc::IP_PKTINFO)
                || (l == libc::IPPROTO_IPV6 && t == libc::IPV6_PKTINFO);
            cm = libc::CMSG_NXTHDR(&mh, cm);
        }
        Ok((from_raw(&ss), b, info))
    }
}

/// How many datagrams are queued at `fd`, counted by peeking with SO_PEEK_OFF (left disabled
/// afterwards, as it was).
fn queued(fd: i32) -> usize {
    peeked(fd).len()
}

/// The sizes of the datagrams queued at `fd`, peeked with SO_PEEK_OFF (left disabled
/// afterwards, as it was).
fn peeked(fd: i32) -> Vec<isize> {
    setopt(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0);
    let mut n = Vec::new();
    // Whole datagrams: the peek offset moves by what was copied.
    let mut b = vec![0u8; 65536];
    loop {
        // SAFETY: a peek into a valid buffer.
        let k = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                b.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if k < 0 {
            break;
        }
        n.push(k);
    }
    setopt(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1);
    n
}

/// Waits until `fd` has `n` datagrams queued (loopback delivery may finish in softirq context
/// after the send returned).
fn await_queued(fd: i32, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued(fd) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {:?} queued, want {n} datagrams",
            peeked(fd)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The memory S's receive queue holds (SO_MEMINFO's first field, sk_rmem_alloc): it grows
/// with every datagram queued, the empty ones too, which lets the workload wait for one
/// without peeking at it.
fn rmem(fd: i32) -> u32 {
    let mut v = [0u32; 9];
    let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            v.as_mut_ptr().cast(),
            &mut len,
        )
    };
    v[0]
}

fn await_rmem_above(fd: i32, was: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rmem(fd) <= was {
        assert!(
            Instant::now() < deadline,
            "{what}: a datagram never arrived"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The options the workload set or relies on, as (level, option) pairs, per socket role.
fn options(v6: bool, lite: bool) -> Vec<(i32, i32)> {
    let mut o = vec![
        (libc::SOL_SOCKET, libc::SO_RCVBUF),
        (libc::SOL_SOCKET, libc::SO_SNDBUF),
        (libc::SOL_SOCKET, libc::SO_REUSEADDR),
        (libc::SOL_SOCKET, libc::SO_BROADCAST),
        (libc::SOL_SOCKET, libc::SO_PROTOCOL),
        (libc::SOL_SOCKET, libc::SO_TYPE),
    ];
    if v6 {
        o.extend([
            (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
        ]);
    } else {
        o.extend([
            (libc::IPPROTO_IP, libc::IP_PKTINFO),
            (libc::IPPROTO_IP, libc::IP_TOS),
            (libc::IPPROTO_IP, libc::IP_TTL),
        ]);
    }
    if lite {
        o.extend([
            (SOL_UDPLITE, UDPLITE_SEND_CSCOV),
            (SOL_UDPLITE, UDPLITE_RECV_CSCOV),
        ]);
    }
    o
}

type Snapshot = (
    Vec<Result<i32, i32>>,
    Option<SocketAddr>,
    Option<SocketAddr>,
);

struct Set {
    what: String,
    v6: bool,
    lite: bool,
    s: i32,
    c1: i32,
    c2: i32,
    /// What S's queue holds, in order: (sender, data).
    at_s: Vec<(SocketAddr, Vec<u8>)>,
    /// The external peer S asked for datagrams, if any.
    peer: Option<SocketAddr>,
    before: Vec<Snapshot>,
}

impl Set {
    fn snapshot(&self, fd: i32) -> Snapshot {
        (
            options(self.v6, self.lite)
                .iter()
                .map(|&(l, o)| getopt(fd, l, o))
                .collect(),
            name(fd, false),
            name(fd, true),
        )
    }
}

fn set_up(v6: bool, lite: bool, peer: Option<SocketAddr>) -> Set {
    let (fam, lo): (i32, IpAddr) = if v6 {
        (libc::AF_INET6, Ipv6Addr::LOCALHOST.into())
    } else {
        (libc::AF_INET, Ipv4Addr::LOCALHOST.into())
    };
    let proto = if lite {
        libc::IPPROTO_UDPLITE
    } else {
        libc::IPPROTO_UDP
    };
    let what = format!(
        "{}/{}",
        if lite { "UDP-Lite" } else { "UDP" },
        if v6 { "IPv6" } else { "IPv4" }
    );
    // SAFETY: plain socket(2).
    let sock = || sys(unsafe { libc::socket(fam, libc::SOCK_DGRAM, proto) }, &what);
    let (s, c1, c2) = (sock(), sock(), sock());
    setopt(s, libc::SOL_SOCKET, libc::SO_RCVBUF, 256 << 10);
    setopt(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    if v6 {
        setopt(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
        setopt(s, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1);
        setopt(s, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 0x10);
        setopt(c1, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 17);
    } else {
        setopt(s, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
        setopt(s, libc::IPPROTO_IP, libc::IP_TOS, 0x10);
        setopt(c1, libc::IPPROTO_IP, libc::IP_TTL, 17);
        setopt(c2, libc::SOL_SOCKET, libc::SO_BROADCAST, 1);
    }
    if lite {
        setopt(s, SOL_UDPLITE, UDPLITE_RECV_CSCOV, 20);
        setopt(c1, SOL_UDPLITE, UDPLITE_SEND_CSCOV, 20);
    }
    setopt(c1, libc::SOL_SOCKET, libc::SO_SNDBUF, 64 << 10);
    bind(s, &SocketAddr::new(lo, 0));
    let sa = name(s, false).unwrap();
    connect(c1, &sa);
    bind(c2, &SocketAddr::new(lo, 0));
    let (a1, a2) = (name(c1, false).unwrap(), name(c2, false).unwrap());
    let mut at_s = Vec::new();
    // The harness's datagrams first: they are awaited by peeking, which must not see the
    // empty datagram below (a zero-length datagram once peeked is skipped by every later
    // SO_PEEK_OFF peek: the kernel's rule, which a dump must not trip over either).
    if let Some(p) = peer {
        send(s, b"hello", Some(&p)).unwrap();
        for i in 0..3 {
            at_s.push((p, format!("ext-{i}").into_bytes()));
        }
        await_queued(s, at_s.len(), &format!("{what}: the harness's datagrams"));
    }
    for (who, data) in [
        (1, b"c1-first".to_vec()),
        (2, b"c2-a".to_vec()),
        (1, Vec::new()),
        (1, pattern(1, 1400)),
        (2, pattern(2, 60_000)),
    ] {
        let mem = rmem(s);
        if who == 1 {
            send(c1, &data, None).unwrap();
            at_s.push((a1, data));
        } else {
            send(c2, &data, Some(&sa)).unwrap();
            at_s.push((a2, data));
        }
        await_rmem_above(s, mem, &what);
    }
    send(s, b"s-to-c1-1", Some(&a1)).unwrap();
    send(s, b"s-to-c1-2", Some(&a1)).unwrap();
    send(s, b"s-to-c2", Some(&a2)).unwrap();
    await_queued(c1, 2, &what);
    await_queued(c2, 1, &what);
    let mut set = Set {
        what,
        v6,
        lite,
        s,
        c1,
        c2,
        at_s,
        peer,
        before: Vec::new(),
    };
    set.before = [s, c1, c2].iter().map(|&f| set.snapshot(f)).collect();
    set
}

fn check(t: &Set, c: &mut Checker) {
    let w = &t.what;
    for (i, &fd) in [t.s, t.c1, t.c2].iter().enumerate() {
        c.eq(
            t.snapshot(fd),
            t.before[i].clone(),
            &format!("{w}: {} (options, name, peer)", ["S", "C1", "C2"][i]),
        );
    }
    for (i, (from, data)) in t.at_s.iter().enumerate() {
        match recv(t.s) {
            Ok((f, d, info)) => {
                c.check(
                    f == Some(*from) && d == *data,
                    format!(
                        "{w}: S's datagram {i}: {} bytes from {f:?}, want {} from {from}",
                        d.len(),
                        data.len()
                    ),
                );
                c.check(info, format!("{w}: S's datagram {i} without packet info"));
            }
            Err(e) => c.check(false, format!("{w}: S's datagram {i}: errno {e}")),
        }
    }
    c.eq(
        recv(t.s).map(|_| ()),
        Err(libc::EAGAIN),
        &format!("{w}: S after its queue"),
    );
    let sa = name(t.s, false);
    for m in ["s-to-c1-1", "s-to-c1-2"] {
        c.eq(
            recv(t.c1).map(|(f, d, _)| (f, d)),
            Ok((sa, m.as_bytes().to_vec())),
            &format!("{w}: C1's queued {m}"),
        );
    }
    c.eq(
        recv(t.c2).map(|(f, d, _)| (f, d)),
        Ok((sa, b"s-to-c2".to_vec())),
        &format!("{w}: C2's queued datagram"),
    );
    c.eq(
        recv(t.c1).map(|_| ()),
        Err(libc::EAGAIN),
        &format!("{w}: C1 after its queue"),
    );
    if let Some(p) = t.peer {
        for i in 0..3 {
            c.eq(
                send(t.s, format!("ack-{i}").as_bytes(), Some(&p)),
                Ok(()),
                &format!("{w}: answer to the harness"),
            );
        }
    }
    // New traffic.
    let (a1, a2) = (name(t.c1, false), name(t.c2, false));
    c.eq(
        send(t.c1, b"new-1", None),
        Ok(()),
        &format!("{w}: C1 sends"),
    );
    c.eq(
        send(t.c2, b"new-2", sa.as_ref()),
        Ok(()),
        &format!("{w}: C2 sends"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < 2 && Instant::now() < deadline {
        match recv(t.s) {
            Ok((f, d, _)) => got.push((f, d)),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    c.eq(
        got,
        vec![(a1, b"new-1".to_vec()), (a2, b"new-2".to_vec())],
        &format!("{w}: new datagrams at S"),
    );
    if let Some(a) = a2 {
        c.eq(
            send(t.s, b"new-s", Some(&a)),
            Ok(()),
            &format!("{w}: S sends"),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = loop {
            match recv(t.c2) {
                Err(libc::EAGAIN) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                other => break other.map(|(_, d, _)| d),
            }
        };
        c.eq(r, Ok(b"new-s".to_vec()), &format!("{w}: C2 receives"));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let peer4: Option<SocketAddr> = args.get(1).map(|a| a.parse().expect("PEER4"));
    let peer6: Option<SocketAddr> = args.get(2).map(|a| a.parse().expect("PEER6"));
    let sets = [
        set_up(false, false, peer4),
        set_up(true, false, peer6),
        set_up(false, true, None),
        set_up(true, true, None),
    ];
    let ports: Vec<String> = sets
        .iter()
        .map(|s| name(s.s, false).map(|a| a.to_string()).unwrap_or_default())
        .collect();
    ready(&format!("servers={}", ports.join(",")));
    wait_for_check();
    let mut c = Checker::new();
    for s in &sets {
        check(s, &mut c);
    }
    c.report()
}
