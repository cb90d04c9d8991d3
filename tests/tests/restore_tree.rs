//! Dump and restore of threads and process trees: every thread at its TID with its own state,
//! every process at its PID under its parent, in its group and session, zombies as zombies,
//! and files and memory shared across fork still shared.

use cr_tests::{
    dump_and_restore, dump_and_restore_tree, dump_leave_running, CrCmd, TempDir, Workload,
};

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
    dump_leave_running(&w, &d, &[]);
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
    dump_leave_running(&w, &d, &[]);
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
        let log = std::fs::read_to_string(d.join(&format!("img/restore.log.{pid}")))
            .unwrap_or_else(|e| panic!("restore.log.{pid}: {e}"));
        assert!(
            log.contains(&pid.to_string()),
            "restore.log.{pid} says nothing about {pid}:\n{log}"
        );
    }
    let main = d.img_log("restore.log");
    assert!(
        main.contains("restored in"),
        "the main log lost the summary:\n{main}"
    );
    w.assert_pass();
}

/// The PIDs of the processes in an image's pstree.img (from `cr show`).
fn image_pids(img: &std::path::Path) -> Vec<i32> {
    let out = cr_tests::cr_ok(&["show", &img.join("pstree.img").to_string_lossy()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"pid\": "))
        .filter_map(|v| v.trim_end_matches(',').parse().ok())
        .collect()
}

/// A shell forking /bin/true as fast as it can: the tree changes while it is being frozen
/// (children appear, exit, become zombies). Dumps with -R succeed every time; after a dump and
/// restore the shell goes on forking.
#[test]
fn busy_forking_shell_is_dumped_and_restored() {
    use std::os::unix::process::CommandExt;
    cr_tests::become_subreaper();
    let d = TempDir::new("busy-shell");
    let mut cmd = std::process::Command::new("sh");
    // Nothing shared with the test runner (its output grows between dump and restore).
    cmd.args(["-c", "while :; do /bin/true; done"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid between fork and exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut sh = cmd.spawn().expect("start sh");
    let pid = sh.id() as i32;
    for i in 0..5 {
        CrCmd::dump(pid, d.join(&format!("r{i}"))).arg("-R").ok();
    }
    let img = d.join("img");
    CrCmd::dump(pid, &img).ok();
    sh.wait().unwrap();
    for p in image_pids(&img).into_iter().filter(|&p| p != pid) {
        cr_tests::reap_orphan(p);
    }
    CrCmd::restore(&img).ok();
    // It goes on forking: its voluntary context switches climb.
    let switches = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let before = switches();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while switches() < before + 50 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let after = switches();
    // SAFETY: plain kill(2) of the restored shell.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    cr_tests::reap_orphan(pid);
    assert!(
        after >= before + 50,
        "the restored shell does not run on ({before} → {after} context switches)"
    );
}
