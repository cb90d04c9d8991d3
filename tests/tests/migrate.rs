//! `cr migrate` (issue 14): pre-copy rounds over TCP while the workload keeps dirtying its
//! memory, the final freeze, the restore on the destination, the source killed only then. The
//! destination runs in a PID namespace of its own (made by the test with unshare), so the tree
//! comes back at its PIDs while the source still exists; the restored workload checks every
//! page itself. A destination that fails the restore leaves the source running, unharmed.
//!
//! Must run as root (ptrace, eBPF, namespaces): `cargo xtask test` does.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cr_tests::cr_cmd::{cr_bin, CrCmd};
use cr_tests::{become_subreaper, require_root, sys, TempDir, Workload};

/// A `cr migrate --listen` as PID 1's child in a new PID namespace (with its own /proc): once
/// it exits, the namespace's init (`sleep`) keeps the restored tree's namespace alive.
struct Destination {
    child: Child,
    port: u16,
}

impl Destination {
    fn start(dir: &Path) -> Destination {
        let (r, w) = sys::pipe_cloexec();
        let wfd = w.as_raw_fd();
        let script = format!(
            "{} migrate --listen 0 --address 127.0.0.1 -D {} --status-fd 3 -o migrate.log -v4; echo $? > {}/rc; exec sleep 3600",
            cr_bin().display(),
            dir.display(),
            dir.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if wfd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(wfd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start unshare");
        drop(w);
        let mut line = String::new();
        BufReader::new(std::fs::File::from(r))
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("destination status {line:?}"));
        eprintln!("destination listening on 127.0.0.1:{port} in a new PID namespace");
        Destination { child, port }
    }

    /// The exit status of `cr migrate --listen` (waits for it), and its log.
    fn result(&self, dir: &Path) -> (i32, String) {
        let t0 = Instant::now();
        let rc = loop {
            if let Ok(s) = std::fs::read_to_string(dir.join("rc")) {
                if s.ends_with('\n') {
                    break s.trim().parse().unwrap_or(-1);
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "cr migrate --listen did not finish"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(dir.join("migrate.log")).unwrap_or_default();
        eprintln!("destination: exit {rc}\n--- its log ---\n{log}");
        (rc, log)
    }

    /// The host PID of the process that is `inner` in the destination's namespace.
    fn host_pid(&self, inner: i32) -> i32 {
        let init = first_child(self.child.id() as i32).expect("the namespace's init");
        let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).unwrap();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let Some(nspid) = status.lines().find_map(|l| l.strip_prefix("NSpid:")) else {
                continue;
            };
            let ids: Vec<i32> = nspid
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
            if ids.len() == 2 && ids[1] == inner && theirs.as_ref() == Some(&ns) {
                return pid;
            }
        }
        panic!("no process {inner} in the destination's PID namespace");
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        // The namespace's init first: every process in it dies with it.
        if let Some(init) = first_child(self.child.id() as i32) {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(init, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first child of `pid` (unshare's: the namespace's init).
fn first_child(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Sends SIGUSR1 to `pid` (not our child) and waits for it to exit (a pidfd); returns what it
/// wrote as its result.
fn verify_foreign(pid: i32, result: &Path) -> String {
    let _ = std::fs::remove_file(result);
    // SAFETY: pidfd_open(2) and kill(2) of a process we looked up just now.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(fd >= 0, "pidfd_open({pid})");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 120_000) };
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    assert_eq!(n, 1, "the restored workload did not finish its check");
    std::fs::read_to_string(result).unwrap_or_else(|e| format!("no result file: {e}"))
}

/// Pre-copy migration of 64 MiB dirtied all along: rounds while it runs, then the move; the
/// source is gone, the destination's copy checks every page, each round printed its line.
#[test]
fn precopy_migration_moves_the_workload_with_every_page() {
    require_root();
    become_subreaper();
    let d = TempDir::new("migrate");
    let (src, dst) = (d.join("src"), d.join("dst"));
    std::fs::create_dir_all(&dst).unwrap();
    let mut c = Workload::start("wl_dirty_chain", &["64"], &d);
    let pid = c.pid;
    let dest = Destination::start(&dst);
    let out = CrCmd::new(&["migrate", "-t", &pid.to_string(), "--to"])
        .arg(format!("127.0.0.1:{}", dest.port))
        .args(&["-D"])
        .arg(&src)
        .ok();
    let err = cr_tests::cr_cmd::stderr_of(&out);
    let rounds = err.lines().filter(|l| l.contains("migrate: round")).count();
    assert!(rounds >= 1, "no progress line per round:\n{err}");
    assert!(
        err.lines().any(|l| l.contains("MiB sent")
            && l.contains("dirty rate")
            && l.contains("estimated freeze")),
        "{err}"
    );
    c.reap_killed();
    let (rc, _) = dest.result(&dst);
    assert_eq!(rc, 0, "cr migrate --listen failed");
    let there = dest.host_pid(pid);
    let res = verify_foreign(there, &c.result);
    assert!(
        res.starts_with("PASS"),
        "the migrated workload reported {res}"
    );
}

/// The destination cannot restore (a process holds the PID there): the migration fails, the
/// source runs on and passes its own check.
#[test]
fn failed_restore_at_the_destination_leaves_the_source_running() {
    require_root();
    become_subreaper();
    let d = TempDir::new("migrate-fail");
    let (src, dst) = (d.join("src"), d.join("dst"));
    std::fs::create_dir_all(&dst).unwrap();
    let mut c = Workload::start("wl_dirty_chain", &["16"], &d);
    // No PID namespace: the source's own PID is taken where the destination restores.
    let (r, w) = sys::pipe_cloexec();
    let wfd = w.as_raw_fd();
    let mut cmd = CrCmd::new(&["migrate", "--listen", "0", "--address", "127.0.0.1", "-D"])
        .arg(&dst)
        .args(&["--status-fd", "3", "-o", "migrate.log", "-v4"])
        .command();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(wfd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut listener = cmd.stdout(Stdio::null()).spawn().unwrap();
    drop(w);
    let mut line = String::new();
    BufReader::new(std::fs::File::from(r))
        .read_line(&mut line)
        .unwrap();
    let e = CrCmd::new(&["migrate", "-t", &c.pid.to_string(), "--to"])
        .arg(format!("127.0.0.1:{}", line.trim()))
        .args(&["-D"])
        .arg(&src)
        .fails("the destination cannot restore at a PID in use");
    assert!(e.contains("runs on here"), "{e}");
    assert!(!listener.wait().unwrap().success());
    c.assert_pass();
}
