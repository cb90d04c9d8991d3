//! Dump and restore of threads and process trees: every thread at its TID with its own state,
//! every process at its PID under its parent, in its group and session, zombies as zombies,
//! and files and memory shared across fork still shared.

use cr_tests::{cr, dump_and_restore, dump_and_restore_tree, TempDir, Workload};

#[test]
fn threads_workload_passes_undisturbed() {
    let d = TempDir::new("threads-control");
    let mut w = Workload::start("wl_threads", &[], &d);
    w.assert_pass();
}

#[test]
fn threads_survive_dump_and_restore() {
    let d = TempDir::new("threads");
    let mut w = Workload::start("wl_threads", &[], &d);
    dump_and_restore(&mut w, &d, &[], &[]);
    w.assert_pass();
}

#[test]
fn threads_run_on_after_leave_running() {
    let d = TempDir::new("threads-R");
    let mut w = Workload::start("wl_threads", &[], &d);
    let img = d.s("img");
    let out = cr(&["dump", "-t", &w.pid.to_string(), "-D", &img, "-R", "-o", "dump.log", "-v4"]);
    assert!(out.status.success(), "dump -R failed");
    w.assert_pass();
}

#[test]
fn tree_workload_passes_undisturbed() {
    let d = TempDir::new("tree-control");
    let mut w = Workload::start("wl_tree", &[&d.s("")], &d);
    assert_eq!(w.tree_pids().len(), 6, "pids: {}", w.info);
    w.assert_pass();
}

#[test]
fn tree_survives_dump_and_restore() {
    let d = TempDir::new("tree");
    let mut w = Workload::start("wl_tree", &[&d.s("")], &d);
    let pids = w.tree_pids();
    assert_eq!(pids.len(), 6, "pids: {}", w.info);
    dump_and_restore_tree(&mut w, &d, &pids, &[], &[]);
    w.assert_pass();
}

#[test]
fn tree_runs_on_after_leave_running() {
    let d = TempDir::new("tree-R");
    let mut w = Workload::start("wl_tree", &[&d.s("")], &d);
    let img = d.s("img");
    let out = cr(&["dump", "-t", &w.pid.to_string(), "-D", &img, "-R", "-o", "dump.log", "-v4"]);
    assert!(out.status.success(), "dump -R failed");
    w.assert_pass();
}

/// --log-pid: the lines about each restored process go to restore.log.PID.
#[test]
fn tree_restore_logs_per_pid() {
    let d = TempDir::new("tree-log-pid");
    let mut w = Workload::start("wl_tree", &[&d.s("")], &d);
    let pids = w.tree_pids();
    dump_and_restore_tree(&mut w, &d, &pids, &[], &["--log-pid"]);
    for pid in &pids {
        let log = std::fs::read_to_string(d.join(&format!("img/restore.log.{pid}"))).unwrap_or_else(|e| panic!("restore.log.{pid}: {e}"));
        assert!(log.contains(&pid.to_string()), "restore.log.{pid} says nothing about {pid}:\n{log}");
    }
    let main = std::fs::read_to_string(d.join("img/restore.log")).unwrap();
    assert!(main.contains("restored in"), "the main log lost the summary:\n{main}");
    w.assert_pass();
}
