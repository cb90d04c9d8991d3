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
