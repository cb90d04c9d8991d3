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
