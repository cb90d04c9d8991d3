//! --shell-job: a program started from a shell on a terminal (its session leader, the shell,
//! and its terminal are outside the dumped tree) is dumped, then restored into cr's session on
//! cr's own terminal, where it reads and writes as before. Real terminals: ptys allocated here.
//!
//! Where cr itself is the session leader of the new terminal (the tests that run it straight
//! on a pty), restore waits (no -d): a session leader's exit hangs its terminal up and sends
//! SIGHUP to the foreground group, which the restored job has joined. In real use a shell leads
//! the session and runs cr; `restore -j -d` is tested that way.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cr_tests::procfs::{stat_field, tracer_of};
use cr_tests::pty::Pty;
use cr_tests::{become_subreaper, cr_bin, wait_child, wait_exit, CrCmd, KillOnDrop, TempDir};

/// `cr restore -j` (waiting, not -d: cr is the session leader of the new terminal, and a
/// session leader's exit hangs up its terminal) on a fresh pty. See
/// [`detached_shell_job_keeps_the_shells_terminal`] for -d.
fn restore_on(pty: &Pty, img: &str) -> Child {
    pty.spawn(&mut CrCmd::new(&["restore", "-D", img, "-j", "-o", "restore.log", "-v4"]).command())
}

const PROG: &str = r#"
import os, sys
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    line = line.strip()
    if line == "quit":
        sys.exit(7)
    print("echo:" + line, os.getpid(), flush=True)
"#;

/// Starts [`PROG`] from `sh` on a fresh terminal, checks that it answers there and that a dump
/// without -j refuses it, then dumps it with -j into `img` (the shell then goes on and exits).
/// Returns its PID, free again for the restore.
fn dump_python_shell_job(img: &str) -> i32 {
    let mut pty1 = Pty::open();
    let mut sh =
        pty1.spawn(Command::new("sh").args(["-c", "python3 -u -c \"$0\"; echo shell-after", PROG]));
    let line = pty1.expect_line("ready ");
    let pid: i32 = line
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {line:?}"));
    pty1.type_line("a");
    pty1.expect(&format!("echo:a {pid}"));
    // Its session leader (sh) and terminal are outside the tree.
    let err =
        CrCmd::new(&["dump", "-t", &pid.to_string(), "-D", img]).fails("a shell job needs -j");
    assert!(err.contains("--shell-job"), "{err}");
    CrCmd::dump(pid, img).arg("-j").ok();
    pty1.expect("shell-after");
    assert_eq!(wait_child(&mut sh), 0, "the shell's exit status");
    pid
}

/// A python3 loop started from a shell on a terminal: dumped with -j, restored with -j on
/// another terminal, it reads what is typed there and answers there, and its exit status is
/// cr's.
#[test]
fn python_started_from_a_shell_moves_to_crs_terminal() {
    become_subreaper();
    let d = TempDir::new("shell-job-python");
    let img = d.s("img");
    let pid = dump_python_shell_job(&img);

    // Without -j, restore refuses the shell job.
    let err = CrCmd::new(&["restore", "-D", &img, "-d"]).fails("a shell job needs -j");
    assert!(err.contains("--shell-job"), "restore without -j: {err}");

    let mut pty2 = Pty::open();
    let mut crp = restore_on(&pty2, &img);
    let crpid = crp.id() as i64;
    pty2.type_line("b");
    let seen = pty2.expect(&format!("echo:b {pid}"));
    assert!(!seen.contains("echo:a"), "{seen:?}");
    // In cr's session and process group (the terminal's foreground group, so reading works).
    assert_eq!(
        stat_field(pid, 6),
        Some(crpid),
        "session of the restored process"
    );
    assert_eq!(
        stat_field(pid, 5),
        Some(crpid),
        "process group of the restored process"
    );
    let tty = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
    assert_eq!(tty, pty2.slave_path(), "stdin of the restored process");
    pty2.type_line("quit");
    let st = wait_child(&mut crp);
    assert_eq!(
        st,
        7,
        "cr restore exits with the restored process's status\n{}",
        d.img_log("restore.log")
    );
}

/// `sleep` started from a shell: dumped and restored with -j; it runs on in cr's session with
/// cr's terminal.
#[test]
fn sleep_started_from_a_shell_restores_with_shell_job() {
    become_subreaper();
    let d = TempDir::new("shell-job-sleep");
    let img = d.s("img");
    let mut pty1 = Pty::open();
    let mut sh = pty1.spawn(
        Command::new("sh").args(["-c", "sleep 1000 & echo started $!; wait; echo shell-after"]),
    );
    let line = pty1.expect_line("started ");
    let pid: i32 = line
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {line:?}"));
    CrCmd::dump(pid, &img).arg("-j").ok();
    pty1.expect("shell-after");
    assert_eq!(wait_child(&mut sh), 0, "the shell's exit status");
    let pty2 = Pty::open();
    let mut crp = restore_on(&pty2, &img);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Restored once it runs in cr's session as `sleep` and cr has let it go (at its very
    // start the new task is an untraced copy of cr for an instant).
    let comm = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    while stat_field(pid, 6) != Some(crp.id() as i64) || tracer_of(pid) != 0 || comm(pid) != "sleep"
    {
        assert!(
            Instant::now() < deadline,
            "sleep was not restored into cr's session\n{}",
            d.img_log("restore.log")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let tty = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    assert_eq!(tty, pty2.slave_path(), "stdout of the restored sleep");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "sleep"
    );
    // SAFETY: plain kill(2) of the restored process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(
        wait_child(&mut crp),
        128 + libc::SIGTERM,
        "cr restore's exit status"
    );
}

/// `cr restore -j -d` as a user runs it: typed to a shell that leads the session of its
/// terminal (here `sh -c`, which makes no process group per command, so cr runs in the shell's
/// group, the terminal's foreground). cr returns at once; the restored python3 is in the
/// shell's session and foreground group, no longer cr's child, and after cr's exit it still
/// reads what is typed on that terminal and answers there (each line a new read, so none was
/// started while cr was alive). As CRIU does, the tree joins cr's group: from a job-control
/// shell (bash -i) that group stops being the foreground once cr, the shell's job, exits.
#[test]
fn detached_shell_job_keeps_the_shells_terminal() {
    become_subreaper();
    let d = TempDir::new("shell-job-detached");
    let img = d.s("img");
    let pid = dump_python_shell_job(&img);
    let _job = KillOnDrop(pid);

    let mut pty2 = Pty::open();
    // The shell stays, as an interactive one would (exec: the session leader keeps its pid).
    let script =
        r#""$0" restore -j -d -D "$1" -o restore.log -v4; echo cr-exited $?; exec sleep 1000"#;
    let cr = cr_bin();
    let mut sh = pty2.spawn(Command::new("sh").args(["-c", script]).arg(&cr).arg(&img));
    let _shell = KillOnDrop(sh.id() as i32);
    let shpid = sh.id() as i64;
    let status = pty2.expect_line("cr-exited ");
    assert_eq!(
        status,
        "0",
        "cr restore -j -d failed\n{}",
        d.img_log("restore.log")
    );
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as i64;
    assert_eq!(
        stat_field(pid, 4),
        Some(me),
        "cr is gone: its restored child is handed to us (subreaper)"
    );
    assert_eq!(
        stat_field(pid, 6),
        Some(shpid),
        "session of the restored process"
    );
    assert_eq!(
        stat_field(pid, 5),
        Some(shpid),
        "process group of the restored process"
    );
    assert_eq!(
        stat_field(pid, 8),
        Some(shpid),
        "foreground group of its terminal"
    );
    let tty = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
    assert_eq!(tty, pty2.slave_path(), "stdin of the restored process");
    for word in ["b", "c", "d"] {
        pty2.type_line(word);
        let seen = pty2.expect(&format!("echo:{word} {pid}"));
        assert!(!seen.contains("echo:a"), "{seen:?}");
    }
    pty2.type_line("quit");
    assert_eq!(
        wait_exit(pid),
        7,
        "exit status of the restored process\n{}",
        d.img_log("restore.log")
    );
    // SAFETY: plain kill(2) of the shell we started.
    unsafe { libc::kill(sh.id() as i32, libc::SIGKILL) };
    assert_eq!(
        wait_child(&mut sh),
        128 + libc::SIGKILL,
        "the shell's exit status"
    );
}
