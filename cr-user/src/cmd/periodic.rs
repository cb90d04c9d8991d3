//! `cr periodic`: a checkpoint of a running tree every interval, into `DIR/<sequence>/`, each
//! through the same path as `cr dump -R --track-mem --prev-images-dir ../<previous>` (so the
//! first is full and the rest hold what the tracker says changed), `DIR/latest` replaced
//! atomically once a checkpoint is complete.
//!
//! A checkpoint that fails (a full disk, a transient refusal) leaves the target running as
//! the dump path guarantees; its directory is removed, the error logged, and the next interval
//! tries again (`--max-failures` in a row end it). SIGINT/SIGTERM abandon the checkpoint in
//! progress (the dump unwinds), stop the tracker and exit 0 with `latest` naming the last
//! complete one. When the target exits, so does periodic, saying how (with `-- CMD`, cr is its
//! parent and exits with its status).

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cli::{DumpOpts, PeriodicOpts};
use crate::image::dir::ImageDir;
use crate::image::{chain, fold};
use crate::kernel::interrupt;
use crate::kernel::sys::{pidfd_open, process};
use crate::refusal::{BadInput, Refusal};
use crate::tracker::client::TrackerConn;

/// The symlink naming the newest complete checkpoint.
pub const LATEST: &str = "latest";

/// How the target is held: started by us (`-- CMD`, our child) or named by `-t`.
struct Target {
    pid: i32,
    pidfd: OwnedFd,
    child: bool,
}

/// Why the loop ended.
enum End {
    /// SIGINT/SIGTERM/SIGHUP, or `--count` reached.
    Stopped,
    /// The target exited; the exit code periodic passes on (0 when not ours to know).
    TargetExited(i32),
}

pub fn run(o: &PeriodicOpts) -> Result<i32> {
    interrupt::install();
    let dir = &o.images_dir;
    crate::image::dir::create_images_dir(dir)?;
    fold::recover(dir)?;
    let target = match (o.pid, o.command.is_empty()) {
        (Some(pid), true) => {
            crate::tree::target::check_root(pid)?;
            Target {
                pid,
                pidfd: pidfd_open(pid)?,
                child: false,
            }
        }
        (None, false) => launch(&o.command, dir, &o.output)?,
        (Some(_), false) => crate::bad_input!("cr periodic: give -t PID or a command, not both"),
        (None, true) => {
            crate::bad_input!("cr periodic: name the target: -t PID, or a command after --")
        }
    };
    let pid = target.pid;
    log::info!(
        "checkpointing PID {pid} every {} into {}{}",
        show_duration(o.interval),
        dir.display(),
        o.keep.map(|k| format!(", keeping {k}")).unwrap_or_default()
    );
    let end = checkpoints(o, &target);
    // The tracker exits with the target by itself; otherwise it is ours to stop.
    if !matches!(end, Ok(End::TargetExited(_))) {
        stop_tracker(pid);
    }
    match end? {
        End::Stopped => {
            let latest = std::fs::read_link(dir.join(LATEST)).ok();
            log::info!(
                "stopped; PID {pid} runs on; {}",
                match latest {
                    Some(l) => format!("latest is {}", dir.join(l).display()),
                    None => "no checkpoint was completed".into(),
                }
            );
            Ok(0)
        }
        End::TargetExited(code) => Ok(code),
    }
}

/// The checkpoint loop.
fn checkpoints(o: &PeriodicOpts, t: &Target) -> Result<End> {
    let dir = &o.images_dir;
    let mut seq = fold::sequence(dir)?.last().copied().unwrap_or(0);
    // The checkpoint the next one builds on: the newest complete one of this run (an older
    // one in DIR is of another tracking session: the first checkpoint is full anyway).
    let mut parent: Option<String> = None;
    let mut failures = 0u32;
    let mut done = 0u64;
    let mut last_at: Option<Instant> = None;
    let mut next = Instant::now();
    loop {
        if let Some(end) = wait_until(t, next)? {
            return Ok(end);
        }
        let started = Instant::now();
        next = started + o.interval;
        seq += 1;
        let name = fold::seq_name(seq);
        let path = dir.join(&name);
        let opts = DumpOpts {
            pid: t.pid,
            images_dir: path.clone(),
            leave_running: true,
            tcp_established: o.tcp_established,
            shell_job: o.shell_job,
            file_locks: o.file_locks,
            prev_images_dir: parent.as_ref().map(|p| PathBuf::from(format!("../{p}"))),
            track_mem: true,
            page_server: false,
            address: None,
            port: None,
            whole_image: false,
            display_stats: false,
        };
        let r = quietly(|| super::dump::run(&opts));
        match r {
            Ok(()) => {
                failures = 0;
                done += 1;
                publish(dir, &name)?;
                report(&path, &name, last_at.map(|a| started - a));
                last_at = Some(started);
                if let Some(keep) = o.keep {
                    match fold::prune(dir, keep as usize) {
                        Ok(rewritten) if rewritten.contains(&name) => recommit(t.pid, &path),
                        Ok(_) => {}
                        Err(e) => log::error!("pruning {}: {e:#}", dir.display()),
                    }
                }
                parent = Some(name);
                if o.count.is_some_and(|c| done >= c) {
                    return Ok(End::Stopped);
                }
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                if let Some(code) = exited(t)? {
                    return Ok(End::TargetExited(code));
                }
                if interrupt::received().is_some() {
                    log::warn!("checkpoint {name} abandoned: {e:#}");
                    return Ok(End::Stopped);
                }
                // What cr will never dump stops it at once; later a refusal may be passing
                // (a socket open for a moment), so it counts as a failure.
                if done == 0 && (Refusal::of(&e).is_some() || BadInput::of(&e).is_some()) {
                    return Err(e);
                }
                failures += 1;
                log::error!(
                    "checkpoint {name} failed ({failures} in a row), PID {} runs on: {e:#}",
                    t.pid
                );
                if o.max_failures != 0 && failures >= o.max_failures {
                    anyhow::bail!(
                        "{failures} checkpoints in a row failed (--max-failures {}); PID {} runs on",
                        o.max_failures,
                        t.pid
                    );
                }
                // The next one is a full checkpoint if this one consumed the tracker's state.
                seq -= 1;
            }
        }
    }
}

/// Runs `f` with the dump's own info lines held back (periodic prints one line per
/// checkpoint), unless debug output was asked for.
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let level = log::max_level();
    if level == log::LevelFilter::Info {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let r = f();
    log::set_max_level(level);
    r
}

/// One line per checkpoint: frozen time, dirty and written MiB, the eBPF dirty rate.
fn report(path: &Path, name: &str, since_last: Option<Duration>) {
    let Ok(img) = ImageDir::open(path) else {
        return;
    };
    let s = img.inventory().stats.clone().unwrap_or_default();
    let mib = |pages: u64| pages as f64 * 4096.0 / (1 << 20) as f64;
    let bytes: u64 = img.files().map(|f| f.size).sum();
    let rate = since_last
        .filter(|d| !d.is_zero())
        .map(|d| {
            format!(
                ", eBPF dirty rate {:.1} MiB/s",
                mib(s.ebpf_dirty_pages) / d.as_secs_f64()
            )
        })
        .unwrap_or_default();
    log::info!(
        "checkpoint {name}: frozen {:.1} ms, dirty {:.1} MiB, written {:.1} MiB{rate}, harvest {}{}",
        s.frozen_us as f64 / 1e3,
        mib(s.pages_written),
        bytes as f64 / (1 << 20) as f64,
        s.harvest,
        if img.inventory().parent_path.is_empty() {
            " (full)"
        } else {
            ""
        }
    );
    // Read back through the chain, as restore would: a checkpoint that cannot be opened is
    // not left as `latest` silently.
    if let Err(e) = chain::ImageChain::open(path) {
        log::error!("checkpoint {name} does not open as a chain: {e:#}");
    }
}

/// Points `DIR/latest` at `name`: a symlink made under a temporary name and renamed over the
/// old one, so a reader sees the old or the new checkpoint, never none.
fn publish(dir: &Path, name: &str) -> Result<()> {
    let tmp = dir.join(format!(".{LATEST}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)
        .with_context(|| format!("create the symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(LATEST))
        .with_context(|| format!("rename {} to {LATEST}", tmp.display()))?;
    crate::image::writer::fsync_dir(dir)
}

/// Waits until `at`, or less: returns why the loop must end, if it must.
fn wait_until(t: &Target, at: Instant) -> Result<Option<End>> {
    loop {
        if let Some(code) = exited(t)? {
            return Ok(Some(End::TargetExited(code)));
        }
        if let Some(sig) = interrupt::received() {
            log::info!("signal {sig}: stopping");
            return Ok(Some(End::Stopped));
        }
        let now = Instant::now();
        if now >= at {
            return Ok(None);
        }
        // The pidfd polls readable when the target exits; a signal interrupts the poll. The
        // slice bounds the wait should a signal land between the check and the poll.
        let slice = (at - now).min(Duration::from_millis(200));
        let mut fds = [nix::poll::PollFd::new(
            t.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = slice.as_millis().max(1) as u16;
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("poll the target's pidfd"),
        }
    }
}

/// Whether the target exited; then it says so and returns the status to exit with.
fn exited(t: &Target) -> Result<Option<i32>> {
    let mut fds = [nix::poll::PollFd::new(
        t.pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(e).context("poll the target's pidfd"),
    }
    let pid = t.pid;
    if !t.child {
        log::warn!("PID {pid} exited (not cr's child: its status is its parent's to read)");
        return Ok(Some(0));
    }
    use nix::sys::wait::{waitpid, WaitStatus};
    let code = match waitpid(nix::unistd::Pid::from_raw(pid), None) {
        Ok(WaitStatus::Exited(_, c)) => {
            log::warn!("PID {pid} exited with status {c}");
            c
        }
        Ok(WaitStatus::Signaled(_, s, _)) => {
            log::warn!("PID {pid} was killed by signal {}", s as i32);
            128 + s as i32
        }
        Ok(other) => {
            log::warn!("PID {pid} ended ({other:?})");
            1
        }
        Err(e) => {
            // A dump in progress when it exited may have collected the status (ptrace).
            log::warn!("PID {pid} exited (its status was lost: {e})");
            1
        }
    };
    Ok(Some(code))
}

/// Starts `cmd` in a session of its own, stdin from /dev/null, stdout and stderr appended to
/// `output` (relative to `dir`; "-": cr's own).
fn launch(cmd: &[OsString], dir: &Path, output: &Path) -> Result<Target> {
    use std::process::{Command, Stdio};
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]).stdin(Stdio::null());
    if output != Path::new("-") {
        let path = if output.is_relative() {
            dir.join(output)
        } else {
            output.to_path_buf()
        };
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("open the command's output file {}", path.display()))?;
        let f2 = f
            .try_clone()
            .with_context(|| format!("duplicate {}", path.display()))?;
        c.stdout(f).stderr(f2);
    }
    process::new_session(&mut c);
    let child = c.spawn().map_err(|e| {
        BadInput::wrap(anyhow::anyhow!(
            "cannot start {}: {e}",
            cmd[0].to_string_lossy()
        ))
    })?;
    let pid = child.id() as i32;
    // Reaped through waitpid in `exited`; the handle would only duplicate that.
    drop(child);
    log::info!("started {} as PID {pid}", cmd[0].to_string_lossy());
    Ok(Target {
        pid,
        pidfd: pidfd_open(pid)?,
        child: true,
    })
}

/// The newest checkpoint was folded (`--keep 1`): its inventory changed, and the tracker
/// builds the next one on it only if it knows the new inventory's CRC.
fn recommit(pid: i32, path: &Path) {
    let r = TrackerConn::connect(pid).and_then(|c| {
        let c = c.context("no tracker runs")?;
        let canon =
            std::fs::canonicalize(path).with_context(|| format!("resolve {}", path.display()))?;
        let img = ImageDir::open(path)?;
        c.commit(&canon.to_string_lossy(), img.inventory_crc())
    });
    if let Err(e) = r {
        log::warn!("the tracker did not take the folded {} as its base ({e:#}): the next checkpoint will be full", path.display());
    }
}

/// Stops the target's tracker (nothing stays pinned or running after periodic).
fn stop_tracker(pid: i32) {
    match TrackerConn::connect(pid) {
        Ok(Some(c)) => {
            if let Err(e) = c.stop() {
                log::debug!("stopping the tracker of PID {pid}: {e:#}");
            }
        }
        Ok(None) => {}
        Err(e) => log::debug!("the tracker of PID {pid}: {e:#}"),
    }
}

fn show_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{} s", d.as_secs())
    }
}
