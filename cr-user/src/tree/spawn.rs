//! Creating a task at a given PID, stopped and traced, ready to be rebuilt from the outside.
//!
//! `cr` forks itself with clone3(set_tid = [pid]); the child only runs raw syscalls (it is a copy
//! of a multi-threaded process): PTRACE_TRACEME, then SIGSTOP to itself. Everything after that
//! is done by `cr` through remote syscalls, starting with unmapping everything the child
//! inherited from `cr`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::kernel::ptrace::Tracee;
use crate::kernel::sys::process;

/// Describes who holds `pid` now, for the "PID taken" error.
fn owner_of(pid: i32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    format!("{} (state {state})", comm.trim())
}

/// Creates a stopped, traced task at `pid`. If the PID is taken, waits up to `wait` for its owner
/// to go away (a process killed by a dump may linger until its parent reaps it).
pub fn spawn_at(pid: i32, wait: Duration) -> Result<Tracee> {
    let deadline = Instant::now() + wait;
    let mut waited = false;
    loop {
        match process::spawn_stopped_at(pid) {
            Ok(child) => {
                if child != pid {
                    bail!("clone3 created task {child}, not {pid}");
                }
                if waited {
                    log::info!("PID {pid} became free");
                }
                return Tracee::adopt_stopped_child(pid)
                    .with_context(|| format!("taking the new task {pid}"));
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if Instant::now() >= deadline {
                    bail!(
                        "PID {pid} is taken by another process ({}); cr restores a task at its original PID, \
                         so that process must exit first",
                        owner_of(pid)
                    );
                }
                if !waited {
                    log::info!(
                        "PID {pid} is still taken by {}; waiting up to {:?} for it to go",
                        owner_of(pid),
                        wait
                    );
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("clone3 with set_tid={pid}")),
        }
    }
}
