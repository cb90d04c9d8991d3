//! A tree whose processes run as different users (root, nobody, www-data) across a dump and
//! restore started by root (issue 11; tests/src/bin/wl_users.rs checks each process's own
//! view): credentials, capabilities, rlimits (read without CAP_SYS_RESOURCE, which this
//! machine's root lacks), dumpable, cwd, umask and fds opened before and after setuid.

use cr_tests::{
    dump_and_restore_tree, dump_leave_running, pre_dump_then_dump_and_restore, TempDir, Workload,
};

fn start(d: &TempDir) -> Workload {
    let w = Workload::start("wl_users", &[&d.s("")], d);
    assert_eq!(w.tree_pids().len(), 4, "pids: {}", w.info);
    w
}

#[test]
fn users_control() {
    let d = TempDir::new("users-control");
    start(&d).assert_pass();
}

#[test]
fn users_restore() {
    let d = TempDir::new("users");
    let mut w = start(&d);
    let pids = w.tree_pids();
    dump_and_restore_tree(&mut w, &d, &pids, &[], &[]);
    w.assert_pass();
}

#[test]
fn users_leave_running() {
    let d = TempDir::new("users-R");
    let mut w = start(&d);
    dump_leave_running(&w, &d, &[]);
    w.assert_pass();
}

#[test]
fn users_pre_dump_then_track_mem_dump() {
    let d = TempDir::new("users-inc");
    let mut w = start(&d);
    let pids = w.tree_pids();
    pre_dump_then_dump_and_restore(&mut w, &d, &pids, &[], &[], || {});
    w.assert_pass();
}
