//! Recreating the threads of a process, each with its original TID and its own state.
//!
//! Once the process's memory and files are rebuilt, cr makes its main thread run
//! clone3(CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM,
//! set_tid = [tid]). The main thread is traced with PTRACE_O_TRACECLONE, so the new thread is
//! attached to cr from its first instant and stops before running user code; it starts with
//! the main thread's blocked mask (every signal). It is created before the credentials are
//! restored (clone3 with set_tid needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE).
//!
//! Then, through remote syscalls in the thread itself, what is per thread: alternate signal
//! stack, clear_child_tid, name, rseq, timer slack, personality, its own pending signals,
//! credentials, the parent-death signal and no_new_privs. Its registers (with the TLS base)
//! and XSAVE area come last, with the main thread's ([`super::restore::restore_cpu`]).

use anyhow::{bail, Context, Result};

use crate::image::pb;
use crate::kernel::ptrace::{Remote, Tracee};

use super::restore as task;
use crate::kernel::ptrace::inject::clone3 as remote_clone3;

const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

/// Makes one thread per core in `cores` (in the process of `r`'s task) at its TID.
pub fn create(r: &mut Remote, scratch: u64, pid: i32, cores: &[pb::Core]) -> Result<Vec<Tracee>> {
    let mut out = Vec::with_capacity(cores.len());
    for c in cores {
        let tid = c.tid;
        let res = remote_clone3(r, scratch, THREAD_FLAGS, 0, tid)?;
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res as i32);
            if res == -(libc::EEXIST as i64) {
                bail!("TID {tid} of PID {pid} is taken by another task; cr restores threads at their original TIDs");
            }
            return Err(e).with_context(|| {
                format!("remote clone3(CLONE_THREAD, set_tid={tid}) in PID {pid}")
            });
        }
        let made = r.t.new_tasks.pop();
        if res != tid as i64 || made != Some(tid) {
            bail!("clone3 in PID {pid} made thread {res} (event for {made:?}), not {tid}");
        }
        out.push(
            Tracee::adopt_new_task(pid, tid)
                .with_context(|| format!("taking the new thread {tid} of PID {pid}"))?,
        );
        log::debug!("thread {tid} of PID {pid} created");
    }
    Ok(out)
}

/// Restores the per-thread state of thread `r.t` from its core and the process's task state
/// (see the module docs), through remote syscalls in the thread: the per-thread steps of
/// [`task::restore_task`], in the same order. `scratch` is memory of the process (shared with
/// the main thread).
pub fn restore_thread(
    r: &mut Remote,
    scratch: u64,
    pid: i32,
    core: &pb::Core,
    st: &pb::TaskState,
) -> Result<()> {
    let tid = r.t.tid;
    task::restore_thread_state(r, scratch, core, st)?;
    task::queue_pending(r, scratch, pid, tid, core)?;
    task::restore_creds_and_resets(r, scratch, tid, st)
}
