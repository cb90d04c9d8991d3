//! Short-lived child processes for the probes, with deadlines, that can never outlive them.
//!
//! A [`Child`] is killed (SIGKILL) and reaped when dropped, whatever the probe did; waits take
//! a deadline so a misbehaving kernel feature makes the probe fail instead of hanging `cr check`.
//! The child also asks for SIGKILL when the forking thread dies (PR_SET_PDEATHSIG), in case cr
//! itself is killed mid-probe.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// Deadline for every wait in a probe.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A child process owned by a probe.
pub struct Child {
    pid: Pid,
    reaped: bool,
}

impl Child {
    /// Forks. The child runs `body` and exits with its return value.
    ///
    /// `body` runs in the child of a possibly multi-threaded process: it may only make
    /// async-signal-safe calls (raw syscalls, plain memory access), never allocate or lock.
    pub fn fork(body: impl FnOnce() -> i32) -> Result<Child> {
        // SAFETY: the child only runs `body`, which by contract is async-signal-safe, then
        // _exit()s without running destructors or atexit handlers.
        match unsafe { fork() }.context("fork a probe child")? {
            ForkResult::Child => {
                // SAFETY: prctl and _exit are async-signal-safe syscalls.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                    libc::_exit(body());
                }
            }
            ForkResult::Parent { child } => Ok(Child {
                pid: child,
                reaped: false,
            }),
        }
    }

    /// Takes ownership of a child created otherwise (e.g. clone3).
    pub fn adopt(pid: Pid) -> Child {
        Child { pid, reaped: false }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits for the next state change (stop or exit; traced or not) until the deadline.
    pub fn wait(&mut self, timeout: Duration) -> Result<WaitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = waitpid(self.pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL))
                .with_context(|| format!("waitpid({})", self.pid))?;
            match st {
                WaitStatus::StillAlive => {}
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    self.reaped = true;
                    return Ok(st);
                }
                other => return Ok(other),
            }
            if Instant::now() >= deadline {
                bail!(
                    "child {} did not change state within {:?}",
                    self.pid,
                    timeout
                );
            }
            // Bounded polling: waitpid has no timeout and a pidfd does not report stops.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the child to exit and returns its exit code (an error if it was killed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        match self.wait(timeout)? {
            WaitStatus::Exited(_, code) => Ok(code),
            other => bail!("child {} ended with {other:?}, not an exit", self.pid),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = kill(self.pid, Signal::SIGKILL);
        // SIGKILL ends any task that is not stuck in the kernel; do not hang if one is.
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive)
                | Ok(WaitStatus::Stopped(..))
                | Ok(WaitStatus::PtraceEvent(..)) => std::thread::sleep(Duration::from_millis(1)),
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_) => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        log::warn!(
            "probe child {} did not die within {:?} of SIGKILL",
            self.pid,
            TIMEOUT
        );
    }
}

/// Reads one byte from `fd`, waiting at most `timeout` (a child saying "ready").
pub fn read_byte(fd: &OwnedFd, timeout: Duration) -> Result<u8> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let n = poll(&mut fds, PollTimeout::from(ms)).context("poll the probe child's pipe")?;
    if n == 0 {
        bail!("the probe child said nothing within {timeout:?}");
    }
    let mut b = [0u8; 1];
    let r = nix::unistd::read(fd, &mut b).context("read the probe child's pipe")?;
    if r != 1 {
        bail!("the probe child closed its pipe without a word");
    }
    Ok(b[0])
}

/// Writes one byte to a raw fd, async-signal-safe (for use in a child body).
pub fn write_byte_raw(fd: i32, b: u8) {
    // SAFETY: write(2) of one byte from a live stack variable.
    unsafe {
        libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
    }
}

/// The raw fd number, for a child body that must not touch Rust's fd ownership.
pub fn raw(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}
