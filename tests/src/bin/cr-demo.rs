//! `cargo xtask demo`: start a small counter service, dump it, show it gone, restore it, and
//! show it counting on from where it stopped.
//!
//! The service is a daemon with stdio of its own (stdin and stdout /dev/null, stderr a file in
//! the demo's directory), in a session of its own, with no other inherited fd: so the demo
//! works the same whether its caller's output is a terminal (which would need --shell-job), a
//! file (which the demo keeps writing to, so it would change size between dump and restore) or
//! a pipe. A failure is one clear message and exit status 1; the service is never left behind.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

/// How often the service writes a line (wl_counter's period).
const PERIOD_MS: u64 = 200;
/// How long to wait for the service to reach a count before calling it stuck.
const COUNT_LIMIT: Duration = Duration::from_secs(10);

/// Prints a line on stdout, ignoring a closed stdout (`cargo xtask demo | head`): the demo
/// still runs to its end and cleans up instead of dying of a broken pipe.
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

fn main() -> ExitCode {
    let dir = std::env::temp_dir().join(format!("cr-demo-{}", std::process::id()));
    let mut demo = Demo { dir, service: None };
    let result = demo.run();
    drop(demo);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("cr-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The demo's state, cleaned up on drop: its directory and, if it still runs, the service.
struct Demo {
    dir: PathBuf,
    service: Option<i32>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(pid) = self.service.take() {
            // Only if the PID is still our service (not a PID reused by someone else).
            if comm(pid).as_deref() == Some("wl_counter") {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                // Our child, or adopted by us as subreaper after a restore; ECHILD is fine.
                let _ = waitpid(Pid::from_raw(pid), None);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Demo {
    fn run(&mut self) -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the demo needs root (cr uses ptrace and eBPF): run it as root or with sudo");
        }
        let cr = cr_tests::cr_bin();
        if !cr.is_file() {
            bail!(
                "no cr binary at {} (build it with `cargo xtask build`, or set CR_BIN)",
                cr.display()
            );
        }
        let counter = sibling_bin("wl_counter")?;
        // The restored service's parent (`cr restore -d`) exits: let it become our child, so
        // that we can reap it at the end.
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        let log = self.dir.join("counter.log");
        let errlog = self.dir.join("service.err");
        let img = self.dir.join("img");
        let pidfile = self.dir.join("restored.pid");

        say!("cr demo: a counter service is dumped to disk (and so killed), then restored at");
        say!("the same PID from the image, and counts on from where it stopped.");
        say!("");
        say!("== 1. start the service: it appends `count N` to its log every {PERIOD_MS} ms");
        std::fs::write(&log, "").with_context(|| format!("create {}", log.display()))?;
        let pid = self.start_service(&counter, &log, &errlog)?;
        self.wait_for_count(&log, 5)?;
        say!("   PID {pid}, log {}", log.display());
        say!("   its files: {}", fds(pid));
        say!(
            "   it has counted to {}",
            counts(&log)?.last().unwrap_or(&0)
        );

        say!("");
        say!("== 2. dump it: cr freezes it, writes its state to the image and kills it");
        let dump_ms = run_cr(&cr, &["dump", "-t", &pid.to_string(), "-D", path(&img)])?;
        // The dump killed it: reap it, so that its PID is free for the restore.
        if !cr_tests::exits_within(pid, 10_000) {
            bail!("PID {pid} still runs after the dump; cr should have killed it");
        }
        let _ = waitpid(Pid::from_raw(pid), None);
        let at_dump = counts(&log)?.last().copied().unwrap_or(0);
        say!("   dump took {dump_ms:.1} ms; PID {pid} is gone; its last line: count {at_dump}");
        say!("   image: {}", image_summary(&img));

        say!("");
        say!("== 3. restore it from the image");
        let restore_ms = run_cr(
            &cr,
            &[
                "restore",
                "-D",
                path(&img),
                "-d",
                "--pidfile",
                path(&pidfile),
            ],
        )?;
        let restored: i32 = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("read the pidfile {}", pidfile.display()))?
            .trim()
            .parse()
            .context("the pidfile holds no PID")?;
        if restored != pid {
            bail!("cr restored PID {restored}, not the dumped PID {pid}");
        }
        say!("   restore took {restore_ms:.1} ms; PID {pid} runs again");
        say!("   its files: {}", fds(pid));

        say!("");
        say!("== 4. it counts on from where it stopped (the log, from the last line before the dump):");
        self.wait_for_count(&log, at_dump + 5)?;
        let all = counts(&log)?;
        let from = all.iter().rposition(|&c| c == at_dump).unwrap_or(0);
        for (i, c) in all[from..].iter().enumerate() {
            let who = if i == 0 {
                "written before the dump"
            } else {
                "written by the restored process"
            };
            say!("   count {c:<4} ({who})");
        }
        // The restored process must continue its own count: at_dump+1, +2, … (a fresh start
        // would write 1, 2, …; a lost or repeated step would break the sequence).
        let expected: Vec<u64> = (at_dump..at_dump + all[from..].len() as u64).collect();
        if all[from..] != expected[..] {
            bail!(
                "the restored service did not count on from {at_dump}: the log after the dump \
                 reads {:?}",
                &all[from..]
            );
        }
        say!("");
        say!(
            "== done: PID {pid} was dumped in {dump_ms:.1} ms and restored in {restore_ms:.1} ms; \
             it counted on from {at_dump} to {}",
            all.last().unwrap_or(&at_dump)
        );
        Ok(())
    }

    /// Starts wl_counter as a daemon: stdin and stdout /dev/null, stderr its own file, no fd
    /// inherited beyond those (wl_counter calls setsid itself, before writing its first line).
    fn start_service(&mut self, bin: &Path, log: &Path, errlog: &Path) -> Result<i32> {
        let err = File::create(errlog).with_context(|| format!("create {}", errlog.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        // SAFETY: close_range is async-signal-safe; it closes fds the caller may have leaked to
        // us (a socket, a pipe to some other program), which cr would otherwise have to dump.
        unsafe {
            cmd.pre_exec(|| {
                libc::close_range(3, u32::MAX, 0);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id() as i32;
        self.service = Some(pid);
        Ok(pid)
    }

    /// Follows the log until it holds `count n` (polling: the service writes every PERIOD_MS).
    fn wait_for_count(&self, log: &Path, n: u64) -> Result<()> {
        let t = Instant::now();
        while t.elapsed() < COUNT_LIMIT {
            if counts(log)?.iter().any(|&c| c >= n) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(PERIOD_MS / 4));
        }
        let err = std::fs::read_to_string(self.dir.join("service.err")).unwrap_or_default();
        bail!(
            "the service did not reach count {n} within {} s (its log ends at {:?}){}",
            COUNT_LIMIT.as_secs(),
            counts(log)?.last(),
            if err.trim().is_empty() {
                String::new()
            } else {
                format!("; its stderr: {}", err.trim())
            }
        )
    }
}

/// A binary built beside this one (target/release/NAME).
fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("find the demo's own path")?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} is missing (build the demo with `cargo xtask demo`)",
            p.display()
        );
    }
    Ok(p)
}

/// Runs `cr ARGS` with the demo's own stdout and stderr (cr's messages show as they come);
/// returns how long it took.
fn run_cr(cr: &Path, args: &[&str]) -> Result<f64> {
    say!("$ cr {}", args.join(" "));
    let t = Instant::now();
    let st = Command::new(cr)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("run {}", cr.display()))?;
    if !st.success() {
        bail!("`cr {}` failed ({st}); cr said why above", args[0]);
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or("?")
}

/// The numbers of the log's `count N` lines, in order.
fn counts(log: &Path) -> Result<Vec<u64>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("count ").and_then(|n| n.parse().ok()))
        .collect())
}

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `0 /dev/null, 1 /dev/null, …`: what the process's fds point to.
fn fds(pid: i32) -> String {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return "(unreadable)".into();
    };
    let mut v: Vec<(u32, String)> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.display().to_string()))
        })
        .collect();
    v.sort();
    v.iter()
        .map(|(n, t)| format!("{n} {t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `N files, X KiB`.
fn image_summary(img: &Path) -> String {
    let Ok(rd) = std::fs::read_dir(img) else {
        return "(unreadable)".into();
    };
    let sizes: Vec<u64> = rd
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .collect();
    format!(
        "{} files, {} KiB in {}",
        sizes.len(),
        sizes.iter().sum::<u64>().div_ceil(1024),
        img.display()
    )
}
