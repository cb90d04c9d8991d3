//! TCP connections and listeners across dump and restore (tests/src/bin/wl_tcp.rs):
//! `--tcp-established` with TCP_REPAIR, and the refusal without it.

use cr_tests::{cr, dump_and_restore, TempDir, Workload};

#[test]
fn local_control() {
    let d = TempDir::new("tcp-local-control");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    w.assert_pass();
}

#[test]
fn local_restore() {
    let d = TempDir::new("tcp-local");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    dump_and_restore(&mut w, &d, &["--tcp-established"], &["--tcp-established"]);
    w.assert_pass();
}

#[test]
fn local_leave_running() {
    let d = TempDir::new("tcp-local-r");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    let (img, pid) = (d.s("img"), w.pid.to_string());
    let out = cr(&["dump", "-t", &pid, "-D", &img, "-R", "--tcp-established", "-o", "dump.log", "-v4"]);
    assert!(out.status.success(), "dump -R failed: {}", String::from_utf8_lossy(&out.stderr));
    w.assert_pass();
}

#[test]
fn refused_without_flag() {
    let d = TempDir::new("tcp-refused");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    let (img, pid) = (d.s("img"), w.pid.to_string());
    let out = cr(&["dump", "-t", &pid, "-D", &img, "-o", "dump.log", "-v4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dump without --tcp-established succeeded");
    assert!(err.contains("--tcp-established"), "the refusal does not name the flag: {err}");
    // Refused before anything changed: the workload runs on and passes.
    w.assert_pass();
}

/// A peer outside the dumped tree: accepts one connection and exchanges the counting streams
/// of `wl_tcp stream` until told to stop. Returns (sent, received) or what went wrong.
struct Peer {
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Result<(u64, u64), String>>,
}

fn peer(bind: &str) -> Peer {
    use std::io::{ErrorKind, Read, Write};
    use std::sync::atomic::Ordering;
    let l = std::net::TcpListener::bind(bind).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_nonblocking(true).unwrap();
        let (mut sent, mut recvd) = (0u64, 0u64);
        let mut buf = [0u8; 65536];
        while !st.load(Ordering::SeqCst) {
            let chunk: Vec<u8> = (sent..sent + 4096).map(|i| (i % 251) as u8).collect();
            match s.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("peer write after {sent} bytes: {e}")),
            }
            match s.read(&mut buf) {
                Ok(0) => {
                    // The workload is done (orderly FIN): close our side too.
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    return Ok((sent, recvd));
                }
                Ok(n) => {
                    for (k, &b) in buf[..n].iter().enumerate() {
                        let i = recvd + k as u64;
                        if b != (i % 251) as u8 {
                            return Err(format!("peer: byte {i} is {b}"));
                        }
                    }
                    recvd += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("peer read after {recvd} bytes: {e}")),
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok((sent, recvd))
    });
    Peer { addr, stop, handle }
}

impl Peer {
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.join().unwrap().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// No pin of a lock taken for `pid` is left in bpffs.
fn assert_no_lock_left(pid: i32) {
    let prefix = format!("netlock-{pid}-");
    let left: Vec<String> = std::fs::read_dir("/sys/fs/bpf/cr")
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&prefix)).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "network lock pins left: {left:?}");
}

#[test]
fn stream_control() {
    let d = TempDir::new("tcp-stream-control");
    let p = peer("127.0.0.1:0");
    let mut w = Workload::start("wl_tcp", &["stream", &p.addr], &d);
    w.assert_pass();
    let (sent, recvd) = p.finish();
    assert!(sent > 0 && recvd > 0);
}

#[test]
fn stream_restore_peer_keeps_sending() {
    let d = TempDir::new("tcp-stream");
    let p = peer("127.0.0.1:0");
    let mut w = Workload::start("wl_tcp", &["stream", &p.addr], &d);
    dump_and_restore(&mut w, &d, &["--tcp-established"], &["--tcp-established"]);
    assert_no_lock_left(w.pid);
    w.assert_pass();
    let (sent, recvd) = p.finish();
    assert!(sent > 256 << 10 && recvd > 256 << 10, "peer sent {sent}, received {recvd}");
}

#[test]
fn stream_leave_running_releases_lock() {
    let d = TempDir::new("tcp-stream-r");
    let p = peer("127.0.0.1:0");
    let mut w = Workload::start("wl_tcp", &["stream", &p.addr], &d);
    let (img, pid) = (d.s("img"), w.pid.to_string());
    let out = cr(&["dump", "-t", &pid, "-D", &img, "-R", "--tcp-established", "-o", "dump.log", "-v4"]);
    assert!(out.status.success(), "dump -R failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_no_lock_left(w.pid);
    w.assert_pass();
    p.finish();
}

/// Two network namespaces joined by a veth pair (10.213.0.1 in `a`, 10.213.0.2 in `b`),
/// removed when dropped.
struct NetPair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl NetPair {
    fn new() -> NetPair {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("cra{id}"), format!("crb{id}"));
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        let pair = NetPair { a: a.clone(), b: b.clone() };
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        for (ns, dev, addr) in [(&a, &va, "10.213.0.1/24"), (&b, &vb, "10.213.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Moves the calling thread (and the threads and processes it starts) into netns `name`.
fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: setns on a valid namespace fd; affects this thread only.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

#[test]
fn stream_restore_across_netns() {
    let ns = NetPair::new();
    let d = TempDir::new("tcp-netns");
    let b = ns.b.clone();
    let p = std::thread::spawn(move || {
        enter_netns(&b);
        peer("10.213.0.2:0")
    })
    .join()
    .unwrap();
    let (a, addr) = (ns.a.clone(), p.addr.clone());
    std::thread::spawn(move || {
        enter_netns(&a);
        let mut w = Workload::start("wl_tcp", &["stream", &addr], &d);
        dump_and_restore(&mut w, &d, &["--tcp-established"], &["--tcp-established"]);
        assert_no_lock_left(w.pid);
        w.assert_pass();
    })
    .join()
    .unwrap();
    let (sent, recvd) = p.finish();
    assert!(sent > 256 << 10 && recvd > 256 << 10, "peer sent {sent}, received {recvd}");
}

/// `cr restore` of an image with established connections without --tcp-established is refused
/// naming the flag (the lock stays); with it, the restore then works.
#[test]
fn restore_needs_flag_then_works() {
    let d = TempDir::new("tcp-restore-flag");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    cr_tests::become_subreaper();
    let (img, pid) = (d.s("img"), w.pid.to_string());
    let out = cr(&["dump", "-t", &pid, "-D", &img, "--tcp-established", "-o", "dump.log", "-v4"]);
    assert!(out.status.success(), "dump failed: {}", String::from_utf8_lossy(&out.stderr));
    w.reap_killed();
    let out = cr(&["restore", "-D", &img, "-d", "-o", "restore.log", "-v4"]);
    assert!(!out.status.success(), "restore without --tcp-established succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tcp-established"), "the refusal does not name the flag: {err}");
    let out = cr(&["restore", "-D", &img, "-d", "--tcp-established", "-o", "restore.log", "-v4"]);
    assert!(out.status.success(), "restore failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_no_lock_left(w.pid);
    w.assert_pass();
}

/// A restore finds the lock gone (removed behind cr's back): refused, as the peers may have
/// reset the connections meanwhile.
#[test]
fn restore_refused_when_lock_gone() {
    let d = TempDir::new("tcp-unlocked");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    cr_tests::become_subreaper();
    let (img, pid) = (d.s("img"), w.pid.to_string());
    let out = cr(&["dump", "-t", &pid, "-D", &img, "--tcp-established", "-o", "dump.log", "-v4"]);
    assert!(out.status.success(), "dump failed: {}", String::from_utf8_lossy(&out.stderr));
    w.reap_killed();
    let rec = cr::net::lock::read_record(&d.join("img")).unwrap().expect("a lock record");
    cr::net::lock::release(&rec, None);
    let out = cr(&["restore", "-D", &img, "-d", "--tcp-established", "-o", "restore.log", "-v4"]);
    assert!(!out.status.success(), "restore without the lock succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lock"), "the refusal does not say why: {err}");
}

/// A longer downtime (a refused restore first) while the peer keeps sending: still no reset.
#[test]
fn stream_restore_after_refused_restore() {
    let d = TempDir::new("tcp-stream-refused");
    let p = peer("127.0.0.1:0");
    let mut w = Workload::start("wl_tcp", &["stream", &p.addr], &d);
    cr_tests::become_subreaper();
    let (img, pid) = (d.s("img"), w.pid.to_string());
    let out = cr(&["dump", "-t", &pid, "-D", &img, "--tcp-established", "-o", "dump.log", "-v4"]);
    assert!(out.status.success(), "dump failed: {}", String::from_utf8_lossy(&out.stderr));
    w.reap_killed();
    let out = cr(&["restore", "-D", &img, "-d", "-o", "restore.log", "-v4"]);
    assert!(!out.status.success(), "restore without --tcp-established succeeded");
    let out = cr(&["restore", "-D", &img, "-d", "--tcp-established", "-o", "restore.log", "-v4"]);
    assert!(out.status.success(), "restore failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_no_lock_left(w.pid);
    w.assert_pass();
    let (sent, recvd) = p.finish();
    assert!(sent > 256 << 10 && recvd > 256 << 10, "peer sent {sent}, received {recvd}");
}

/// 100 established connections (200 sockets) with unread data: all restored. Prints how long
/// the connections stayed locked (dump start to restore end, an upper bound) for the record.
#[test]
fn hundred_connections() {
    let d = TempDir::new("tcp-many");
    let mut w = Workload::start("wl_tcp", &["many", "100"], &d);
    let t0 = std::time::Instant::now();
    dump_and_restore(&mut w, &d, &["--tcp-established"], &["--tcp-established"]);
    let locked = t0.elapsed();
    eprintln!("BENCH tcp: 100 established connections locked for at most {:.1} ms (dump + restore)", locked.as_secs_f64() * 1e3);
    assert_no_lock_left(w.pid);
    w.assert_pass();
}
