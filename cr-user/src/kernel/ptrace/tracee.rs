//! A thread under ptrace: seize/interrupt/detach, register sets, signal state.
//!
//! ptrace binds a tracee to the OS thread that attached it: every call on a `Tracee` must come
//! from the thread that created it (dump and restore run their ptrace work on one thread).
//!
//! A `Tracee` that is dropped while still attached detaches (and re-sends any signal it had to
//! hold back), so an error path can never leave a target stopped.

use anyhow::{bail, Context, Result};

use super::raw::{self, Wait};

/// How the tracee was stopped when we took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeizedState {
    /// Running (or sleeping in a syscall); stopped by PTRACE_INTERRUPT.
    Running,
    /// Already in a job-control stop (SIGSTOP/SIGTSTP/…): it must stay stopped afterwards.
    JobStopped(i32),
}

#[derive(Debug)]
pub struct Tracee {
    pub tgid: i32,
    pub tid: i32,
    pub state: SeizedState,
    /// Signals dequeued while we held the task (they arrived during a remote syscall): they are
    /// sent again on detach, and a dump records them as pending.
    pub stashed: Vec<i32>,
    /// Tasks this one created during remote syscalls (fork/clone events, with
    /// PTRACE_O_TRACEFORK/TRACECLONE set): auto-attached, to be taken with
    /// [`Tracee::adopt_new_task`].
    pub new_tasks: Vec<i32>,
    attached: bool,
    /// Kill rather than detach on drop (restore: a half-built task must never run).
    kill_on_drop: bool,
}

impl Tracee {
    /// PTRACE_SEIZE + PTRACE_INTERRUPT, then waits for the interrupt stop. Signals that arrive
    /// meanwhile are delivered normally (the task handles them as if cr were not there) before
    /// the stop is taken.
    pub fn seize(tgid: i32, tid: i32) -> Result<Tracee> {
        raw::seize(tid, 0).with_context(|| format!("PTRACE_SEIZE of task {tid}"))?;
        let mut t = Tracee {
            tgid,
            tid,
            state: SeizedState::Running,
            stashed: Vec::new(),
            new_tasks: Vec::new(),
            attached: true,
            kill_on_drop: false,
        };
        raw::interrupt(tid).with_context(|| format!("PTRACE_INTERRUPT of task {tid}"))?;
        loop {
            match raw::wait(tid)? {
                Wait::Stopped(sig, raw::PTRACE_EVENT_STOP) => {
                    if matches!(
                        sig,
                        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                    ) {
                        t.state = SeizedState::JobStopped(sig);
                    }
                    return Ok(t);
                }
                Wait::Stopped(sig, 0) => {
                    raw::cont(tid, sig)
                        .with_context(|| format!("deliver signal {sig} to task {tid}"))?;
                }
                Wait::Stopped(_, _) => {
                    raw::cont(tid, 0)
                        .with_context(|| format!("resume task {tid} after a ptrace event"))?;
                }
                Wait::Exited(c) => {
                    t.attached = false;
                    bail!("task {tid} exited (status {c}) while being seized");
                }
                Wait::Signaled(s) => {
                    t.attached = false;
                    bail!("task {tid} was killed by signal {s} while being seized");
                }
            }
        }
    }

    /// Adopts a child that called PTRACE_TRACEME and stopped itself with SIGSTOP (restore).
    /// From now on the child is killed if `cr` dies (PTRACE_O_EXITKILL) or if this value is
    /// dropped before [`Tracee::detach`].
    ///
    /// Fork and clone events are traced (PTRACE_O_TRACEFORK/TRACECLONE): a process or thread
    /// this task creates through a remote clone3 is attached to cr from its first instant and
    /// stops before running any code ([`Tracee::adopt_new_task`]).
    pub fn adopt_stopped_child(pid: i32) -> Result<Tracee> {
        Tracee::adopt_new_task(pid, pid)
    }

    /// Takes a task that is traced by cr and stops with SIGSTOP before running user code: a
    /// child that called PTRACE_TRACEME and stopped itself, or a task created by a traced task
    /// (auto-attached on a fork/clone event, with SIGSTOP queued by the kernel). It is killed
    /// if dropped before [`Tracee::detach`], or if cr dies.
    pub fn adopt_new_task(tgid: i32, tid: i32) -> Result<Tracee> {
        let mut t = Tracee {
            tgid,
            tid,
            state: SeizedState::Running,
            stashed: Vec::new(),
            new_tasks: Vec::new(),
            attached: true,
            kill_on_drop: true,
        };
        match raw::wait(tid)? {
            Wait::Stopped(libc::SIGSTOP, 0) | Wait::Stopped(_, raw::PTRACE_EVENT_STOP) => {}
            other => {
                t.attached = false;
                bail!("restored task {tid} did not stop as expected: {other:?}");
            }
        }
        let opts = libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_TRACECLONE;
        raw::setoptions(tid, opts as u32).with_context(|| {
            format!("PTRACE_SETOPTIONS(EXITKILL|TRACEFORK|TRACECLONE) on {tid}")
        })?;
        Ok(t)
    }

    pub fn regs(&self) -> Result<libc::user_regs_struct> {
        raw::getregs(self.tid).with_context(|| format!("PTRACE_GETREGS of task {}", self.tid))
    }

    pub fn set_regs(&self, regs: &libc::user_regs_struct) -> Result<()> {
        raw::setregs(self.tid, regs).with_context(|| format!("PTRACE_SETREGS of task {}", self.tid))
    }

    /// The XSAVE area (NT_X86_XSTATE) exactly as the kernel gives it.
    pub fn xstate(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = raw::getregset(self.tid, raw::NT_X86_XSTATE, &mut buf)
            .with_context(|| format!("PTRACE_GETREGSET(NT_X86_XSTATE) of task {}", self.tid))?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn set_xstate(&self, xsave: &[u8]) -> Result<()> {
        raw::setregset(self.tid, raw::NT_X86_XSTATE, xsave).with_context(|| {
            format!(
                "PTRACE_SETREGSET(NT_X86_XSTATE, {} bytes) of task {}",
                xsave.len(),
                self.tid
            )
        })
    }

    pub fn sigmask(&self) -> Result<u64> {
        raw::getsigmask(self.tid).with_context(|| format!("PTRACE_GETSIGMASK of task {}", self.tid))
    }

    pub fn set_sigmask(&self, mask: u64) -> Result<()> {
        raw::setsigmask(self.tid, mask)
            .with_context(|| format!("PTRACE_SETSIGMASK of task {}", self.tid))
    }

    /// Queued signals without dequeuing them: the thread's own queue, or the process-wide one.
    pub fn pending(&self, shared: bool) -> Result<Vec<[u8; 128]>> {
        let mut out = Vec::new();
        let mut buf = [[0u8; 128]; 32];
        loop {
            let n = raw::peeksiginfo(self.tid, out.len() as u64, shared, &mut buf)
                .with_context(|| format!("PTRACE_PEEKSIGINFO of task {}", self.tid))?;
            out.extend_from_slice(&buf[..n]);
            if n < buf.len() {
                return Ok(out);
            }
        }
    }

    pub fn rseq(&self) -> Result<raw::RseqConfig> {
        raw::get_rseq_configuration(self.tid)
            .with_context(|| format!("PTRACE_GET_RSEQ_CONFIGURATION of task {}", self.tid))
    }

    /// Resumes the task for one instruction (`sig` 0: deliver nothing) and waits for the trap.
    /// Returns Some(signal) if instead a signal arrived and is waiting to be delivered (it was not
    /// delivered; the instruction may not have run).
    ///
    /// A fork/clone event on the way (the instruction was a clone3 cr injected) is noted in
    /// [`Tracee::new_tasks`] and the step continues: the syscall finishes and the step trap
    /// follows.
    pub fn step(&mut self) -> Result<Option<i32>> {
        raw::singlestep(self.tid, 0)
            .with_context(|| format!("PTRACE_SINGLESTEP of task {}", self.tid))?;
        loop {
            match raw::wait(self.tid)? {
                Wait::Stopped(
                    libc::SIGTRAP,
                    ev @ (raw::PTRACE_EVENT_FORK
                    | raw::PTRACE_EVENT_VFORK
                    | raw::PTRACE_EVENT_CLONE),
                ) => {
                    let child = raw::geteventmsg(self.tid)
                        .with_context(|| format!("PTRACE_GETEVENTMSG of task {}", self.tid))?;
                    log::debug!("task {} created task {child} (ptrace event {ev})", self.tid);
                    self.new_tasks.push(child as i32);
                    raw::singlestep(self.tid, 0).with_context(|| {
                        format!("PTRACE_SINGLESTEP of task {} after event {ev}", self.tid)
                    })?;
                }
                other => return self.step_result(other),
            }
        }
    }

    /// Leaves the signal-delivery stop of a remote call's single step for an interrupt stop
    /// (PTRACE_INTERRUPT, then PTRACE_CONT without the SIGTRAP; the kernel clears the trap flag
    /// and stops the task in `get_signal` before it runs an instruction). In that stop nothing
    /// is pending: if cr dies now, the kernel resumes the task as its registers and mask are,
    /// where the step's stop would have had it die of SIGTRAP.
    pub fn park(&mut self) -> Result<()> {
        raw::interrupt(self.tid)
            .with_context(|| format!("PTRACE_INTERRUPT of task {}", self.tid))?;
        raw::cont(self.tid, 0).with_context(|| format!("PTRACE_CONT of task {}", self.tid))?;
        loop {
            match raw::wait(self.tid)? {
                Wait::Stopped(_, raw::PTRACE_EVENT_STOP) => return Ok(()),
                Wait::Stopped(sig, 0) => {
                    // Not expected (the interrupt is taken before any signal is dequeued):
                    // held back like a signal that stops a remote call.
                    self.stashed.push(sig);
                    raw::cont(self.tid, 0)
                        .with_context(|| format!("PTRACE_CONT of task {}", self.tid))?;
                }
                Wait::Stopped(_, _) => raw::cont(self.tid, 0)
                    .with_context(|| format!("PTRACE_CONT of task {}", self.tid))?,
                other => return self.step_result(other).map(drop),
            }
        }
    }

    fn step_result(&mut self, w: Wait) -> Result<Option<i32>> {
        match w {
            Wait::Stopped(libc::SIGTRAP, 0) => Ok(None),
            Wait::Stopped(sig, 0) => Ok(Some(sig)),
            Wait::Stopped(sig, ev) => bail!(
                "task {}: unexpected ptrace event {ev} (signal {sig}) during a remote call",
                self.tid
            ),
            Wait::Exited(c) => {
                self.attached = false;
                bail!("task {} exited (status {c}) during a remote call", self.tid)
            }
            Wait::Signaled(s) => {
                self.attached = false;
                bail!(
                    "task {} was killed by signal {s} during a remote call",
                    self.tid
                )
            }
        }
    }

    /// Lets the task run on: re-sends held-back signals, detaches. A job-stopped task stays
    /// stopped (the kernel keeps the group stop).
    pub fn detach(mut self) -> Result<()> {
        self.do_detach()
    }

    fn do_detach(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        for sig in std::mem::take(&mut self.stashed) {
            let _ = raw::tgkill(self.tgid, self.tid, sig);
        }
        raw::detach(self.tid, 0).with_context(|| format!("PTRACE_DETACH of task {}", self.tid))
    }

    /// SIGKILL the task and reap the ptrace notification of its death (the real parent, not us,
    /// collects its exit status unless we are its parent).
    pub fn kill(mut self) -> Result<()> {
        self.do_kill()
    }

    fn do_kill(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        crate::kernel::sys::process::kill(self.tgid, libc::SIGKILL)
            .with_context(|| format!("kill({}, SIGKILL)", self.tgid))?;
        loop {
            match raw::wait(self.tid) {
                Ok(Wait::Exited(_)) | Ok(Wait::Signaled(_)) | Err(_) => return Ok(()),
                Ok(Wait::Stopped(..)) => {
                    let _ = raw::cont(self.tid, 0);
                }
            }
        }
    }

    /// Collects the death of this thread after its process was sent SIGKILL by the caller (a
    /// dump of a tree kills every process first, then reaps each traced thread).
    pub fn reap_killed(mut self) {
        if !self.attached {
            return;
        }
        self.attached = false;
        loop {
            match raw::wait(self.tid) {
                Ok(Wait::Exited(_)) | Ok(Wait::Signaled(_)) | Err(_) => return,
                Ok(Wait::Stopped(..)) => {
                    let _ = raw::cont(self.tid, 0);
                }
            }
        }
    }

    /// Marks the task as no longer ours without touching it (it exited, and its exit was
    /// collected by the caller).
    pub fn forget(mut self) {
        self.attached = false;
    }

    pub fn is_attached(&self) -> bool {
        self.attached
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if !self.attached {
            return;
        }
        let r = if self.kill_on_drop {
            self.do_kill()
        } else {
            self.do_detach()
        };
        if let Err(e) = r {
            log::warn!("releasing task {}: {e:#}", self.tid);
        }
    }
}
