//! Checking that a PID names something cr can dump, before touching it.

use anyhow::{Context, Result};

use crate::{bad_input, refuse};

use crate::kernel::proc;

/// What the checks learned about the root task.
#[derive(Debug)]
pub struct Target {
    pub pid: i32,
    pub stat: proc::stat::Stat,
}

const PF_KTHREAD: u32 = 0x0020_0000;

/// Refuses, with a reason naming the PID, a root cr cannot dump: a missing process, a kernel
/// thread, a thread id, cr itself or an ancestor of cr, a zombie. The session and terminal of every process of the
/// tree are checked once the tree is known ([`super::dump::check`]).
pub fn check_root(pid: i32) -> Result<Target> {
    if pid <= 0 {
        bad_input!("invalid PID {pid}");
    }
    if pid as u32 == std::process::id() {
        bad_input!("PID {pid} is cr itself");
    }
    let stat = match proc::stat::read_stat(pid) {
        Ok(s) => s,
        Err(e) => {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bad_input!("no process with PID {pid}");
            }
            return Err(e).with_context(|| format!("reading the state of PID {pid}"));
        }
    };
    if stat.flags & PF_KTHREAD != 0 {
        refuse!(
            None,
            "PID {pid} ({}) is a kernel thread: only user processes can be dumped",
            stat.comm
        );
    }
    // /proc/TID/stat names the thread itself; the thread group is in status.
    let tgid = proc::status::read_status(pid)
        .with_context(|| format!("reading the status of PID {pid}"))?
        .tgid;
    if tgid != pid {
        bad_input!(
            "PID {pid} is a thread of thread group {tgid} ({}), not a process: dump the process (-t {tgid})",
            stat.comm
        );
    }
    // Freezing an ancestor would freeze the cr waiting on it (or the shell that runs it).
    let mut a = std::os::unix::process::parent_id() as i32;
    while a > 0 {
        if a == pid {
            bad_input!(
                "PID {pid} ({}) is an ancestor of cr (PID {}): it cannot be dumped from inside its own tree",
                stat.comm,
                std::process::id()
            );
        }
        if a == 1 {
            break;
        }
        a = proc::status::read_status(a).map(|s| s.ppid).unwrap_or(0);
    }
    match stat.state {
        'Z' | 'X' => refuse!(
            None,
            "PID {pid} ({}) is a zombie: nothing left to dump",
            stat.comm
        ),
        _ => {}
    }
    Ok(Target { pid, stat })
}
