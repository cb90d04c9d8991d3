//! Workload: UNIX sockets (tests/tests/restore_unix.rs).
//!
//! Usage: `wl_unix DIR MODE`, DIR an empty scratch directory; MODE:
//!
//! - `all`: every part below.
//! - `running`: the same, but the connections waiting in accept queues carry no data (what a
//!   `dump -R` can capture without accepting them).
//! - `scm`: file descriptors in flight (SCM_RIGHTS), expected carried: a stream message with a
//!   pipe's read end and a regular file at offset 5, a datagram with another pipe's read end,
//!   neither held by any fd any more; after the restore they are received, with their data
//!   and offset, at the same place in the byte stream.
//! - `outside PATH`: fd 50 is a stream connection to PATH, where the harness (outside the tree)
//!   accepts; after the check signal the workload sends "ping" and expects "pong" back.
//!
//! The parts (`all`, `running`):
//!
//! 1. a stream socketpair with queued data both ways in several writes, SO_SNDBUF and
//!    SO_RCVTIMEO set, and SO_PEEK_OFF enabled and advanced to 3 by a peek;
//! 2. a datagram socketpair with queued datagrams both ways, one of them empty;
//! 3. a seqpacket socketpair with queued messages both ways;
//! 4. a stream listener bound to DIR/l4.sock: one connection accepted (data queued), two
//!    waiting in its accept queue (`all`: the first sent data already);
//! 5. a seqpacket listener at an abstract name, one connection waiting from a client bound to
//!    DIR/c5.sock;
//! 6. a datagram socket bound to DIR/d6.sock with datagrams queued from a path-bound sender,
//!    an unbound connected one and an abstract-bound one, interleaved;
//! 7. a listener and a datagram socket bound to paths since unlinked (DIR/gone.sock,
//!    DIR/gone-d.sock), with data queued on a connection and on the datagram socket;
//! 8. shutdown states: a stream pair half-shut for writing after sending, one shut for
//!    reading, a seqpacket pair shut both ways;
//! 9. a forked child: a datagram pair whose receiver has SO_PASSCRED, with two messages from
//!    the child queued (their credentials name the child), and a stream connection from the
//!    child to our listener DIR/l9.sock (SO_PEERCRED names the child on our side, us on its);
//! 10. a stream pair whose sender filled the queue until EAGAIN.
//!
//! After the restore every socket's type, name and peer name are as before, and each part
//! checks its own: every queued byte in order, every message with its boundaries (and its
//! sender's address or credentials), accept order, shutdown behaviour (EOF, EPIPE), options,
//! and new traffic both ways; no unlinked path has come back on disk.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use cr_tests::workload::{
    block_check_signal, check_child, child_report, ready, wait_for_check, Checker,
};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sys(r: i32, what: &str) -> i32 {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A UNIX socket address as the workload compares them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Addr {
    Unnamed,
    Path(PathBuf),
    Abstract(Vec<u8>),
}

fn sockaddr(a: &Addr) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut s: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    s.sun_family = libc::AF_UNIX as u16;
    let base = std::mem::size_of::<libc::sa_family_t>();
    let bytes: Vec<u8> = match a {
        Addr::Unnamed => Vec::new(),
        Addr::Path(p) => p.as_os_str().as_bytes().to_vec(),
        Addr::Abstract(n) => std::iter::once(0).chain(n.iter().copied()).collect(),
    };
    for (i, b) in bytes.iter().enumerate() {
        s.sun_path[i] = *b as libc::c_char;
    }
    let extra = if matches!(a, Addr::Path(_)) { 1 } else { 0 };
    (s, (base + bytes.len() + extra) as libc::socklen_t)
}

fn addr_of(s: &libc::sockaddr_un, len: libc::socklen_t) -> Addr {
    let base = std::mem::size_of::<libc::sa_family_t>();
    let n = (len as usize).saturating_sub(base);
    let path: Vec<u8> = s.sun_path[..n.min(108)].iter().map(|&c| c as u8).collect();
    match path.first() {
        None => Addr::Unnamed,
        Some(0) => Addr::Abstract(path[1..].to_vec()),
        Some(_) => Addr::Path(PathBuf::from(std::ffi::OsStr::from_bytes(
            path.split(|&b| b == 0).next().unwrap_or(&[]),
        ))),
    }
}

fn name(fd: i32, peer: bool) -> Addr {
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        let mut s: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let p = (&mut s as *mut libc::sockaddr_un).cast();
        let r = if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        };
        if r < 0 {
            return Addr::Unnamed;
        }
        addr_of(&s, len)
    }
}

fn socket(ty: i32) -> i32 {
    // SAFETY: plain socket(2).
    sys(unsafe { libc::socket(libc::AF_UNIX, ty, 0) }, "socket")
}

fn pair(ty: i32) -> (i32, i32) {
    let mut sv = [0; 2];
    // SAFETY: a valid out-array.
    sys(
        unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, sv.as_mut_ptr()) },
        "socketpair",
    );
    (sv[0], sv[1])
}

fn bind(fd: i32, a: &Addr) {
    let (s, len) = sockaddr(a);
    // SAFETY: a valid sockaddr of `len` bytes.
    sys(
        unsafe { libc::bind(fd, (&s as *const libc::sockaddr_un).cast(), len) },
        &format!("bind {a:?}"),
    );
}

fn connect(fd: i32, a: &Addr) -> Result<(), i32> {
    let (s, len) = sockaddr(a);
    // SAFETY: a valid sockaddr of `len` bytes.
    if unsafe { libc::connect(fd, (&s as *const libc::sockaddr_un).cast(), len) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

fn listen(fd: i32) {
    // SAFETY: plain listen(2).
    sys(unsafe { libc::listen(fd, 8) }, "listen");
}

/// accept(2) of a connection already waiting (EAGAIN when none is: the listeners block).
fn accept(fd: i32) -> Result<i32, i32> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
        return Err(libc::EAGAIN);
    }
    // SAFETY: accept without an address.
    let r = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK,
        )
    };
    if r >= 0 {
        Ok(r)
    } else {
        Err(errno())
    }
}

fn send(fd: i32, data: &[u8]) -> Result<usize, i32> {
    // SAFETY: a send from a valid buffer; never blocks, never raises SIGPIPE.
    let n = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n >= 0 {
        Ok(n as usize)
    } else {
        Err(errno())
    }
}

fn send_all(fd: i32, data: &[u8]) {
    assert_eq!(
        send(fd, data),
        Ok(data.len()),
        "send of {} bytes on fd {fd}",
        data.len()
    );
}

fn sendto(fd: i32, data: &[u8], to: &Addr) {
    let (s, len) = sockaddr(to);
    // SAFETY: a send from a valid buffer to a valid address.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT,
            (&s as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    assert_eq!(
        n,
        data.len() as isize,
        "sendto {to:?}: {}",
        std::io::Error::last_os_error()
    );
}

/// One recv of at most `max` bytes, not waiting: the bytes, or the errno. A datagram or
/// seqpacket message is read with a byte to spare, so that a longer one shows.
fn recv(fd: i32, max: usize, flags: i32) -> Result<Vec<u8>, i32> {
    // A stream read must not take a byte more than asked: the next one may carry fds.
    let len = if getopt(fd, libc::SO_TYPE) == libc::SOCK_STREAM {
        max
    } else {
        max + 1
    };
    let mut b = vec![0u8; len];
    // SAFETY: a recv into a valid buffer.
    let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), len, flags | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(errno());
    }
    b.truncate(n as usize);
    Ok(b)
}

/// Every byte of a stream until EAGAIN (or EOF): (bytes, ended by EOF).
fn drain(fd: i32) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        match recv(fd, 65536, 0) {
            Ok(b) if b.is_empty() => return (out, true),
            Ok(b) => out.extend(b),
            Err(_) => return (out, false),
        }
    }
}

/// One datagram with its sender's address.
fn recvfrom(fd: i32) -> Result<(Addr, Vec<u8>), i32> {
    let mut b = vec![0u8; 4096];
    // SAFETY: valid buffers and lengths.
    unsafe {
        let mut s: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let n = libc::recvfrom(
            fd,
            b.as_mut_ptr().cast(),
            b.len(),
            libc::MSG_DONTWAIT,
            (&mut s as *mut libc::sockaddr_un).cast(),
            &mut len,
        );
        if n < 0 {
            return Err(errno());
        }
        b.truncate(n as usize);
        Ok((addr_of(&s, len), b))
    }
}

/// One message with its SCM_CREDENTIALS (pid, uid, gid) if any, and the fds it carried.
#[allow(clippy::type_complexity)]
fn recvmsg(fd: i32, max: usize) -> Result<(Vec<u8>, Option<(i32, u32, u32)>, Vec<i32>), i32> {
    let mut b = vec![0u8; max];
    let mut cbuf = [0u64; 64];
    // SAFETY: valid buffers; the control messages are walked with the CMSG macros within
    // the buffer the kernel filled.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: max,
        };
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = libc::recvmsg(fd, &mut mh, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(errno());
        }
        b.truncate(n as usize);
        let (mut cred, mut fds) = (None, Vec::new());
        let mut cm = libc::CMSG_FIRSTHDR(&mh);
        while !cm.is_null() {
            let data = libc::CMSG_DATA(cm);
            let len = (*cm).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
            if (*cm).cmsg_level == libc::SOL_SOCKET && (*cm).cmsg_type == libc::SCM_CREDENTIALS {
                let u = std::ptr::read_unaligned(data as *const libc::ucred);
                cred = Some((u.pid, u.uid, u.gid));
            } else if (*cm).cmsg_level == libc::SOL_SOCKET && (*cm).cmsg_type == libc::SCM_RIGHTS {
                for i in 0..len / 4 {
                    fds.push(std::ptr::read_unaligned((data as *const i32).add(i)));
                }
            }
            cm = libc::CMSG_NXTHDR(&mh, cm);
        }
        Ok((b, cred, fds))
    }
}

/// sendmsg with SCM_RIGHTS.
fn send_fds(fd: i32, data: &[u8], fds: &[i32]) {
    let mut cbuf = [0u64; 16];
    // SAFETY: valid buffers; one control message built with the CMSG macros inside `cbuf`.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = libc::CMSG_SPACE((fds.len() * 4) as u32) as usize;
        let cm = libc::CMSG_FIRSTHDR(&mh);
        (*cm).cmsg_level = libc::SOL_SOCKET;
        (*cm).cmsg_type = libc::SCM_RIGHTS;
        (*cm).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cm) as *mut i32, fds.len());
        let n = libc::sendmsg(fd, &mh, libc::MSG_DONTWAIT);
        assert_eq!(
            n,
            data.len() as isize,
            "sendmsg: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn getopt(fd: i32, opt: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    v
}

fn setopt(fd: i32, opt: i32, v: i32) {
    // SAFETY: a valid int option.
    sys(
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&v as *const i32).cast(), 4) },
        &format!("setsockopt {opt}"),
    );
}

fn rcvtimeo(fd: i32) -> (i64, i64) {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&mut tv as *mut libc::timeval).cast(),
            &mut len,
        )
    };
    (tv.tv_sec, tv.tv_usec)
}

fn peercred(fd: i32) -> (i32, u32, u32) {
    let mut u = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut u as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (u.pid, u.uid, u.gid)
}

fn shutdown(fd: i32, how: i32) {
    // SAFETY: plain shutdown(2).
    sys(unsafe { libc::shutdown(fd, how) }, "shutdown");
}

fn close(fd: i32) {
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
}

fn getpid() -> i32 {
    // SAFETY: getpid has no arguments.
    unsafe { libc::getpid() }
}

/// What every socket shows from outside: (type, name, peer name, listening).
fn identity(fd: i32) -> (i32, Addr, Addr, i32) {
    (
        getopt(fd, libc::SO_TYPE),
        name(fd, false),
        name(fd, true),
        getopt(fd, libc::SO_ACCEPTCONN),
    )
}

struct Parts {
    dir: PathBuf,
    embryo_data: bool,
    all: Vec<i32>,
    s1: (i32, i32),
    d2: (i32, i32),
    p3: (i32, i32),
    l4: i32,
    s4: (i32, i32),
    c4b: i32,
    c4c: i32,
    l5: i32,
    c5: i32,
    s6: i32,
    k6: [i32; 3],
    l7: i32,
    s7: (i32, i32),
    d7: i32,
    h8: (i32, i32),
    r8: (i32, i32),
    q8: (i32, i32),
    k9a: i32,
    s9: i32,
    child: i32,
    f10: (i32, i32, usize),
}

fn abstract_name(n: &str) -> Addr {
    Addr::Abstract(format!("cr-wl-unix-{}-{n}", getpid()).into_bytes())
}

fn setup(dir: &Path, embryo_data: bool, ready_r: i32, ready_w: i32) -> Parts {
    let p = |n: &str| Addr::Path(dir.join(n));
    // 1.
    let s1 = pair(libc::SOCK_STREAM);
    setopt(s1.0, libc::SO_SNDBUF, 100_000);
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 500_000,
    };
    // SAFETY: a valid timeval option.
    sys(
        unsafe {
            libc::setsockopt(
                s1.1,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        },
        "SO_RCVTIMEO",
    );
    let mut off = 0;
    for n in [10, 3000, 7] {
        send_all(s1.0, &pattern(1, off + n)[off..]);
        off += n;
    }
    send_all(s1.1, &pattern(2, 5));
    send_all(s1.1, &pattern(2, 100_005)[5..]);
    setopt(s1.1, libc::SO_PEEK_OFF, 0);
    assert_eq!(recv(s1.1, 3, libc::MSG_PEEK).map(|b| b.len()), Ok(3));
    // 2.
    let d2 = pair(libc::SOCK_DGRAM);
    for m in [&b"one"[..], b"", b"three-3", &pattern(3, 1000)] {
        send_all(d2.0, m);
    }
    send_all(d2.1, b"x");
    // 3.
    let p3 = pair(libc::SOCK_SEQPACKET);
    for m in [&b"alpha"[..], &pattern(4, 2000), b"omega"] {
        send_all(p3.0, m);
    }
    send_all(p3.1, b"back");
    // 4.
    let l4 = socket(libc::SOCK_STREAM);
    bind(l4, &p("l4.sock"));
    listen(l4);
    let c4a = socket(libc::SOCK_STREAM);
    connect(c4a, &p("l4.sock")).unwrap();
    let s4a = accept(l4).unwrap();
    send_all(c4a, b"req-a");
    let c4b = socket(libc::SOCK_STREAM);
    connect(c4b, &p("l4.sock")).unwrap();
    if embryo_data {
        send_all(c4b, b"from-c4b");
    }
    let c4c = socket(libc::SOCK_STREAM);
    connect(c4c, &p("l4.sock")).unwrap();
    // 5.
    let l5 = socket(libc::SOCK_SEQPACKET);
    bind(l5, &abstract_name("5"));
    listen(l5);
    let c5 = socket(libc::SOCK_SEQPACKET);
    bind(c5, &p("c5.sock"));
    connect(c5, &abstract_name("5")).unwrap();
    // 6.
    let s6 = socket(libc::SOCK_DGRAM);
    bind(s6, &p("d6.sock"));
    let k6 = [
        socket(libc::SOCK_DGRAM),
        socket(libc::SOCK_DGRAM),
        socket(libc::SOCK_DGRAM),
    ];
    bind(k6[0], &p("d6a.sock"));
    connect(k6[1], &p("d6.sock")).unwrap();
    bind(k6[2], &abstract_name("6c"));
    sendto(k6[0], b"from-a-1", &p("d6.sock"));
    send_all(k6[1], b"from-b-1");
    sendto(k6[2], b"from-c-1", &p("d6.sock"));
    sendto(k6[0], b"from-a-2", &p("d6.sock"));
    // 7.
    let l7 = socket(libc::SOCK_STREAM);
    bind(l7, &p("gone.sock"));
    listen(l7);
    let c7 = socket(libc::SOCK_STREAM);
    connect(c7, &p("gone.sock")).unwrap();
    let s7 = accept(l7).unwrap();
    send_all(c7, b"before-unlink");
    let d7 = socket(libc::SOCK_DGRAM);
    bind(d7, &p("gone-d.sock"));
    sendto(k6[0], b"to-gone", &p("gone-d.sock"));
    std::fs::remove_file(dir.join("gone.sock")).unwrap();
    std::fs::remove_file(dir.join("gone-d.sock")).unwrap();
    // 8.
    let h8 = pair(libc::SOCK_STREAM);
    send_all(h8.0, b"last words");
    shutdown(h8.0, libc::SHUT_WR);
    let r8 = pair(libc::SOCK_STREAM);
    shutdown(r8.0, libc::SHUT_RD);
    let q8 = pair(libc::SOCK_SEQPACKET);
    shutdown(q8.0, libc::SHUT_RDWR);
    // 9.
    let k9 = pair(libc::SOCK_DGRAM);
    setopt(k9.0, libc::SO_PASSCRED, 1);
    let l9 = socket(libc::SOCK_STREAM);
    bind(l9, &p("l9.sock"));
    listen(l9);
    // SAFETY: fork while single-threaded.
    let child = sys(unsafe { libc::fork() }, "fork");
    if child == 0 {
        close(3);
        close(ready_r);
        close(k9.0);
        let c9 = socket(libc::SOCK_STREAM);
        connect(c9, &p("l9.sock")).unwrap();
        send_all(k9.1, b"cred-1");
        send_all(k9.1, b"cred-2");
        let parent = (getppid(), 0, 0);
        // SAFETY: a one-byte write to the ready pipe.
        unsafe { libc::write(ready_w, b"r".as_ptr().cast(), 1) };
        close(ready_w);
        wait_for_check();
        let mut c = Checker::new();
        c.eq(
            peercred(c9),
            parent,
            "child: SO_PEERCRED of its connection (the listener's)",
        );
        send_all(k9.1, b"cred-3");
        send_all(c9, b"child-after");
        child_report("child", c)
    }
    close(k9.1);
    let mut b = [0u8; 1];
    // SAFETY: a read into a valid buffer.
    assert_eq!(
        unsafe { libc::read(ready_r, b.as_mut_ptr().cast(), 1) },
        1,
        "child ready"
    );
    let s9 = accept(l9).unwrap();
    close(l9);
    // 10.
    let f10 = pair(libc::SOCK_STREAM);
    let mut total = 0;
    while let Ok(n) = send(f10.0, &pattern(10, total + 4096)[total..]) {
        total += n;
    }
    let all = vec![
        s1.0, s1.1, d2.0, d2.1, p3.0, p3.1, l4, c4a, s4a, c4b, c4c, l5, c5, s6, k6[0], k6[1],
        k6[2], l7, c7, s7, d7, h8.0, h8.1, r8.0, r8.1, q8.0, q8.1, k9.0, s9, f10.0, f10.1,
    ];
    Parts {
        dir: dir.to_path_buf(),
        embryo_data,
        all,
        s1,
        d2,
        p3,
        l4,
        s4: (c4a, s4a),
        c4b,
        c4c,
        l5,
        c5,
        s6,
        k6,
        l7,
        s7: (c7, s7),
        d7,
        h8,
        r8,
        q8,
        k9a: k9.0,
        s9,
        child,
        f10: (f10.0, f10.1, total),
    }
}

fn getppid() -> i32 {
    // SAFETY: getppid has no arguments.
    unsafe { libc::getppid() }
}

/// Reads exactly `want.len()` bytes from stream `fd` (nonblocking: all must be queued).
fn expect_stream(c: &mut Checker, fd: i32, want: &[u8], what: &str) {
    let mut got = Vec::new();
    while got.len() < want.len() {
        match recv(fd, want.len() - got.len(), 0) {
            Ok(b) if !b.is_empty() => got.extend(b),
            other => {
                c.check(
                    false,
                    format!(
                        "{what}: {} of {} bytes, then {other:?}",
                        got.len(),
                        want.len()
                    ),
                );
                return;
            }
        }
    }
    c.check(got == want, format!("{what}: {} bytes differ", want.len()));
}

fn check(s: &Parts, c: &mut Checker) {
    let p = |n: &str| Addr::Path(s.dir.join(n));
    // 1.
    c.eq(
        getopt(s.s1.1, libc::SO_PEEK_OFF),
        3,
        "1: SO_PEEK_OFF of the receiver",
    );
    c.eq(
        recv(s.s1.1, 5, libc::MSG_PEEK),
        Ok(pattern(1, 8)[3..8].to_vec()),
        "1: peek at offset 3",
    );
    setopt(s.s1.1, libc::SO_PEEK_OFF, -1);
    expect_stream(c, s.s1.1, &pattern(1, 3017), "1: a->b");
    expect_stream(c, s.s1.0, &pattern(2, 100_005), "1: b->a");
    c.check(
        getopt(s.s1.0, libc::SO_SNDBUF) >= 100_000,
        format!("1: SO_SNDBUF {}", getopt(s.s1.0, libc::SO_SNDBUF)),
    );
    c.eq(rcvtimeo(s.s1.1), (2, 500_000), "1: SO_RCVTIMEO");
    c.eq(
        peercred(s.s1.0),
        (getpid(), 0, 0),
        "1: SO_PEERCRED of the pair",
    );
    send_all(s.s1.0, b"more");
    c.eq(recv(s.s1.1, 4, 0), Ok(b"more".to_vec()), "1: new data");
    // 2.
    for (i, m) in [&b"one"[..], b"", b"three-3", &pattern(3, 1000)]
        .iter()
        .enumerate()
    {
        c.eq(
            recv(s.d2.1, 2000, 0),
            Ok(m.to_vec()),
            &format!("2: datagram {i}"),
        );
    }
    c.eq(
        recv(s.d2.1, 10, 0),
        Err(libc::EAGAIN),
        "2: after the queued datagrams",
    );
    c.eq(
        recv(s.d2.0, 10, 0),
        Ok(b"x".to_vec()),
        "2: the datagram b->a",
    );
    // 3.
    for (i, m) in [&b"alpha"[..], &pattern(4, 2000), b"omega"]
        .iter()
        .enumerate()
    {
        c.eq(
            recv(s.p3.1, 4000, 0),
            Ok(m.to_vec()),
            &format!("3: message {i}"),
        );
    }
    c.eq(
        recv(s.p3.0, 100, 0),
        Ok(b"back".to_vec()),
        "3: message b->a",
    );
    // 4.
    c.eq(
        recv(s.s4.1, 100, 0),
        Ok(b"req-a".to_vec()),
        "4: the accepted connection's data",
    );
    match accept(s.l4) {
        Ok(a) => {
            let want = if s.embryo_data {
                Ok(b"from-c4b".to_vec())
            } else {
                Err(libc::EAGAIN)
            };
            c.eq(
                recv(a, 100, 0),
                want,
                "4: first waiting connection (c4b)'s data",
            );
            send_all(s.c4b, b"late-b");
            c.eq(
                recv(a, 100, 0),
                Ok(b"late-b".to_vec()),
                "4: c4b after the accept",
            );
        }
        Err(e) => c.check(false, format!("4: accept of c4b: errno {e}")),
    }
    match accept(s.l4) {
        Ok(a) => {
            send_all(s.c4c, b"hi-c4c");
            c.eq(
                recv(a, 100, 0),
                Ok(b"hi-c4c".to_vec()),
                "4: second waiting connection (c4c)",
            );
        }
        Err(e) => c.check(false, format!("4: accept of c4c: errno {e}")),
    }
    c.eq(accept(s.l4), Err(libc::EAGAIN), "4: a third accept");
    let n = socket(libc::SOCK_STREAM);
    c.eq(
        connect(n, &p("l4.sock")),
        Ok(()),
        "4: a new connection to DIR/l4.sock",
    );
    c.check(accept(s.l4).is_ok(), "4: accept of the new connection");
    // 5.
    match accept(s.l5) {
        Ok(a) => {
            c.eq(
                name(a, true),
                p("c5.sock"),
                "5: the waiting connection's peer",
            );
            send_all(s.c5, b"p5");
            c.eq(recv(a, 100, 0), Ok(b"p5".to_vec()), "5: message on it");
        }
        Err(e) => c.check(false, format!("5: accept: errno {e}")),
    }
    let n = socket(libc::SOCK_SEQPACKET);
    c.eq(
        connect(n, &abstract_name("5")),
        Ok(()),
        "5: a new connection to the abstract name",
    );
    // 6.
    let queued = [
        (p("d6a.sock"), &b"from-a-1"[..]),
        (Addr::Unnamed, b"from-b-1"),
        (abstract_name("6c"), b"from-c-1"),
        (p("d6a.sock"), b"from-a-2"),
    ];
    for (i, (a, m)) in queued.iter().enumerate() {
        c.eq(
            recvfrom(s.s6),
            Ok((a.clone(), m.to_vec())),
            &format!("6: datagram {i} (from, data)"),
        );
    }
    c.eq(
        recvfrom(s.s6).map(|_| ()),
        Err(libc::EAGAIN),
        "6: after the queued datagrams",
    );
    sendto(s.s6, b"re-a", &p("d6a.sock"));
    sendto(s.s6, b"re-c", &abstract_name("6c"));
    c.eq(
        recv(s.k6[0], 100, 0),
        Ok(b"re-a".to_vec()),
        "6: reply to the path-bound sender",
    );
    c.eq(
        recv(s.k6[2], 100, 0),
        Ok(b"re-c".to_vec()),
        "6: reply to the abstract sender",
    );
    send_all(s.k6[1], b"from-b-2");
    c.eq(
        recvfrom(s.s6),
        Ok((Addr::Unnamed, b"from-b-2".to_vec())),
        "6: the connected sender again",
    );
    // 7.
    c.eq(
        name(s.l7, false),
        p("gone.sock"),
        "7: the unlinked listener's name",
    );
    c.check(
        !s.dir.join("gone.sock").exists(),
        "7: DIR/gone.sock exists again",
    );
    c.check(
        !s.dir.join("gone-d.sock").exists(),
        "7: DIR/gone-d.sock exists again",
    );
    c.eq(
        recv(s.s7.1, 100, 0),
        Ok(b"before-unlink".to_vec()),
        "7: the connection's data",
    );
    send_all(s.s7.1, b"answer");
    c.eq(
        recv(s.s7.0, 100, 0),
        Ok(b"answer".to_vec()),
        "7: reply on the connection",
    );
    let n = socket(libc::SOCK_STREAM);
    c.eq(
        connect(n, &p("gone.sock")),
        Err(libc::ENOENT),
        "7: connect to DIR/gone.sock",
    );
    c.eq(
        name(s.d7, false),
        p("gone-d.sock"),
        "7: the unlinked datagram socket's name",
    );
    c.eq(
        recv(s.d7, 100, 0),
        Ok(b"to-gone".to_vec()),
        "7: its queued datagram",
    );
    // 8.
    c.eq(
        recv(s.h8.1, 100, 0),
        Ok(b"last words".to_vec()),
        "8: data before the SHUT_WR",
    );
    c.eq(recv(s.h8.1, 100, 0), Ok(Vec::new()), "8: EOF after it");
    send_all(s.h8.1, b"reply");
    c.eq(
        recv(s.h8.0, 100, 0),
        Ok(b"reply".to_vec()),
        "8: the half-shut side still reads",
    );
    c.eq(
        send(s.h8.0, b"no"),
        Err(libc::EPIPE),
        "8: send on the SHUT_WR side",
    );
    c.eq(
        recv(s.r8.0, 100, 0),
        Ok(Vec::new()),
        "8: recv on the SHUT_RD side",
    );
    c.eq(
        send(s.r8.1, b"no"),
        Err(libc::EPIPE),
        "8: send to the SHUT_RD side",
    );
    c.eq(
        recv(s.q8.1, 100, 0),
        Ok(Vec::new()),
        "8: seqpacket peer of SHUT_RDWR: EOF",
    );
    c.eq(
        send(s.q8.1, b"no"),
        Err(libc::EPIPE),
        "8: seqpacket peer of SHUT_RDWR: send",
    );
    // 9.
    c.eq(getopt(s.k9a, libc::SO_PASSCRED), 1, "9: SO_PASSCRED");
    let creds = Some((s.child, 0, 0));
    for m in ["cred-1", "cred-2"] {
        c.eq(
            recvmsg(s.k9a, 100).map(|(b, cr, _)| (b, cr)),
            Ok((m.as_bytes().to_vec(), creds)),
            &format!("9: queued message {m} (data, credentials)"),
        );
    }
    c.eq(
        peercred(s.s9),
        (s.child, 0, 0),
        "9: SO_PEERCRED of the child's connection",
    );
    check_child(c, "child", s.child);
    c.eq(
        recvmsg(s.k9a, 100).map(|(b, cr, _)| (b, cr)),
        Ok((b"cred-3".to_vec(), creds)),
        "9: the child's message after the restore",
    );
    c.eq(
        recv(s.s9, 100, 0),
        Ok(b"child-after".to_vec()),
        "9: the child's stream",
    );
    // 10.
    let (got, _) = drain(s.f10.1);
    c.check(
        got == pattern(10, s.f10.2),
        format!(
            "10: the full queue: {} of {} bytes, or changed",
            got.len(),
            s.f10.2
        ),
    );
    c.eq(send(s.f10.0, &[7u8; 4096]), Ok(4096), "10: sending again");
}

fn scm(dir: &Path) -> ! {
    let m = pair(libc::SOCK_STREAM);
    let n = pair(libc::SOCK_DGRAM);
    let mut pp = [0; 2];
    let mut pq = [0; 2];
    // SAFETY: valid out-arrays.
    unsafe {
        sys(libc::pipe(pp.as_mut_ptr()), "pipe");
        sys(libc::pipe(pq.as_mut_ptr()), "pipe");
    }
    let f = dir.join("scm-file");
    std::fs::write(&f, b"0123456789").unwrap();
    let cf = CString::new(f.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; an lseek on the new fd.
    let file = unsafe {
        let fd = sys(libc::open(cf.as_ptr(), libc::O_RDONLY), "open");
        libc::lseek(fd, 5, libc::SEEK_SET);
        fd
    };
    // SAFETY: writes from valid buffers into our pipes.
    unsafe {
        libc::write(pp[1], b"through the socket".as_ptr().cast(), 18);
        libc::write(pq[1], b"through a datagram".as_ptr().cast(), 18);
    }
    send_all(m.0, b"before ");
    send_fds(m.0, b"with-fds", &[pp[0], file]);
    send_all(m.0, b"plain");
    send_fds(n.0, b"dg-fd", &[pq[0]]);
    for fd in [pp[0], file, pq[0]] {
        close(fd);
    }
    ready("");
    wait_for_check();
    let mut c = Checker::new();
    c.eq(
        recv(m.1, 7, 0),
        Ok(b"before ".to_vec()),
        "scm: data before the fds",
    );
    match recvmsg(m.1, 100) {
        Ok((b, _, fds)) => {
            c.eq(b, b"with-fds".to_vec(), "scm: the bytes that carry the fds");
            c.eq(fds.len(), 2, "scm: fds received");
            if let [r, fl] = fds[..] {
                c.eq(
                    recv_file(r, 18),
                    b"through the socket".to_vec(),
                    "scm: the pipe's data",
                );
                // SAFETY: lseek on the fd we received.
                c.eq(
                    unsafe { libc::lseek(fl, 0, libc::SEEK_CUR) },
                    5,
                    "scm: the file's offset",
                );
                c.eq(recv_file(fl, 10), b"56789".to_vec(), "scm: the file's data");
            }
        }
        Err(e) => c.check(false, format!("scm: recvmsg: errno {e}")),
    }
    c.eq(
        recv(m.1, 100, 0),
        Ok(b"plain".to_vec()),
        "scm: data after the fds",
    );
    match recvmsg(n.1, 100) {
        Ok((b, _, fds)) => {
            c.eq(b, b"dg-fd".to_vec(), "scm: the datagram");
            c.eq(fds.len(), 1, "scm: fds with the datagram");
            if let [r] = fds[..] {
                c.eq(
                    recv_file(r, 18),
                    b"through a datagram".to_vec(),
                    "scm: that pipe's data",
                );
            }
        }
        Err(e) => c.check(false, format!("scm: recvmsg of the datagram: errno {e}")),
    }
    c.report()
}

fn recv_file(fd: i32, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    // SAFETY: a read into a valid buffer.
    let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), n) };
    b.truncate(r.max(0) as usize);
    b
}

fn outside(path: &str) -> ! {
    let s = socket(libc::SOCK_STREAM);
    connect(s, &Addr::Path(PathBuf::from(path))).expect("connect to the harness");
    // SAFETY: moving our fd to the number the harness expects.
    unsafe {
        sys(libc::dup2(s, 50), "dup2");
        libc::close(s);
    }
    ready("fd=50");
    wait_for_check();
    let mut c = Checker::new();
    send_all(50, b"ping");
    let mut b = [0u8; 4];
    // SAFETY: a blocking read into a valid buffer (the harness answers).
    let n = unsafe { libc::read(50, b.as_mut_ptr().cast(), 4) };
    c.eq((n, &b), (4, b"pong"), "the connection outside the tree");
    c.report()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).expect("usage: wl_unix DIR MODE"));
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    block_check_signal();
    let embryo_data = match args.get(2).map(String::as_str) {
        Some("all") => true,
        Some("running") => false,
        Some("scm") => scm(&dir),
        Some("outside") => outside(args.get(3).expect("outside PATH")),
        other => panic!("unknown mode {other:?}"),
    };
    let mut rp = [0; 2];
    // SAFETY: a valid out-array.
    sys(unsafe { libc::pipe(rp.as_mut_ptr()) }, "pipe");
    let parts = setup(&dir, embryo_data, rp[0], rp[1]);
    close(rp[0]);
    close(rp[1]);
    let ids: Vec<_> = parts.all.iter().map(|&f| identity(f)).collect();
    ready(&format!("pids={},{}", getpid(), parts.child));
    wait_for_check();
    let mut c = Checker::new();
    for (&fd, id) in parts.all.iter().zip(&ids) {
        c.eq(
            identity(fd),
            id.clone(),
            &format!("fd {fd}: (type, name, peer, listening)"),
        );
    }
    check(&parts, &mut c);
    c.report()
}
