//! Processes: signals, session and group ids, resource limits of another process, a task
//! made at a given PID, and children that start a session of their own.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;

use super::abi::CloneArgs;

/// kill(pid, sig).
pub fn kill(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: plain kill(2); integers only.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// This process's (session id, process group id).
pub fn session_and_group() -> (i32, i32) {
    // SAFETY: getsid/getpgid of ourselves; no pointers.
    unsafe { (libc::getsid(0), libc::getpgid(0)) }
}

/// prlimit64(pid, resource): (soft, hard).
pub fn get_rlimit(pid: i32, resource: u32) -> std::io::Result<(u64, u64)> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 reading into a valid struct.
    if unsafe { libc::prlimit64(pid, resource, std::ptr::null(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// prlimit64(pid, resource, {soft, hard}).
pub fn set_rlimit(pid: i32, resource: u32, soft: u64, hard: u64) -> std::io::Result<()> {
    let new = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit64 with a valid input struct and no output.
    if unsafe { libc::prlimit64(pid, resource, &new, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// clone3 with set_tid = [pid], fork-like: returns the child's pid in the parent; the child
/// never returns from here: it asks for SIGKILL when its parent dies, PTRACE_TRACEMEs and
/// stops itself with SIGSTOP (and exits if it is ever resumed), so the caller can adopt it
/// and rebuild it from the outside.
pub fn spawn_stopped_at(pid: i32) -> std::io::Result<i32> {
    let tids = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: fork-like clone3 (no CLONE_VM, no new stack): the child continues on a private
    // copy of this thread's stack and only runs `child_stop`, which makes raw syscalls and
    // never returns.
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
    if r == 0 {
        child_stop();
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

/// Makes the child `cmd` spawns start a session of its own (setsid) and find `fd` at `at`
/// (dup2, so it survives the exec).
pub fn new_session_with_fd(cmd: &mut std::process::Command, fd: RawFd, at: RawFd) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(fd, at) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the child `cmd` spawns start a session of its own (setsid): no terminal, no group of
/// the spawner's, so a checkpoint of it needs no `--shell-job`; and inherit no fd beyond its
/// stdio (whatever cr's own caller left open is not the command's).
pub fn new_session(cmd: &mut std::process::Command) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // close_range(3, ~0, CLOSE_RANGE_CLOEXEC): std's own exec-error pipe is
            // close-on-exec already and must stay open until the exec.
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 1 << 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
