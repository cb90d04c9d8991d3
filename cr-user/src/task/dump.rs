//! Collecting one task's CPU and per-task state: registers, XSAVE, signals, credentials,
//! limits, and what only the task itself can tell (through remote syscalls).
//!
//! Order matters, and [`crate::cmd::dump`] follows it:
//! 1. [`thread_core`] right after the seize, before any remote syscall: registers, XSAVE, the
//!    blocked mask, rseq. A remote syscall returning to user mode lets the kernel act on state
//!    that is pending for the task (it forgets an rseq critical section, puts back a mask saved
//!    by sigsuspend), so all of that is read first.
//! 2. [`task_state`] through remote syscalls ([`Remote::parked`]: each runs with every signal
//!    blocked, so a signal sent to the target meanwhile stays queued with its siginfo and is
//!    dumped as pending instead of stopping a remote call; the mask is put back after each).
//!    Setting the mask drops a mask saved by sigsuspend & co. (PTRACE_SETSIGMASK clears
//!    TIF_RESTORE_SIGMASK): harmless, because such a call is restarted from scratch when the
//!    task resumes, and then saves the mask again.
//! 3. [`pending_signals`] after the remote calls.

use anyhow::{bail, Context, Result};

use super::{
    ARCH_GET_XCOMP_PERM, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS, ERESTART_RESTARTBLOCK,
};
use crate::image::pb;
use crate::kernel::proc;
use crate::kernel::ptrace::{raw, Remote, Tracee};

pub fn gp_regs(r: &libc::user_regs_struct) -> pb::GpRegs {
    pb::GpRegs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

/// `struct rseq_cs` (uapi/linux/rseq.h): the descriptor of an rseq critical section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqCs {
    pub version: u32,
    pub flags: u32,
    pub start_ip: u64,
    pub post_commit_offset: u64,
    pub abort_ip: u64,
}

impl RseqCs {
    pub fn parse(b: &[u8; 32]) -> RseqCs {
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        RseqCs {
            version: u32_at(0),
            flags: u32_at(4),
            start_ip: u64_at(8),
            post_commit_offset: u64_at(16),
            abort_ip: u64_at(24),
        }
    }

    /// Whether `ip` lies inside the section (the kernel's test: start <= ip < start + offset).
    pub fn contains(&self, ip: u64) -> bool {
        ip >= self.start_ip && ip - self.start_ip < self.post_commit_offset
    }
}

/// Offset of `rseq_cs` (a u64 pointer) in `struct rseq`.
const RSEQ_CS_OFFSET: u64 = 8;

/// Where a task interrupted inside an rseq critical section must resume: the section's abort
/// handler, exactly as the kernel would have sent it there on preemption or signal delivery.
/// Returns None when the task is not inside a section.
///
/// This must be decided before cr's first remote syscall: on the way back to user mode from it
/// the kernel sees an instruction pointer outside the section and clears `rseq_cs` in the
/// task's memory, so afterwards the task would run on inside the section as if it had never
/// been interrupted (wrong for both -R and restore, which may land on another CPU).
fn rseq_resume_ip(pid: i32, area: u64, regs: &libc::user_regs_struct) -> Result<Option<u64>> {
    let mut p = [0u8; 8];
    crate::kernel::ptrace::inject::read_mem(pid, area + RSEQ_CS_OFFSET, &mut p)
        .context("read rseq_cs of the rseq area")?;
    let cs_addr = u64::from_ne_bytes(p);
    if cs_addr == 0 {
        return Ok(None);
    }
    let mut b = [0u8; 32];
    crate::kernel::ptrace::inject::read_mem(pid, cs_addr, &mut b)
        .with_context(|| format!("read the rseq_cs descriptor at {cs_addr:#x}"))?;
    let cs = RseqCs::parse(&b);
    if !cs.contains(regs.rip) {
        return Ok(None);
    }
    if (regs.orig_rax as i64) >= 0 {
        // A syscall inside a critical section is a bug of the task (the kernel kills it with
        // CONFIG_DEBUG_RSEQ); moving rip would break the syscall restart: leave it.
        log::warn!(
            "task {pid} is in syscall {} inside an rseq critical section; not moving it",
            regs.orig_rax as i64
        );
        return Ok(None);
    }
    if cs.version != 0 {
        bail!(
            "task {pid} is inside an rseq critical section of unknown ABI version {}",
            cs.version
        );
    }
    Ok(Some(cs.abort_ip))
}

/// The thread-level part of a core image: registers (as they were before any remote call, with
/// an rseq abort applied), XSAVE, blocked signals, rseq, comm. Pending signals are added later
/// by [`pending_signals`] and the per-process state by [`task_state`].
///
/// If the task is inside an rseq critical section its instruction pointer is moved to the
/// abort handler in the tracee as well, so `-R` (and a failed dump) resume there too.
pub fn thread_core(t: &Tracee, regs: &libc::user_regs_struct) -> Result<pb::Core> {
    let mut regs = *regs;
    let xsave = t.xstate()?;
    // PTRACE_GETSIGMASK returns the mask saved by sigsuspend/ppoll/pselect/epoll_pwait when the
    // task is inside one: the mask it runs with once the call is restarted and returns.
    let sigmask = t.sigmask()?;
    let rseq = match t.rseq() {
        Ok(c) if c.rseq_abi_pointer != 0 => Some(pb::Rseq {
            addr: c.rseq_abi_pointer,
            len: c.rseq_abi_size,
            signature: c.signature,
        }),
        Ok(_) => None,
        Err(e) => {
            log::debug!("rseq configuration of {}: {e:#}", t.tid);
            None
        }
    };
    if let Some(rs) = &rseq {
        if let Some(ip) = rseq_resume_ip(t.tid, rs.addr, &regs)? {
            log::info!("task {} was inside an rseq critical section at {:#x}: it resumes at the abort handler {ip:#x}", t.tid, regs.rip);
            regs.rip = ip;
            t.set_regs(&regs)?;
        }
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/task/{}/comm", t.tgid, t.tid))
        .with_context(|| format!("read /proc/{}/task/{}/comm", t.tgid, t.tid))?
        .trim_end_matches('\n')
        .to_string();
    let (nr, ret) = (regs.orig_rax as i64, regs.rax as i64);
    Ok(pb::Core {
        tid: t.tid,
        regs: Some(gp_regs(&regs)),
        xsave,
        sigmask,
        comm,
        restart: Some(pb::SyscallRestart { nr, ret }),
        rseq,
        sigaltstack: None,
        pending: Vec::new(),
        task: None,
        clear_child_tid: 0,
    })
}

/// Signals queued to the task (its own queue, then the process-wide one), in queue order, with
/// their full siginfo. Signals cr had to hold back (they stopped a remote syscall: only SIGSTOP
/// can, with every other signal blocked) are added with a kernel-made siginfo.
///
/// The task is stopped, so its queues only grow, at the tail: what is read is the queue as it
/// was when this started, bounded by the number of signals queued for the task's user then
/// (SigQ). Without that bound a sender that keeps queueing would keep this loop reading forever
/// (PTRACE_PEEKSIGINFO walks the list from its head for every entry, so the reader falls
/// further behind as the queue grows).
pub fn pending_signals(t: &Tracee) -> Result<Vec<pb::PendingSignal>> {
    let cap = proc::status::read_status(t.tgid)
        .map(|s| s.sig_q.0 as usize)
        .unwrap_or(usize::MAX);
    let mut pending = Vec::new();
    for shared in [false, true] {
        for si in peek_queue(t.tid, shared, cap)? {
            let signo = i32::from_ne_bytes([si[0], si[1], si[2], si[3]]);
            pending.push(pb::PendingSignal {
                signo,
                siginfo: si.to_vec(),
                shared,
            });
        }
    }
    if pending.len() > 1000 {
        log::info!("task {}: {} signals pending", t.tid, pending.len());
    }
    for &sig in &t.stashed {
        let mut si = [0u8; 128];
        si[0..4].copy_from_slice(&sig.to_ne_bytes());
        // si_code SI_KERNEL (0x80): delivered by the kernel on the task's behalf.
        si[8..12].copy_from_slice(&0x80i32.to_ne_bytes());
        pending.push(pb::PendingSignal {
            signo: sig,
            siginfo: si.to_vec(),
            shared: false,
        });
    }
    Ok(pending)
}

/// Up to `cap` queued siginfos of one queue of `tid`, from the head, without dequeuing them.
fn peek_queue(tid: i32, shared: bool, cap: usize) -> Result<Vec<[u8; 128]>> {
    let mut out = Vec::new();
    let mut buf = vec![[0u8; 128]; 256];
    while out.len() < cap {
        let want = buf.len().min(cap - out.len());
        let n = raw::peeksiginfo(tid, out.len() as u64, shared, &mut buf[..want]).with_context(
            || {
                format!(
                    "PTRACE_PEEKSIGINFO of task {tid} ({} queue)",
                    if shared { "process" } else { "thread" }
                )
            },
        )?;
        out.extend_from_slice(&buf[..n]);
        if n < want {
            break;
        }
    }
    Ok(out)
}

/// Per-thread state only the thread itself can tell, through remote syscalls: the alternate
/// signal stack and the clear_child_tid address (set_tid_address; glibc points it at the
/// thread's tid field, which pthread_join waits on).
pub fn thread_state(r: &mut Remote, core: &mut pb::Core) -> Result<()> {
    let scratch = r.scratch(4096)?.addr;
    // sigaltstack(NULL, &old): stack_t { void *ss_sp; int ss_flags; size_t ss_size; }
    r.syscall("sigaltstack(query)", libc::SYS_sigaltstack, &[0, scratch])?;
    let mut b = [0u8; 24];
    r.read_mem(scratch, &mut b)?;
    core.sigaltstack = Some(pb::SigAltStack {
        sp: u64::from_ne_bytes(b[0..8].try_into().context("stack_t")?),
        flags: i32::from_ne_bytes(b[8..12].try_into().context("stack_t")?),
        size: u64::from_ne_bytes(b[16..24].try_into().context("stack_t")?),
    });
    r.write_mem(scratch, &[0u8; 8])?;
    match r.raw_syscall(libc::SYS_prctl, &[PR_GET_TID_ADDRESS, scratch])? {
        0 => core.clear_child_tid = read_u64(r, scratch)?,
        e => log::debug!("prctl(PR_GET_TID_ADDRESS) in task {}: {e}", core.tid),
    }
    Ok(())
}

/// prctl(PR_GET_TID_ADDRESS) (CONFIG_CHECKPOINT_RESTORE).
const PR_GET_TID_ADDRESS: u64 = 40;

/// Reads a u64 the task wrote into scratch memory.
fn read_u64(r: &Remote, addr: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_mem(addr, &mut b)?;
    Ok(u64::from_ne_bytes(b))
}

/// RLIMIT_NLIMITS on Linux (libc deprecates its constant as unstable across OSes).
pub const RLIMIT_NLIMITS: u32 = 16;

/// Per-process state. Most of it is only known to the task (or readable from outside only with
/// privileges cr may lack: prlimit64 on another task needs CAP_SYS_RESOURCE unless the ids
/// match, /proc/PID/timerslack_ns needs CAP_SYS_NICE): those queries run as remote syscalls
/// through `r`, using its scratch memory.
pub fn task_state(
    pid: i32,
    r: &mut Remote,
    status: &proc::status::Status,
) -> Result<(pb::TaskState, u64)> {
    if status.seccomp != 0 {
        // Restoring without the filters would silently drop a security boundary.
        crate::refuse!(
            None,
            "PID {pid} runs under seccomp (mode {}, {} filters): dumping seccomp state is not supported yet",
            status.seccomp,
            status.seccomp_filters.unwrap_or(0)
        );
    }
    let scratch = r.scratch(4096)?.addr;
    // Signal dispositions: rt_sigaction(sig, NULL, &old, 8) for every signal.
    let mut sigactions = Vec::new();
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        r.syscall(
            "rt_sigaction(query)",
            libc::SYS_rt_sigaction,
            &[sig as u64, 0, scratch, 8],
        )
        .with_context(|| format!("query the action of signal {sig}"))?;
        let mut b = [0u8; 32];
        r.read_mem(scratch, &mut b)?;
        let w = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(x)
        };
        sigactions.push(pb::SigAction {
            signo: sig,
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        });
    }
    let brk = r.syscall("brk(0)", libc::SYS_brk, &[0])?;
    let dumpable = r.syscall(
        "prctl(PR_GET_DUMPABLE)",
        libc::SYS_prctl,
        &[libc::PR_GET_DUMPABLE as u64],
    )? != 0;
    r.write_mem(scratch, &[0u8; 8])?;
    r.syscall(
        "prctl(PR_GET_PDEATHSIG)",
        libc::SYS_prctl,
        &[libc::PR_GET_PDEATHSIG as u64, scratch],
    )?;
    let pdeath_sig = read_u64(r, scratch)? as u32 as i32;
    r.write_mem(scratch, &[0u8; 8])?;
    r.syscall(
        "prctl(PR_GET_CHILD_SUBREAPER)",
        libc::SYS_prctl,
        &[libc::PR_GET_CHILD_SUBREAPER as u64, scratch],
    )?;
    let child_subreaper = read_u64(r, scratch)? as u32 != 0;
    let securebits = r.syscall(
        "prctl(PR_GET_SECUREBITS)",
        libc::SYS_prctl,
        &[libc::PR_GET_SECUREBITS as u64],
    )? as u32;
    let personality =
        r.syscall("personality(query)", libc::SYS_personality, &[0xffff_ffff])? as u32;
    let timer_slack_ns = r.syscall(
        "prctl(PR_GET_TIMERSLACK)",
        libc::SYS_prctl,
        &[libc::PR_GET_TIMERSLACK as u64],
    )?;
    let no_new_privs = r.syscall(
        "prctl(PR_GET_NO_NEW_PRIVS)",
        libc::SYS_prctl,
        &[libc::PR_GET_NO_NEW_PRIVS as u64],
    )? != 0;
    // XSAVE components the task may use (AMX tile data must be requested before use).
    r.write_mem(scratch, &[0u8; 8])?;
    let xcomp_perm = match r.raw_syscall(libc::SYS_arch_prctl, &[ARCH_GET_XCOMP_PERM, scratch])? {
        0 => read_u64(r, scratch)?,
        e => {
            log::debug!("arch_prctl(ARCH_GET_XCOMP_PERM) in {pid}: {e}");
            0
        }
    };

    let mut rlimits = Vec::new();
    for res in 0..RLIMIT_NLIMITS {
        // prlimit64(0, res, NULL, &old): the task's own limits, no privilege needed.
        r.syscall(
            "prlimit64(query)",
            libc::SYS_prlimit64,
            &[0, res as u64, 0, scratch],
        )
        .with_context(|| format!("query resource limit {res}"))?;
        let mut b = [0u8; 16];
        r.read_mem(scratch, &mut b)?;
        let cur = u64::from_ne_bytes(b[0..8].try_into().context("rlimit64")?);
        let max = u64::from_ne_bytes(b[8..16].try_into().context("rlimit64")?);
        rlimits.push(pb::Rlimit {
            resource: res,
            cur,
            max,
        });
    }
    let link = |name: &str| -> Result<String> {
        let p = format!("/proc/{pid}/{name}");
        Ok(std::fs::read_link(&p)
            .with_context(|| format!("readlink {p}"))?
            .to_string_lossy()
            .into_owned())
    };
    let creds = pb::Creds {
        uid: status.uid[0],
        euid: status.uid[1],
        suid: status.uid[2],
        fsuid: status.uid[3],
        gid: status.gid[0],
        egid: status.gid[1],
        sgid: status.gid[2],
        fsgid: status.gid[3],
        groups: status.groups.clone(),
        cap_inh: status.cap_inh,
        cap_prm: status.cap_prm,
        cap_eff: status.cap_eff,
        cap_bnd: status.cap_bnd,
        cap_amb: status.cap_amb,
        securebits,
    };
    let st = pb::TaskState {
        umask: status.umask.unwrap_or(0o022),
        rlimits,
        personality,
        creds: Some(creds),
        sigactions,
        cwd: link("cwd")?,
        root: link("root")?,
        dumpable,
        pdeath_sig,
        no_new_privs,
        timer_slack_ns,
        child_subreaper,
        xcomp_perm,
    };
    Ok((st, brk))
}

/// Whether the registers say the task was inside a syscall that the kernel would restart.
pub fn describe_restart(regs: &libc::user_regs_struct) -> Option<&'static str> {
    if (regs.orig_rax as i64) < 0 {
        return None;
    }
    match -(regs.rax as i64) {
        ERESTARTSYS => Some("ERESTARTSYS"),
        ERESTARTNOINTR => Some("ERESTARTNOINTR"),
        ERESTARTNOHAND => Some("ERESTARTNOHAND"),
        ERESTART_RESTARTBLOCK => Some("ERESTART_RESTARTBLOCK"),
        _ => None,
    }
}

pub use raw::RseqConfig;

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rip: u64, orig_rax: i64, rax: i64) -> libc::user_regs_struct {
        let mut r = crate::kernel::ptrace::raw::zeroed_regs();
        r.rip = rip;
        r.orig_rax = orig_rax as u64;
        r.rax = rax as u64;
        r
    }

    #[test]
    fn rseq_cs_layout_and_range() {
        let mut b = [0u8; 32];
        b[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[16..24].copy_from_slice(&0x20u64.to_ne_bytes());
        b[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        let cs = RseqCs::parse(&b);
        assert_eq!(
            cs,
            RseqCs {
                version: 0,
                flags: 0,
                start_ip: 0x1000,
                post_commit_offset: 0x20,
                abort_ip: 0x2000
            }
        );
        assert!(cs.contains(0x1000) && cs.contains(0x101f));
        assert!(!cs.contains(0x1020) && !cs.contains(0xfff) && !cs.contains(0));
    }

    #[test]
    fn restart_codes() {
        assert_eq!(
            describe_restart(&regs(0, 35, -516)),
            Some("ERESTART_RESTARTBLOCK")
        );
        assert_eq!(describe_restart(&regs(0, 0, -512)), Some("ERESTARTSYS"));
        assert_eq!(describe_restart(&regs(0, 34, -514)), Some("ERESTARTNOHAND"));
        assert_eq!(
            describe_restart(&regs(0, -1, -512)),
            None,
            "not in a syscall"
        );
        assert_eq!(
            describe_restart(&regs(0, 0, -4)),
            None,
            "plain EINTR is final"
        );
    }
}
