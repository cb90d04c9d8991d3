//! Checking that a PID names something cr can dump, before touching it.

use anyhow::{bail, Context, Result};

use crate::kernel::proc;

/// What the checks learned about the root task.
#[derive(Debug)]
pub struct Target {
    pub pid: i32,
    pub stat: proc::stat::Stat,
}

const PF_KTHREAD: u32 = 0x0020_0000;

/// Refuses, with a reason naming the PID, a root cr cannot dump: a missing process, a kernel
/// thread, a thread id, cr itself, a zombie. The session and terminal of every process of the
/// tree are checked once the tree is known ([`super::dump::check`]).
pub fn check_root(pid: i32) -> Result<Target> {
    if pid <= 0 {
        bail!("invalid PID {pid}");
    }
    if pid as u32 == std::process::id() {
        bail!("PID {pid} is cr itself");
    }
    let stat = match proc::stat::read_stat(pid) {
        Ok(s) => s,
        Err(e) => {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("no process with PID {pid}");
            }
            return Err(e).with_context(|| format!("reading the state of PID {pid}"));
        }
    };
    if stat.flags & PF_KTHREAD != 0 {
        bail!(
            "PID {pid} ({}) is a kernel thread: only user processes can be dumped",
            stat.comm
        );
    }
    if stat.pid != pid {
        bail!(
            "PID {pid} is a thread of process {}: dump the process (-t {})",
            stat.pid,
            stat.pid
        );
    }
    match stat.state {
        'Z' | 'X' => bail!(
            "PID {pid} ({}) is a zombie: nothing left to dump",
            stat.comm
        ),
        _ => {}
    }
    Ok(Target { pid, stat })
}

/// [`check_root`], and for `cr pre-dump` (which freezes only the root's main thread) also
/// refuses more than one thread or children, and a session or terminal outside the process
/// unless `shell_job`.
pub fn check(pid: i32, shell_job: bool) -> Result<Target> {
    let Target { pid, stat } = check_root(pid)?;
    let threads =
        proc::task::threads(pid).with_context(|| format!("listing the threads of PID {pid}"))?;
    if threads.len() > 1 {
        bail!(
            "PID {pid} ({}) has {} threads: cr pre-dump handles single-threaded processes only",
            stat.comm,
            threads.len()
        );
    }
    let children = proc::task::children(pid).unwrap_or_default();
    if !children.is_empty() {
        bail!("PID {pid} ({}) has child processes {children:?}: cr pre-dump handles single processes only", stat.comm);
    }
    if !shell_job {
        if stat.tty_nr != 0 {
            bail!(
                "PID {pid} ({}) has a controlling terminal (tty {}:{}); dump it with --shell-job (-j)",
                stat.comm,
                (stat.tty_nr >> 8) & 0xfff,
                (stat.tty_nr & 0xff) | ((stat.tty_nr >> 12) & 0xfff00)
            );
        }
        if stat.session != pid {
            bail!(
                "the session leader of PID {pid} ({}) is PID {}, outside the dumped tree; \
                 dump it with --shell-job (-j), or dump the session leader",
                stat.comm,
                stat.session
            );
        }
    }
    Ok(Target { pid, stat })
}
