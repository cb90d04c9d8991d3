//! Shared helpers for cr's integration tests (the harness side) and workloads (the process side).
//!
//! The protocol between them, for every dump/restore test:
//! 1. The harness starts a workload with a "ready" pipe as fd 3 and a result file path.
//! 2. The workload sets up its state (memory, files, signals, …), calls `setsid()` so it owns its
//!    session, writes `READY` on fd 3 and closes it, then waits for SIGUSR1.
//! 3. The harness dumps it (`cr dump`), reaps it, restores it (`cr restore -d`), and sends
//!    SIGUSR1 to the restored process.
//! 4. The workload checks its own state and writes `PASS` or `FAIL: why` to the result file, then
//!    exits 0 (pass) or 1 (fail). The harness reads both (it is the subreaper of restored tasks).
//!
//! Modules: [`workload`] (the process side of the protocol), [`cr_cmd`] (running cr: command
//! lines, failure reports), [`fdinfo`] (the kernel's view of a workload's own fds),
//! [`services`] (Debian's redis-server and nginx run by the tests, and their clients),
//! [`procfs`] (what /proc says about a process), [`pty`] (terminals), [`net`] (TCP peers,
//! network namespaces, the network lock), [`sys`] (syscall wrappers the workloads share),
//! [`page_pattern`] (the page contents of wl_dirty, for both sides).

pub mod cr_cmd;
pub mod fdinfo;
pub mod net;
pub mod page_pattern;
pub mod procfs;
pub mod pty;
pub mod services;
pub mod sys;
pub mod workload;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub use cr_cmd::{cr, cr_bin, cr_ok, stderr_of, CrCmd};

/// Fails the test at once, saying why, unless it runs as root: dumps (ptrace of other users'
/// tasks, PR_SET_MM_MAP, clone3 set_tid) and the tracker (eBPF) need it.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (ptrace, eBPF): run it as root (cargo xtask test does)"
    );
}

/// Makes this process the subreaper of everything it starts, so restored tasks (whose parent,
/// `cr restore -d`, exits) become our children and we can collect their exit status.
pub fn become_subreaper() {
    // SAFETY: plain prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
}

/// A scratch directory under /tmp/cr-tests, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join("cr-tests").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
    pub fn s(&self, sub: &str) -> String {
        self.0.join(sub).to_string_lossy().into_owned()
    }
    /// The log `name` cr wrote into DIR/img, the images directory of [`dump_cmd`] and
    /// [`restore_cmd`] (empty when there is none): for failure messages and log checks.
    pub fn img_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.0.join("img").join(name)).unwrap_or_default()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running workload started by the harness.
pub struct Workload {
    pub child: Option<Child>,
    pub pid: i32,
    pub result: PathBuf,
    /// What the workload wrote after READY on its ready pipe (e.g. addresses it wants to share).
    pub info: String,
}

/// Path of a workload binary of this crate.
pub fn workload_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // Tests run from target/<profile>/deps/, binaries (demo, bench) from target/<profile>/.
    let mut dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "workload {} not built (run through `cargo xtask test`)",
        p.display()
    );
    p
}

impl Workload {
    /// Starts workload `name` with `args`; returns once it said READY.
    pub fn start(name: &str, args: &[&str], dir: &TempDir) -> Workload {
        Workload::launch(name, args, dir, false)
    }

    /// [`Workload::start`] for a workload driven by commands: its stdin and stdout are pipes
    /// to the harness, returned beside it.
    pub fn start_piped(
        name: &str,
        args: &[&str],
        dir: &TempDir,
    ) -> (Workload, ChildStdin, ChildStdout) {
        let mut w = Workload::launch(name, args, dir, true);
        let child = w.child.as_mut().expect("the workload just started");
        let (stdin, stdout) = (
            child.stdin.take().expect("piped stdin"),
            child.stdout.take().expect("piped stdout"),
        );
        (w, stdin, stdout)
    }

    fn launch(name: &str, args: &[&str], dir: &TempDir, piped: bool) -> Workload {
        let result = dir.join(&format!("{name}.result"));
        let (r, w) = sys::pipe_cloexec();
        let wfd = w.as_raw_fd();
        let mut cmd = Command::new(workload_bin(name));
        // The workload's stderr goes to a file of its own: a file that others append to (the
        // test runner's output) would change size between dump and restore.
        let errlog = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(&format!("{name}.stderr")))
            .unwrap();
        let stdio = || if piped { Stdio::piped() } else { Stdio::null() };
        cmd.args(args)
            .env("CR_RESULT", &result)
            .stdin(stdio())
            .stdout(stdio())
            .stderr(errlog);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if wfd == 3 {
                    // dup2(3, 3) would keep FD_CLOEXEC: clear it instead.
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(wfd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start workload");
        drop(w);
        let pid = child.id() as i32;
        let mut out = String::new();
        let mut f = std::fs::File::from(r);
        f.read_to_string(&mut out).expect("read the ready pipe");
        assert!(
            out.starts_with("READY"),
            "workload {name} did not get ready: {out:?}"
        );
        let info = out.trim_start_matches("READY").trim().to_string();
        // For the record (shown when a test fails): what the workload holds open.
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        format!(
                            "{}->{}",
                            e.file_name().to_string_lossy(),
                            std::fs::read_link(e.path())
                                .map(|p| p.display().to_string())
                                .unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        eprintln!("workload {name} ({pid}) ready; fds: {}", fds.join(" "));
        Workload {
            child: Some(child),
            pid,
            result,
            info,
        }
    }

    /// After a dump killed it: reap the original process so its PID is free for restore.
    pub fn reap_killed(&mut self) {
        let mut c = self.child.take().expect("the original child");
        // A dump that claims success without killing the tree must fail the test, not hang it:
        // wait for the exit on a pidfd, within a bound.
        if !exits_within(c.id() as i32, 60_000) {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "the dumped workload {} was still running 60 s after the dump; expected it killed",
                c.id()
            );
        }
        let st = c.wait().unwrap();
        assert!(
            !st.success(),
            "the dumped workload exited normally ({st}); expected it killed"
        );
    }

    /// After a `dump -R` left it running: kill the original and reap it, so that its PID is
    /// free for a restore of the image.
    pub fn kill_and_reap(&mut self) {
        // SAFETY: plain kill(2) of our child.
        assert_eq!(
            unsafe { libc::kill(self.pid, libc::SIGKILL) },
            0,
            "kill workload {}",
            self.pid
        );
        self.reap_killed();
    }

    /// The processes of a tree workload, from its READY info (`pids=ROOT,PID,...`).
    pub fn tree_pids(&self) -> Vec<i32> {
        self.info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pids="))
            .map(|l| l.split(',').filter_map(|p| p.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// After a dump killed a whole tree: reap the root, then (as subreaper) every other process
    /// of `pids` once it has been handed to us, so that every PID is free for restore.
    pub fn reap_killed_tree(&mut self, pids: &[i32]) {
        self.reap_killed();
        for &pid in pids.iter().filter(|&&p| p != self.pid) {
            reap_orphan(pid);
        }
    }

    /// Sends SIGUSR1 ("check yourself") and waits for the verdict; returns (exit status, result).
    pub fn verify(&mut self) -> (i32, String) {
        // SAFETY: plain kill(2).
        assert_eq!(
            unsafe { libc::kill(self.pid, libc::SIGUSR1) },
            0,
            "signal workload {}",
            self.pid
        );
        let status = wait_exit(self.pid);
        let res = std::fs::read_to_string(&self.result)
            .unwrap_or_else(|e| format!("no result file: {e}"));
        self.child = None;
        (status, res)
    }

    /// Sends SIGUSR1 and asserts the workload reports PASS and exits 0.
    pub fn assert_pass(&mut self) {
        let (st, res) = self.verify();
        let errlog = self.result.with_extension("stderr");
        let stderr = std::fs::read_to_string(&errlog).unwrap_or_default();
        assert!(
            res.starts_with("PASS"),
            "workload {} reported: {res} (exit status {st}); its stderr:\n{stderr}",
            self.pid
        );
        assert_eq!(st, 0, "workload {} exit status", self.pid);
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // Never leave a workload behind, whatever the test did.
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        } else {
            let mut st = 0;
            // SAFETY: waitpid on a pid we may be the (sub)reaper of; failure is fine.
            unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
        }
    }
}

/// Sends SIGKILL to a process when dropped (the process may be gone already), so that a test
/// that fails half-way leaves nothing running; for processes that are not a [`Workload`].
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// How long a workload may take to check itself and exit.
pub const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits for `pid` (our child or, as subreaper, an adopted task) to exit; returns its exit code
/// (128+signal when killed).
///
/// A workload that does not finish within [`WAIT_LIMIT`] (a broken restore can leave it stuck)
/// is killed, so the test fails instead of hanging the whole run.
pub fn wait_exit(pid: i32) -> i32 {
    kill_unless_it_exits(pid);
    let mut st = 0;
    loop {
        // SAFETY: valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::Interrupted,
            "waitpid({pid}): {e}"
        );
    }
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    }
}

/// [`wait_exit`] for a process we started and hold the [`Child`] of.
pub fn wait_child(c: &mut Child) -> i32 {
    kill_unless_it_exits(c.id() as i32);
    let st = c.wait().expect("wait for our child");
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Waits up to [`WAIT_LIMIT`] for `pid` to exit (without reaping it), then kills it.
fn kill_unless_it_exits(pid: i32) {
    // SAFETY: pidfd_open takes integers and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd >= 0 {
        let mut p = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut p, 1, WAIT_LIMIT.as_millis() as i32) };
        if ready == 0 {
            eprintln!("process {pid} did not exit within {WAIT_LIMIT:?}: killing it");
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(pidfd) };
    }
}

/// Waits until `pid` (a process of a killed tree, handed to us as subreaper when its parent
/// died) is reaped. The hand-over has no event we could wait for, so this polls briefly.
pub fn reap_orphan(pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut st = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG | libc::__WALL) };
        if r == pid || !pid_exists(pid) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} of the dumped tree was never handed to us"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether a process with this pid exists (zombies included).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `cr dump` of `w` into DIR/img with the harness's log options (DIR/img/dump.log, -v4): add
/// the flags the test is about, then run it.
pub fn dump_cmd(w: &Workload, dir: &TempDir) -> CrCmd {
    CrCmd::dump(w.pid, dir.join("img"))
}

/// `cr restore -d` of DIR/img with the harness's log options, the restored root's PID written
/// to DIR/restore.pid.
pub fn restore_cmd(dir: &TempDir) -> CrCmd {
    CrCmd::restore(dir.join("img")).pidfile(dir.join("restore.pid"))
}

/// `cr dump -R EXTRA` of `w`, which must succeed: the workload runs on, and its own check then
/// says whether the dump disturbed it.
pub fn dump_leave_running(w: &Workload, dir: &TempDir, extra: &[&str]) {
    dump_cmd(w, dir).arg("-R").args(extra).ok();
}

/// After a dump that must have refused `w`: no complete image was left (no inventory in
/// DIR/img) and the workload still runs (its own check then says whether it was disturbed).
pub fn assert_dump_refused_cleanly(w: &Workload, dir: &TempDir) {
    assert!(
        !dir.join("img/inventory.img").exists(),
        "a refused dump left a complete image (an inventory)"
    );
    assert!(
        procfs::running(w.pid),
        "the workload is not running after the refused dump"
    );
}

/// dump (killing it) → reap: `w`'s PID is free for the restore the test runs itself (to see it
/// refused, say). The harness becomes the subreaper first, to collect the restored tasks.
pub fn dump_and_reap(w: &mut Workload, dir: &TempDir, dump_extra: &[&str]) {
    dump_and_reap_tree(w, dir, &[], dump_extra)
}

/// [`dump_and_reap`] for a workload with descendants: `pids` (e.g. [`Workload::tree_pids`]) are
/// reaped as well.
pub fn dump_and_reap_tree(w: &mut Workload, dir: &TempDir, pids: &[i32], dump_extra: &[&str]) {
    become_subreaper();
    dump_cmd(w, dir).args(dump_extra).ok();
    w.reap_killed_tree(pids);
}

/// dump → reap → restore -d → return. The workload is then the restored process.
pub fn dump_and_restore(
    w: &mut Workload,
    dir: &TempDir,
    dump_extra: &[&str],
    restore_extra: &[&str],
) {
    dump_and_restore_tree(w, dir, &[], dump_extra, restore_extra)
}

/// [`dump_and_restore`] for a workload with descendants: `pids` (e.g. [`Workload::tree_pids`])
/// are reaped after the dump as well.
pub fn dump_and_restore_tree(
    w: &mut Workload,
    dir: &TempDir,
    pids: &[i32],
    dump_extra: &[&str],
    restore_extra: &[&str],
) {
    dump_and_reap_tree(w, dir, pids, dump_extra);
    restore_cmd(dir).args(restore_extra).ok();
    let pidfile = dir.join("restore.pid");
    let got: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(got, w.pid, "restored at another pid");
}

/// Whether process `pid` (a child of ours, not yet reaped) exits within `ms` milliseconds:
/// its pidfd polls readable when it does.
pub fn exits_within(pid: i32, ms: i32) -> bool {
    // SAFETY: pidfd_open with integer arguments; the fd is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        // Already gone (and reaped by someone else): it did exit.
        return true;
    }
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let r = loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break r;
        }
    };
    // SAFETY: the fd opened above, closed once.
    unsafe { libc::close(fd) };
    r > 0
}

/// `cr pre-dump` of `w` into DIR/p1 (the tracker starts), then the final `cr dump --track-mem
/// --prev-images-dir ../p1 EXTRA` into DIR/img, reaping `pids` (the tree's other processes)
/// and restoring from DIR/img with `restore_extra`: the incremental path a service takes.
/// `between` runs after the pre-dump, before the final dump (to change memory meanwhile).
pub fn pre_dump_then_dump_and_restore(
    w: &mut Workload,
    dir: &TempDir,
    pids: &[i32],
    dump_extra: &[&str],
    restore_extra: &[&str],
    between: impl FnOnce(),
) {
    become_subreaper();
    CrCmd::pre_dump(w.pid, dir.join("p1"))
        .args(dump_extra)
        .env("CR_TRACKER_LOG", dir.join("tracker.log"))
        .ok();
    between();
    dump_cmd(w, dir)
        .args(&["--track-mem", "--prev-images-dir", "../p1"])
        .args(dump_extra)
        .ok();
    w.reap_killed_tree(pids);
    restore_cmd(dir).args(restore_extra).ok();
}
