//! Bad input and failures: every one gets a clear error naming the thing and the reason, a
//! non-zero exit, and leaves nothing broken behind — a failed dump leaves the target running as
//! before (it still passes its own checks), a failed restore leaves no process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cr_tests::cr_cmd::WatchedCr;
use cr_tests::procfs::tracer_of;
use cr_tests::pty::Pty;
use cr_tests::{
    cr, cr_bin, cr_ok, dump_and_restore, dump_cmd, dump_leave_running, pid_exists, restore_cmd,
    stderr_of, TempDir, Workload,
};

/// wl_memory in `d`: the workload whose dumps these tests break in various ways.
fn memory_workload(d: &TempDir) -> Workload {
    Workload::start("wl_memory", &[&d.s("")], d)
}

fn assert_fails_with(o: &std::process::Output, needle: &str) {
    assert!(!o.status.success(), "expected failure, got {}", o.status);
    let e = stderr_of(o);
    assert!(
        e.contains(needle),
        "error should mention {needle:?}; got: {e}"
    );
    assert!(!e.contains("panicked"), "cr panicked: {e}");
}

/// Unmounts a mount point (lazily) when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs with `options` on a new directory `name` of `d`, unmounted on drop: an images
/// directory the dump cannot write (ro) or fill completely (size).
fn tmpfs(d: &TempDir, name: &str, options: &str) -> (PathBuf, Unmount) {
    let mnt = d.join(name);
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mount a tmpfs ({options}) on {}",
        mnt.display()
    );
    (mnt.clone(), Unmount(mnt))
}

/// A dump just refused `child` (not ours to dump): it must run on untraced. Then it is stopped.
fn assert_untouched_then_kill(mut child: Child) {
    assert_eq!(tracer_of(child.id() as i32), 0);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the target must still run"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn dump_of_a_missing_pid() {
    let d = TempDir::new("missing-pid");
    // PID numbers near pid_max are practically never in use; check to be sure.
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = (max - 7..max).rev().find(|p| !pid_exists(*p)).unwrap();
    let o = cr(&["dump", "-t", &pid.to_string(), "-D", &d.s("img")]);
    assert_fails_with(&o, &format!("no process with PID {pid}"));
    assert!(!d.join("img/inventory.img").exists());
}

#[test]
fn dump_of_a_kernel_thread() {
    let d = TempDir::new("kthread");
    // PID 2 is kthreadd in the initial PID namespace.
    let comm = std::fs::read_to_string("/proc/2/comm").unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "kthreadd",
        "this test expects kthreadd at PID 2"
    );
    let o = cr(&["dump", "-t", "2", "-D", &d.s("img")]);
    assert_fails_with(&o, "kernel thread");
}

#[test]
fn dump_of_cr_itself_and_bad_pids() {
    let d = TempDir::new("badpid");
    assert_fails_with(&cr(&["dump", "-t", "0", "-D", &d.s("img")]), "invalid PID");
    assert_fails_with(&cr(&["dump", "-t", "-5", "-D", &d.s("img")]), "");
}

/// A read-only images directory: the dump fails before it touches the target.
#[test]
fn dump_into_an_unwritable_dir_leaves_the_target_running() {
    let d = TempDir::new("rodir");
    let (mnt, _unmount) = tmpfs(&d, "ro", "ro,size=1m");
    let mut w = memory_workload(&d);
    let o = cr(&[
        "dump",
        "-t",
        &w.pid.to_string(),
        "-D",
        &mnt.join("img").to_string_lossy(),
    ]);
    assert_fails_with(&o, "img");
    assert_eq!(
        tracer_of(w.pid),
        0,
        "target still traced after a failed dump"
    );
    w.assert_pass();
}

/// A dump that fails late — after seizing, remote calls and part of the page copy — because the
/// images directory fills up. The target must run on exactly as before.
#[test]
fn dump_that_runs_out_of_space_leaves_the_target_untouched() {
    let d = TempDir::new("enospc");
    let (mnt, _unmount) = tmpfs(&d, "small", "size=256k");
    let mut w = memory_workload(&d);
    let o = cr(&[
        "dump",
        "-t",
        &w.pid.to_string(),
        "-D",
        &mnt.join("img").to_string_lossy(),
        "-v4",
    ]);
    assert_fails_with(&o, "No space left");
    assert!(
        !mnt.join("img/inventory.img").exists(),
        "a failed dump must not look complete"
    );
    assert_eq!(
        tracer_of(w.pid),
        0,
        "target still traced after a failed dump"
    );
    w.assert_pass();
}

/// SIGTERM to cr while it holds the target: cr unwinds, detaches, exits non-zero.
#[test]
fn sigterm_mid_dump_detaches_cleanly() {
    let d = TempDir::new("sigterm");
    let mut w = Workload::start("wl_memory", &[&d.s(""), "--big"], &d);
    let mut c = WatchedCr::spawn(&["dump", "-t", &w.pid.to_string(), "-D", &d.s("img"), "-v4"]);
    // cr logs when the target is frozen; act on that line, not on a timer.
    c.wait_for_line("frozen");
    // SAFETY: plain kill(2).
    unsafe { libc::kill(c.pid(), libc::SIGTERM) };
    let st = c.finish();
    assert!(!st.success(), "cr should report the interruption");
    assert!(!d.join("img/inventory.img").exists());
    assert_eq!(tracer_of(w.pid), 0, "target still traced");
    w.assert_pass();
}

#[test]
fn restore_from_a_missing_or_incomplete_dir() {
    let d = TempDir::new("noimg");
    assert_fails_with(&cr(&["restore", "-D", &d.s("nope")]), "nope");
    std::fs::create_dir(d.join("empty")).unwrap();
    assert_fails_with(&cr(&["restore", "-D", &d.s("empty")]), "inventory.img");
}

/// Dumps a workload, damages the image with `damage`, and checks restore refuses it with
/// `needle` and leaves no process at the PID.
fn restore_refuses_damaged(name: &str, damage: impl Fn(&Path, i32), needle: &str) {
    let d = TempDir::new(name);
    let mut w = memory_workload(&d);
    let pid = w.pid;
    dump_cmd(&w, &d).ok();
    w.reap_killed();
    damage(&d.join("img"), pid);
    let o = restore_cmd(&d).run();
    assert_fails_with(&o, needle);
    assert!(!pid_exists(pid), "a failed restore left PID {pid} behind");
}

#[test]
fn restore_refuses_a_truncated_image() {
    restore_refuses_damaged(
        "truncated",
        |img, pid| {
            let p = img.join(format!("core-{pid}.img"));
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        },
        "core-",
    );
}

#[test]
fn restore_refuses_a_flipped_page_byte() {
    restore_refuses_damaged(
        "flipped",
        |img, pid| {
            use std::os::unix::fs::FileExt;
            let p = img.join(format!("pages-{pid}.img"));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            let mut b = [0u8; 1];
            // First data page (after the 4 KiB header page), somewhere in the middle.
            f.read_exact_at(&mut b, 4096 + 1234).unwrap();
            b[0] ^= 0x40;
            f.write_all_at(&b, 4096 + 1234).unwrap();
        },
        "pages-",
    );
}

#[test]
fn restore_refuses_a_missing_file() {
    restore_refuses_damaged(
        "missing-file",
        |img, pid| std::fs::remove_file(img.join(format!("mm-{pid}.img"))).unwrap(),
        "mm-",
    );
}

/// The PID is held by a live process: restore waits a few seconds, then says who holds it.
#[test]
fn restore_while_the_pid_is_taken() {
    let d = TempDir::new("taken");
    let mut w = memory_workload(&d);
    dump_leave_running(&w, &d, &[]);
    // The original runs on (-R) and holds the PID.
    let o = restore_cmd(&d).run();
    assert_fails_with(&o, &format!("PID {} is taken", w.pid));
    w.assert_pass();
}

/// The PID's owner is dying (killed by the dump, not yet reaped): restore waits for it.
#[test]
fn restore_waits_for_a_dying_owner() {
    let d = TempDir::new("dying");
    let mut w = memory_workload(&d);
    dump_cmd(&w, &d).ok();
    cr_tests::become_subreaper();
    let mut c = WatchedCr::spawn(&["restore", "-D", &d.s("img"), "-d", "-v4"]);
    c.wait_for_line("still taken");
    // Only now let the zombie go.
    w.reap_killed();
    assert!(
        c.finish().success(),
        "restore should succeed once the PID is free"
    );
    w.assert_pass();
}

/// --leave-running: the original keeps running unchanged, and the image restores too.
#[test]
fn dump_leave_running_then_restore() {
    let d = TempDir::new("leave-running");
    let mut w = memory_workload(&d);
    dump_leave_running(&w, &d, &[]);
    assert_eq!(tracer_of(w.pid), 0);
    w.assert_pass();
    // The original exited after its check; restore the image taken while it ran.
    let mut w2 = Workload {
        child: None,
        pid: w.pid,
        result: w.result.clone(),
        info: String::new(),
    };
    std::fs::remove_file(&w.result).unwrap();
    cr_tests::become_subreaper();
    restore_cmd(&d).ok();
    w2.assert_pass();
}

/// Without -d, `cr restore` waits for the task and exits with its status; --pidfile says the
/// PID (here a FIFO, so the harness learns it the moment it is written).
#[test]
fn restore_attached_exits_with_the_task_status() {
    let d = TempDir::new("attached");
    let mut w = memory_workload(&d);
    dump_cmd(&w, &d).ok();
    w.reap_killed();
    let fifo = d.join("pid.fifo");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut child = Command::new(cr_bin())
        .args(["restore", "-D", &d.s("img"), "--pidfile"])
        .arg(&fifo)
        .spawn()
        .unwrap();
    let pid: i32 = std::fs::read_to_string(&fifo)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, w.pid);
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let st = child.wait().unwrap();
    let res = std::fs::read_to_string(&w.result).unwrap();
    assert!(res.starts_with("PASS"), "{res}");
    assert_eq!(
        st.code(),
        Some(0),
        "cr restore exits with the task's status"
    );
    w.child = None;
}

/// A dumped image restores into the same state twice in a row is not possible (same PID), but
/// `cr show` must read every file of it.
#[test]
fn show_prints_every_image_file_as_json() {
    let d = TempDir::new("show");
    let mut w = memory_workload(&d);
    dump_and_restore(&mut w, &d, &[], &[]);
    w.assert_pass();
    let o = cr_ok(&["show", &d.s("img")]);
    let out = String::from_utf8_lossy(&o.stdout);
    for f in [
        "inventory.img",
        "pstree.img",
        "files.img",
        &format!("core-{}.img", w.pid),
        &format!("mm-{}.img", w.pid),
    ] {
        assert!(out.contains(f), "show output lacks {f}");
    }
    assert!(
        out.contains("\"frozen_us\""),
        "inventory stats missing from show"
    );
}

/// A process whose session leader is outside the dump is refused, pointing at --shell-job, and
/// left running untouched.
#[test]
fn dump_refuses_a_foreign_session_without_shell_job() {
    let d = TempDir::new("foreign-session");
    // `sleep` stays in the test runner's session, whose leader is not dumped.
    let child = Command::new("sleep")
        .arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let o = cr(&["dump", "-t", &child.id().to_string(), "-D", &d.s("img")]);
    assert_fails_with(&o, "--shell-job");
    assert_untouched_then_kill(child);
}

/// A process with a controlling terminal is refused, pointing at --shell-job.
#[test]
fn dump_refuses_a_controlling_terminal_without_shell_job() {
    let d = TempDir::new("ctty");
    let pty = Pty::open();
    let child = pty.spawn(Command::new("sleep").arg("1000"));
    let o = cr(&["dump", "-t", &child.id().to_string(), "-D", &d.s("img")]);
    assert_fails_with(&o, "--shell-job");
    assert_fails_with(&o, "terminal");
    assert_untouched_then_kill(child);
}
