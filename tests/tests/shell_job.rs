//! --shell-job: a program started from a shell on a terminal (its session leader, the shell,
//! and its terminal are outside the dumped tree) is dumped, then restored into cr's session on
//! cr's own terminal, where it reads and writes as before. Real terminals: ptys allocated here.
//!
//! Where cr itself is the session leader of the new terminal (the tests that run it straight
//! on a pty), restore waits (no -d): a session leader's exit hangs its terminal up and sends
//! SIGHUP to the foreground group, which the restored job has joined. In real use a shell leads
//! the session and runs cr; `restore -j -d` is tested that way.

use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cr_tests::{become_subreaper, cr, cr_bin, wait_exit, TempDir};

/// A pty: the master (ours) and the slave's path.
struct Pty {
    master: std::fs::File,
    slave: CString,
}

impl Pty {
    fn open() -> Pty {
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on a fresh master fd we own.
        unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(m >= 0, "posix_openpt");
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            let slave = CStr::from_ptr(libc::ptsname(m)).to_owned();
            Pty { master: std::fs::File::from(OwnedFd::from_raw_fd(m)), slave }
        }
    }

    /// Starts `cmd` as the leader of a new session whose controlling terminal (and stdin,
    /// stdout, stderr) is this pty's slave.
    fn spawn(&self, cmd: &mut Command) -> Child {
        let slave = self.slave.clone();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
                if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for n in 0..3 {
                    libc::dup2(fd, n);
                }
                if fd > 2 {
                    libc::close(fd);
                }
                Ok(())
            });
        }
        cmd.spawn().expect("start a process on the pty")
    }

    /// Reads the terminal's output until `needle` shows up (or panics after a while); returns
    /// everything read.
    fn expect(&mut self, needle: &str) -> String {
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the terminal never showed {needle:?}; it showed {seen:?}");
            let mut p = libc::pollfd { fd: self.master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) } <= 0 {
                continue;
            }
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(10)),
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    }

    /// Waits for a whole line containing `prefix`; returns what follows the prefix on it.
    fn expect_line(&mut self, prefix: &str) -> String {
        let mut seen = self.expect(prefix);
        loop {
            let after = seen.split(prefix).nth(1).unwrap_or("").to_string();
            if let Some((line, _)) = after.split_once('\n') {
                return line.trim().to_string();
            }
            seen.push_str(&self.expect("\n"));
        }
    }

    fn type_line(&mut self, s: &str) {
        self.master.write_all(format!("{s}\n").as_bytes()).expect("type on the terminal");
    }
}

fn stat_field(pid: i32, n: usize) -> i64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // Fields after the comm: state is field 3.
    rest.split_whitespace().nth(n - 3).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

/// `cr restore -j` (waiting, not -d: cr is the session leader of the new terminal, and a
/// session leader's exit hangs up its terminal) on a fresh pty. See
/// [`detached_shell_job_keeps_the_shells_terminal`] for -d.
fn restore_on(pty: &Pty, img: &str) -> Child {
    let mut cmd = Command::new(cr_bin());
    cmd.args(["restore", "-D", img, "-j", "-o", "restore.log", "-v4"]);
    pty.spawn(&mut cmd)
}

fn wait_child(c: &mut Child, what: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = c.try_wait().expect("wait") {
            use std::os::unix::process::ExitStatusExt;
            return st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn show_log(dir: &TempDir, name: &str) -> String {
    std::fs::read_to_string(dir.join(&format!("img/{name}"))).unwrap_or_default()
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

/// Sends SIGKILL to a process when dropped, so that a failing test leaves nothing behind.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: plain kill(2); the process may be gone already.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// Starts [`PROG`] from `sh` on a fresh terminal, checks that it answers there and that a dump
/// without -j refuses it, then dumps it with -j into `img` (the shell then goes on and exits).
/// Returns its PID, free again for the restore.
fn dump_python_shell_job(d: &TempDir, img: &str) -> i32 {
    let mut pty1 = Pty::open();
    let mut sh = pty1.spawn(Command::new("sh").args(["-c", "python3 -u -c \"$0\"; echo shell-after", PROG]));
    let line = pty1.expect_line("ready ");
    let pid: i32 = line.parse().unwrap_or_else(|_| panic!("no pid in {line:?}"));
    pty1.type_line("a");
    pty1.expect(&format!("echo:a {pid}"));
    // Its session leader (sh) and terminal are outside the tree.
    let o = cr(&["dump", "-t", &pid.to_string(), "-D", img]);
    assert!(!o.status.success(), "a shell job was dumped without -j");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shell-job"));
    let o = cr(&["dump", "-t", &pid.to_string(), "-D", img, "-j", "-o", "dump.log", "-v4"]);
    assert!(o.status.success(), "dump -j failed:\n{}", show_log(d, "dump.log"));
    pty1.expect("shell-after");
    assert_eq!(wait_child(&mut sh, "the shell"), 0);
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
    let pid = dump_python_shell_job(&d, &img);

    // Without -j, restore refuses the shell job.
    let o = cr(&["restore", "-D", &img, "-d"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--shell-job"), "restore without -j");

    let mut pty2 = Pty::open();
    let mut crp = restore_on(&pty2, &img);
    let crpid = crp.id() as i64;
    pty2.type_line("b");
    let seen = pty2.expect(&format!("echo:b {pid}"));
    assert!(!seen.contains("echo:a"), "{seen:?}");
    // In cr's session and process group (the terminal's foreground group, so reading works).
    assert_eq!(stat_field(pid, 6), crpid, "session of the restored process");
    assert_eq!(stat_field(pid, 5), crpid, "process group of the restored process");
    let tty = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
    assert_eq!(tty.as_os_str().as_encoded_bytes(), pty2.slave.as_bytes(), "stdin of the restored process");
    pty2.type_line("quit");
    let st = wait_child(&mut crp, "cr restore");
    assert_eq!(st, 7, "cr restore exits with the restored process's status\n{}", show_log(&d, "restore.log"));
}

/// `sleep` started from a shell: dumped and restored with -j; it runs on in cr's session with
/// cr's terminal.
#[test]
fn sleep_started_from_a_shell_restores_with_shell_job() {
    become_subreaper();
    let d = TempDir::new("shell-job-sleep");
    let img = d.s("img");
    let mut pty1 = Pty::open();
    let mut sh = pty1.spawn(Command::new("sh").args(["-c", "sleep 1000 & echo started $!; wait; echo shell-after"]));
    let line = pty1.expect_line("started ");
    let pid: i32 = line.parse().unwrap_or_else(|_| panic!("no pid in {line:?}"));
    let o = cr(&["dump", "-t", &pid.to_string(), "-D", &img, "-j", "-o", "dump.log", "-v4"]);
    assert!(o.status.success(), "dump -j failed:\n{}", show_log(&d, "dump.log"));
    pty1.expect("shell-after");
    assert_eq!(wait_child(&mut sh, "the shell"), 0);
    let pty2 = Pty::open();
    let mut crp = restore_on(&pty2, &img);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Restored once it runs in cr's session as `sleep` and cr has let it go (at its very
    // start the new task is an untraced copy of cr for an instant).
    let traced = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| s.lines().any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")))
            .unwrap_or(true)
    };
    let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
    while stat_field(pid, 6) != crp.id() as i64 || traced(pid) || comm(pid) != "sleep" {
        assert!(Instant::now() < deadline, "sleep was not restored into cr's session\n{}", show_log(&d, "restore.log"));
        std::thread::sleep(Duration::from_millis(10));
    }
    let tty = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    assert_eq!(tty.as_os_str().as_encoded_bytes(), pty2.slave.as_bytes(), "stdout of the restored sleep");
    assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim(), "sleep");
    // SAFETY: plain kill(2) of the restored process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(wait_child(&mut crp, "cr restore"), 128 + libc::SIGTERM);
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
    let pid = dump_python_shell_job(&d, &img);
    let _job = KillOnDrop(pid);

    let mut pty2 = Pty::open();
    // The shell stays, as an interactive one would (exec: the session leader keeps its pid).
    let script = r#""$0" restore -j -d -D "$1" -o restore.log -v4; echo cr-exited $?; exec sleep 1000"#;
    let cr = cr_bin();
    let mut sh = pty2.spawn(Command::new("sh").args(["-c", script]).arg(&cr).arg(&img));
    let _shell = KillOnDrop(sh.id() as i32);
    let shpid = sh.id() as i64;
    let status = pty2.expect_line("cr-exited ");
    assert_eq!(status, "0", "cr restore -j -d failed\n{}", show_log(&d, "restore.log"));
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as i64;
    assert_eq!(stat_field(pid, 4), me, "cr is gone: its restored child is handed to us (subreaper)");
    assert_eq!(stat_field(pid, 6), shpid, "session of the restored process");
    assert_eq!(stat_field(pid, 5), shpid, "process group of the restored process");
    assert_eq!(stat_field(pid, 8), shpid, "foreground group of its terminal");
    let tty = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
    assert_eq!(tty.as_os_str().as_encoded_bytes(), pty2.slave.as_bytes(), "stdin of the restored process");
    for word in ["b", "c", "d"] {
        pty2.type_line(word);
        let seen = pty2.expect(&format!("echo:{word} {pid}"));
        assert!(!seen.contains("echo:a"), "{seen:?}");
    }
    pty2.type_line("quit");
    assert_eq!(wait_exit(pid), 7, "exit status of the restored process\n{}", show_log(&d, "restore.log"));
    // SAFETY: plain kill(2) of the shell we started.
    unsafe { libc::kill(sh.id() as i32, libc::SIGKILL) };
    assert_eq!(wait_child(&mut sh, "the shell"), 128 + libc::SIGKILL);
}
