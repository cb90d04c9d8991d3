//! Restoring per-task state through remote syscalls, and finally the registers.

use anyhow::{bail, Context, Result};

use crate::image::pb;
use crate::ptrace::{Remote, Tracee};

use super::memory::put_str;

/// Everything but signals, credentials and registers: cwd, umask, dispositions, altstack,
/// personality, comm, rseq, prctl bits, session.
pub fn restore_state(r: &mut Remote, scratch: u64, pid: i32, core: &pb::Core, ps: &pb::PsTreeEntry) -> Result<()> {
    let st = core.task.as_ref().context("core image has no task state")?;
    let p = put_str(r, scratch, 0, &st.cwd)?;
    r.syscall("chdir", libc::SYS_chdir, &[p]).with_context(|| format!("change directory to {}", st.cwd))?;
    r.syscall("umask", libc::SYS_umask, &[st.umask as u64])?;
    for sa in &st.sigactions {
        let mut b = [0u8; 32];
        for (i, w) in [sa.handler, sa.flags, sa.restorer, sa.mask].iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
        }
        r.write_mem(scratch, &b)?;
        r.syscall("rt_sigaction", libc::SYS_rt_sigaction, &[sa.signo as u64, scratch, 0, 8])
            .with_context(|| format!("restore the action of signal {}", sa.signo))?;
    }
    if let Some(ss) = &core.sigaltstack {
        if ss.flags & libc::SS_DISABLE == 0 {
            let mut b = [0u8; 24];
            b[0..8].copy_from_slice(&ss.sp.to_ne_bytes());
            b[8..12].copy_from_slice(&(ss.flags & !libc::SS_ONSTACK).to_ne_bytes());
            b[16..24].copy_from_slice(&ss.size.to_ne_bytes());
            r.write_mem(scratch, &b)?;
            r.syscall("sigaltstack", libc::SYS_sigaltstack, &[scratch, 0]).context("restore the alternate signal stack")?;
        }
    }
    r.syscall("personality", libc::SYS_personality, &[st.personality as u64])?;
    let p = put_str(r, scratch, 0, &core.comm)?;
    r.syscall("prctl(PR_SET_NAME)", libc::SYS_prctl, &[libc::PR_SET_NAME as u64, p])?;
    if let Some(rs) = &core.rseq {
        r.syscall("rseq", libc::SYS_rseq, &[rs.addr, rs.len as u64, 0, rs.signature as u64])
            .with_context(|| format!("register rseq at {:#x}", rs.addr))?;
    }
    r.syscall("prctl(PR_SET_DUMPABLE)", libc::SYS_prctl, &[libc::PR_SET_DUMPABLE as u64, st.dumpable as u64])?;
    r.syscall("prctl(PR_SET_PDEATHSIG)", libc::SYS_prctl, &[libc::PR_SET_PDEATHSIG as u64, st.pdeath_sig as u64])?;
    if st.child_subreaper {
        r.syscall("prctl(PR_SET_CHILD_SUBREAPER)", libc::SYS_prctl, &[libc::PR_SET_CHILD_SUBREAPER as u64, 1])?;
    }
    if st.timer_slack_ns != 0 {
        r.syscall("prctl(PR_SET_TIMERSLACK)", libc::SYS_prctl, &[libc::PR_SET_TIMERSLACK as u64, st.timer_slack_ns])?;
    }
    // Session and process group.
    if ps.sid == pid {
        r.syscall("setsid", libc::SYS_setsid, &[]).context("make the task a session leader")?;
    } else if ps.pgid == pid {
        r.syscall("setpgid", libc::SYS_setpgid, &[0, 0])?;
    }
    Ok(())
}

/// Resource limits, set from cr (prlimit on the task). Raising a hard limit needs
/// CAP_SYS_RESOURCE: if cr lacks it and the image's limit is higher than cr's, that is an error.
pub fn restore_rlimits(pid: i32, st: &pb::TaskState) -> Result<()> {
    for rl in &st.rlimits {
        let new = libc::rlimit64 { rlim_cur: rl.cur, rlim_max: rl.max };
        // SAFETY: prlimit64 with a valid input struct and no output.
        if unsafe { libc::prlimit64(pid, rl.resource as _, &new, std::ptr::null_mut()) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(e).with_context(|| format!("set resource limit {} to {}/{} (raising a hard limit needs CAP_SYS_RESOURCE)", rl.resource, rl.cur, rl.max));
        }
    }
    Ok(())
}

/// Queues the signals that were pending at dump time. Called with every signal blocked, so
/// none is delivered while cr still drives the task.
pub fn queue_pending(r: &mut Remote, scratch: u64, pid: i32, tid: i32, core: &pb::Core) -> Result<()> {
    for p in &core.pending {
        if p.siginfo.len() != 128 {
            bail!("pending signal {}: siginfo of {} bytes", p.signo, p.siginfo.len());
        }
        r.write_mem(scratch, &p.siginfo)?;
        if p.shared {
            r.syscall("rt_sigqueueinfo", libc::SYS_rt_sigqueueinfo, &[pid as u64, p.signo as u64, scratch])
        } else {
            r.syscall("rt_tgsigqueueinfo", libc::SYS_rt_tgsigqueueinfo, &[pid as u64, tid as u64, p.signo as u64, scratch])
        }
        .with_context(|| format!("queue pending signal {}", p.signo))?;
    }
    Ok(())
}

/// Credentials last (after them the task may no longer be privileged): groups, gids, uids,
/// then capabilities. Nothing is done when they already match (the common case: root).
pub fn restore_creds(r: &mut Remote, scratch: u64, pid: i32, c: &pb::Creds) -> Result<()> {
    let now = crate::proc::status::read_status(pid)?;
    let same = now.uid == [c.uid, c.euid, c.suid, c.fsuid]
        && now.gid == [c.gid, c.egid, c.sgid, c.fsgid]
        && now.groups == c.groups
        && (now.cap_inh, now.cap_prm, now.cap_eff, now.cap_bnd, now.cap_amb) == (c.cap_inh, c.cap_prm, c.cap_eff, c.cap_bnd, c.cap_amb);
    if same {
        return Ok(());
    }
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    r.write_mem(scratch, &groups)?;
    r.syscall("setgroups", libc::SYS_setgroups, &[c.groups.len() as u64, scratch])?;
    // Drop bounding-set capabilities the task did not have.
    for cap in 0..64u64 {
        if c.cap_bnd & (1 << cap) == 0 && now.cap_bnd & (1 << cap) != 0 {
            r.syscall("prctl(PR_CAPBSET_DROP)", libc::SYS_prctl, &[libc::PR_CAPBSET_DROP as u64, cap])?;
        }
    }
    // Keep permitted capabilities across the uid change; securebits are set to the dumped value
    // at the end.
    r.syscall("prctl(PR_SET_KEEPCAPS)", libc::SYS_prctl, &[libc::PR_SET_KEEPCAPS as u64, 1])?;
    r.syscall("setresgid", libc::SYS_setresgid, &[c.gid as u64, c.egid as u64, c.sgid as u64])?;
    r.syscall("setresuid", libc::SYS_setresuid, &[c.uid as u64, c.euid as u64, c.suid as u64])?;
    r.syscall("setfsgid", libc::SYS_setfsgid, &[c.fsgid as u64])?;
    r.syscall("setfsuid", libc::SYS_setfsuid, &[c.fsuid as u64])?;
    // capset(v3): header {version, pid}, then two data words {effective, permitted, inheritable}.
    let mut b = [0u8; 8 + 24];
    b[0..4].copy_from_slice(&0x2008_0522u32.to_ne_bytes());
    b[4..8].copy_from_slice(&0i32.to_ne_bytes());
    for (i, word) in [c.cap_eff, c.cap_prm, c.cap_inh].iter().enumerate() {
        b[8 + i * 4..12 + i * 4].copy_from_slice(&(*word as u32).to_ne_bytes());
        b[20 + i * 4..24 + i * 4].copy_from_slice(&((*word >> 32) as u32).to_ne_bytes());
    }
    r.write_mem(scratch, &b)?;
    r.syscall("capset", libc::SYS_capset, &[scratch, scratch + 8])?;
    for cap in 0..64u64 {
        if c.cap_amb & (1 << cap) != 0 {
            r.syscall("prctl(PR_CAP_AMBIENT_RAISE)", libc::SYS_prctl, &[libc::PR_CAP_AMBIENT as u64, libc::PR_CAP_AMBIENT_RAISE as u64, cap, 0, 0])?;
        }
    }
    r.syscall("prctl(PR_SET_SECUREBITS)", libc::SYS_prctl, &[libc::PR_SET_SECUREBITS as u64, c.securebits as u64])?;
    Ok(())
}

pub fn user_regs(g: &pb::GpRegs) -> libc::user_regs_struct {
    libc::user_regs_struct {
        r15: g.r15,
        r14: g.r14,
        r13: g.r13,
        r12: g.r12,
        rbp: g.rbp,
        rbx: g.rbx,
        r11: g.r11,
        r10: g.r10,
        r9: g.r9,
        r8: g.r8,
        rax: g.rax,
        rcx: g.rcx,
        rdx: g.rdx,
        rsi: g.rsi,
        rdi: g.rdi,
        orig_rax: g.orig_rax,
        rip: g.rip,
        cs: g.cs,
        eflags: g.eflags,
        rsp: g.rsp,
        ss: g.ss,
        fs_base: g.fs_base,
        gs_base: g.gs_base,
        ds: g.ds,
        es: g.es,
        fs: g.fs,
        gs: g.gs,
    }
}

/// Final CPU state. The registers go back exactly as dumped, orig_rax included: when the task
/// leaves this ptrace stop, the kernel's own syscall-restart logic sees the interrupted syscall
/// (-ERESTARTSYS & co. in rax) and restarts it just as it would have without the checkpoint
/// (-ERESTART_RESTARTBLOCK becomes restart_syscall, which in a new task returns EINTR, as in
/// CRIU).
pub fn restore_cpu(t: &Tracee, core: &pb::Core) -> Result<()> {
    let regs = core.regs.as_ref().context("core image has no registers")?;
    t.set_regs(&user_regs(regs))?;
    if !core.xsave.is_empty() {
        t.set_xstate(&core.xsave)?;
    }
    t.set_sigmask(core.sigmask)?;
    Ok(())
}
