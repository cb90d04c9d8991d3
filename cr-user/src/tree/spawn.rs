//! Creating a task at a given PID, stopped and traced, ready to be rebuilt from the outside.
//!
//! `cr` forks itself with clone3(set_tid = [pid]); the child only runs raw syscalls (it is a copy
//! of a multi-threaded process): PTRACE_TRACEME, then SIGSTOP to itself. Everything after that
//! is done by `cr` through remote syscalls, starting with unmapping everything the child
//! inherited from `cr`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::kernel::ptrace::Tracee;
use crate::kernel::sys::abi::CloneArgs;

/// `struct clone_args` as bytes, for a clone3 that cr makes another task run (the task reads
/// it from its own memory): `flags`, `exit_signal`, and the address of a one-element set_tid
/// array in the task.
pub fn clone_args_bytes(flags: u64, exit_signal: u64, set_tid_addr: u64) -> Vec<u8> {
    let args = CloneArgs {
        flags,
        exit_signal,
        set_tid: set_tid_addr,
        set_tid_size: 1,
        ..Default::default()
    };
    [
        args.flags,
        args.pidfd,
        args.child_tid,
        args.parent_tid,
        args.exit_signal,
        args.stack,
        args.stack_size,
        args.tls,
        args.set_tid,
        args.set_tid_size,
        args.cgroup,
    ]
    .iter()
    .flat_map(|w| w.to_ne_bytes())
    .collect()
}

/// clone3 with set_tid: returns the child's pid in the parent, 0 in the child.
fn clone3_at(pid: i32) -> std::io::Result<i32> {
    let tids = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: fork-like clone3 (no CLONE_VM, no new stack): the child continues on a private copy
    // of this thread's stack and only runs `child_stop`, which makes raw syscalls and never
    // returns.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// Runs in the child: async-signal-safe raw syscalls only.
fn child_stop() -> ! {
    // SAFETY: raw syscalls with integer arguments; no allocation, no locks.
    unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL,
            0,
            0,
            0,
        );
        if libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
            libc::syscall(libc::SYS_exit_group, 126);
        }
        let me = libc::syscall(libc::SYS_getpid);
        libc::syscall(libc::SYS_kill, me, libc::SIGSTOP);
        // Only reached if cr resumed us without rebuilding us: never run cr's code further.
        libc::syscall(libc::SYS_exit_group, 127);
    }
    unreachable!()
}

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
        match clone3_at(pid) {
            Ok(0) => child_stop(),
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
