//! Collecting one task's CPU and per-task state: registers, XSAVE, signals, credentials,
//! limits, and what only the task itself can tell (through remote syscalls).

use anyhow::{Context, Result};

use crate::image::pb;
use crate::proc;
use crate::ptrace::{raw, Remote, Tracee};

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

/// The thread-level part of a core image: registers (as they were before any remote call),
/// XSAVE, signal mask, queued signals, rseq, comm.
pub fn thread_core(t: &Tracee, regs: &libc::user_regs_struct) -> Result<pb::Core> {
    let xsave = t.xstate()?;
    let sigmask = t.sigmask()?;
    let mut pending = Vec::new();
    for shared in [false, true] {
        for si in t.pending(shared)? {
            let signo = i32::from_ne_bytes(si[0..4].try_into().expect("4 bytes"));
            pending.push(pb::PendingSignal { signo, siginfo: si.to_vec(), shared });
        }
    }
    // Signals cr had to hold back while seizing are still the task's: keep them pending.
    for &sig in &t.stashed {
        let mut si = [0u8; 128];
        si[0..4].copy_from_slice(&sig.to_ne_bytes());
        // si_code SI_KERNEL (0x80): delivered by the kernel on the task's behalf.
        si[8..12].copy_from_slice(&0x80i32.to_ne_bytes());
        pending.push(pb::PendingSignal { signo: sig, siginfo: si.to_vec(), shared: false });
    }
    let rseq = match t.rseq() {
        Ok(c) if c.rseq_abi_pointer != 0 => Some(pb::Rseq { addr: c.rseq_abi_pointer, len: c.rseq_abi_size, signature: c.signature }),
        Ok(_) => None,
        Err(e) => {
            log::debug!("rseq configuration of {}: {e:#}", t.tid);
            None
        }
    };
    let comm = std::fs::read_to_string(format!("/proc/{}/task/{}/comm", t.tgid, t.tid))
        .with_context(|| format!("read /proc/{}/task/{}/comm", t.tgid, t.tid))?
        .trim_end_matches('\n')
        .to_string();
    let (nr, ret) = (regs.orig_rax as i64, regs.rax as i64);
    Ok(pb::Core {
        tid: t.tid,
        regs: Some(gp_regs(regs)),
        xsave,
        sigmask,
        comm,
        restart: Some(pb::SyscallRestart { nr, ret }),
        rseq,
        sigaltstack: None,
        pending,
        task: None,
        clear_child_tid: 0,
    })
}

/// Reads a u32/u64 the task wrote into scratch memory.
fn read_u64(r: &Remote, addr: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_mem(addr, &mut b)?;
    Ok(u64::from_ne_bytes(b))
}

/// Per-process state. Some of it is only known to the task: those queries run as remote
/// syscalls through `r` (using its scratch memory).
pub fn task_state(pid: i32, r: &mut Remote, status: &proc::status::Status) -> Result<(pb::TaskState, pb::SigAltStack, u64)> {
    let scratch = r.scratch(4096)?.addr;
    // Signal dispositions: rt_sigaction(sig, NULL, &old, 8) for every signal.
    let mut sigactions = Vec::new();
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        r.syscall("rt_sigaction(query)", libc::SYS_rt_sigaction, &[sig as u64, 0, scratch, 8])?;
        let mut b = [0u8; 32];
        r.read_mem(scratch, &mut b)?;
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        sigactions.push(pb::SigAction { signo: sig, handler: w(0), flags: w(1), restorer: w(2), mask: w(3) });
    }
    // sigaltstack(NULL, &old): stack_t { void *ss_sp; int ss_flags; size_t ss_size; }
    r.syscall("sigaltstack(query)", libc::SYS_sigaltstack, &[0, scratch])?;
    let mut b = [0u8; 24];
    r.read_mem(scratch, &mut b)?;
    let altstack = pb::SigAltStack {
        sp: u64::from_ne_bytes(b[0..8].try_into().expect("8")),
        flags: i32::from_ne_bytes(b[8..12].try_into().expect("4")),
        size: u64::from_ne_bytes(b[16..24].try_into().expect("8")),
    };
    let brk = r.syscall("brk(0)", libc::SYS_brk, &[0])?;
    let dumpable = r.syscall("prctl(PR_GET_DUMPABLE)", libc::SYS_prctl, &[libc::PR_GET_DUMPABLE as u64])? != 0;
    r.write_mem(scratch, &[0u8; 8])?;
    r.syscall("prctl(PR_GET_PDEATHSIG)", libc::SYS_prctl, &[libc::PR_GET_PDEATHSIG as u64, scratch])?;
    let pdeath_sig = read_u64(r, scratch)? as u32 as i32;
    r.write_mem(scratch, &[0u8; 8])?;
    r.syscall("prctl(PR_GET_CHILD_SUBREAPER)", libc::SYS_prctl, &[libc::PR_GET_CHILD_SUBREAPER as u64, scratch])?;
    let child_subreaper = read_u64(r, scratch)? as u32 != 0;
    let securebits = r.syscall("prctl(PR_GET_SECUREBITS)", libc::SYS_prctl, &[libc::PR_GET_SECUREBITS as u64])? as u32;
    let personality = r.syscall("personality(query)", libc::SYS_personality, &[0xffff_ffff])? as u32;

    let mut rlimits = Vec::new();
    // RLIMIT_NLIMITS is 16 on Linux (libc deprecates its constant as unstable across OSes).
    for res in 0..16u32 {
        let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: prlimit64 reading another process's limits into a valid out-struct.
        let rc = unsafe { libc::prlimit64(pid, res as _, std::ptr::null(), &mut old) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("prlimit64({pid}, {res})"));
        }
        rlimits.push(pb::Rlimit { resource: res, cur: old.rlim_cur, max: old.rlim_max });
    }
    let link = |name: &str| -> Result<String> {
        let p = format!("/proc/{pid}/{name}");
        Ok(std::fs::read_link(&p).with_context(|| format!("readlink {p}"))?.to_string_lossy().into_owned())
    };
    let timer_slack_ns = std::fs::read_to_string(format!("/proc/{pid}/timerslack_ns"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
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
        no_new_privs: status.no_new_privs,
        timer_slack_ns,
        child_subreaper,
    };
    Ok((st, altstack, brk))
}

/// Whether the registers say the task was inside a syscall that the kernel would restart.
pub fn describe_restart(regs: &libc::user_regs_struct) -> Option<&'static str> {
    if (regs.orig_rax as i64) < 0 {
        return None;
    }
    match -(regs.rax as i64) {
        512 => Some("ERESTARTSYS"),
        513 => Some("ERESTARTNOINTR"),
        514 => Some("ERESTARTNOHAND"),
        516 => Some("ERESTART_RESTARTBLOCK"),
        _ => None,
    }
}

pub use raw::RseqConfig;
