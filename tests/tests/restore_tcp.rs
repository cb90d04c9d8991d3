//! TCP connections and listeners across dump and restore (tests/src/bin/wl_tcp.rs):
//! `--tcp-established` with TCP_REPAIR, and the refusal without it.

use cr_tests::net::{assert_no_lock_left, enter_netns, locked_ms, NetPair, Peer};
use cr_tests::{
    dump_and_reap, dump_and_restore, dump_cmd, dump_leave_running, restore_cmd, TempDir, Workload,
};

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

/// The same over IPv6 loopback: addresses, the lock's keys and the rebuilt sockets are
/// family-specific.
#[test]
fn local_restore_ipv6() {
    let d = TempDir::new("tcp-local6");
    let mut w = Workload::start("wl_tcp", &["local6"], &d);
    dump_and_restore(&mut w, &d, &["--tcp-established"], &["--tcp-established"]);
    w.assert_pass();
}

#[test]
fn local_ipv6_control() {
    let d = TempDir::new("tcp-local6-control");
    let mut w = Workload::start("wl_tcp", &["local6"], &d);
    w.assert_pass();
}

#[test]
fn local_leave_running() {
    let d = TempDir::new("tcp-local-r");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    dump_leave_running(&w, &d, &["--tcp-established"]);
    w.assert_pass();
}

#[test]
fn refused_without_flag() {
    let d = TempDir::new("tcp-refused");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    let err = dump_cmd(&w, &d)
        .fails("the process holds established connections and --tcp-established is not given");
    assert!(
        err.contains("--tcp-established"),
        "the refusal does not name the flag: {err}"
    );
    // Refused before anything changed: the workload runs on and passes.
    w.assert_pass();
}

/// Stops the peer of a stream that went through a checkpoint: more than 256 KiB went each way
/// (the workload checks the bytes it got; the peer checked the ones it got).
fn assert_streamed_through(p: Peer) {
    let (sent, recvd) = p.finish();
    assert!(
        sent > 256 << 10 && recvd > 256 << 10,
        "peer sent {sent}, received {recvd}"
    );
}

#[test]
fn stream_control() {
    let d = TempDir::new("tcp-stream-control");
    let p = Peer::start("127.0.0.1:0");
    let mut w = Workload::start("wl_tcp", &["stream", &p.addr], &d);
    w.assert_pass();
    let (sent, recvd) = p.finish();
    assert!(sent > 0 && recvd > 0);
}

#[test]
fn stream_restore_peer_keeps_sending() {
    let d = TempDir::new("tcp-stream");
    let p = Peer::start("127.0.0.1:0");
    let mut w = Workload::start("wl_tcp", &["stream", &p.addr], &d);
    dump_and_restore(&mut w, &d, &["--tcp-established"], &["--tcp-established"]);
    assert_no_lock_left(w.pid);
    w.assert_pass();
    assert_streamed_through(p);
}

#[test]
fn stream_leave_running_releases_lock() {
    let d = TempDir::new("tcp-stream-r");
    let p = Peer::start("127.0.0.1:0");
    let mut w = Workload::start("wl_tcp", &["stream", &p.addr], &d);
    dump_leave_running(&w, &d, &["--tcp-established"]);
    assert_no_lock_left(w.pid);
    w.assert_pass();
    p.finish();
}

#[test]
fn stream_restore_across_netns() {
    let ns = NetPair::create();
    let d = TempDir::new("tcp-netns");
    let b = ns.b.clone();
    let p = std::thread::spawn(move || {
        enter_netns(&b);
        Peer::start("10.213.0.2:0")
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
    assert_streamed_through(p);
}

/// A restore of `d`'s image without --tcp-established must be refused, naming the flag.
fn assert_restore_needs_flag(d: &TempDir) {
    let err = restore_cmd(d)
        .fails("the image holds established connections and --tcp-established is not given");
    assert!(
        err.contains("--tcp-established"),
        "the refusal does not name the flag: {err}"
    );
}

/// `cr restore` of an image with established connections without --tcp-established is refused
/// naming the flag (the lock stays); with it, the restore then works.
#[test]
fn restore_needs_flag_then_works() {
    let d = TempDir::new("tcp-restore-flag");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    dump_and_reap(&mut w, &d, &["--tcp-established"]);
    assert_restore_needs_flag(&d);
    restore_cmd(&d).arg("--tcp-established").ok();
    assert_no_lock_left(w.pid);
    w.assert_pass();
}

/// A restore finds the lock gone (`cr network-unlock` removed it): refused, as the peers may
/// have reset the connections meanwhile. The lock was pinned (it outlived the dump) and
/// network-unlock removes every pin of it; a second network-unlock is fine.
#[test]
fn restore_refused_when_lock_gone() {
    let d = TempDir::new("tcp-unlocked");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    dump_and_reap(&mut w, &d, &["--tcp-established"]);
    let pins = std::fs::read_dir("/sys/fs/bpf/cr")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("netlock-{}-", w.pid))
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(pins, 1, "the dump that killed its tree left no pinned lock");
    let img = d.s("img");
    cr_tests::cr_ok(&["network-unlock", "-D", &img]);
    assert_no_lock_left(w.pid);
    cr_tests::cr_ok(&["network-unlock", "-D", &img]);
    let err = restore_cmd(&d)
        .arg("--tcp-established")
        .fails("the network lock is gone");
    assert!(err.contains("lock"), "the refusal does not say why: {err}");
}

/// A longer downtime (a refused restore first) while the peer keeps sending: still no reset.
#[test]
fn stream_restore_after_refused_restore() {
    let d = TempDir::new("tcp-stream-refused");
    let p = Peer::start("127.0.0.1:0");
    let mut w = Workload::start("wl_tcp", &["stream", &p.addr], &d);
    dump_and_reap(&mut w, &d, &["--tcp-established"]);
    assert_restore_needs_flag(&d);
    restore_cmd(&d).arg("--tcp-established").ok();
    assert_no_lock_left(w.pid);
    w.assert_pass();
    assert_streamed_through(p);
}

/// 100 established connections (200 sockets) with unread data: all restored. Prints how long
/// the connections stayed locked, as the restore measured it (lock taken by the dump to lock
/// removed by the restore), for the record.
#[test]
fn hundred_connections() {
    let d = TempDir::new("tcp-many");
    let mut w = Workload::start("wl_tcp", &["many", "100"], &d);
    dump_and_restore(&mut w, &d, &["--tcp-established"], &["--tcp-established"]);
    let log = d.img_log("restore.log");
    let ms = locked_ms(&log).unwrap_or_else(|| {
        panic!("restore.log does not say how long the connections were locked:\n{log}")
    });
    eprintln!(
        "BENCH tcp: 100 established connections locked for {ms:.3} ms (from the restore log)"
    );
    assert_no_lock_left(w.pid);
    w.assert_pass();
}
