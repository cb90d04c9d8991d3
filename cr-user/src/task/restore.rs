//! Restoring per-task state through remote syscalls, and finally the registers.
//!
//! [`restore_task`] runs everything in the one order that works:
//! 1. state that needs no privilege and nothing else: of the process, cwd, umask, signal
//!    dispositions and subreaper ([`restore_process_state`]); of the thread, sigaltstack,
//!    personality, clear_child_tid, comm, rseq and timer slack ([`restore_thread_state`]).
//!    Sessions and groups are set by tree::restore while the tree is created: they depend on
//!    the order the processes are made in;
//! 2. pending signals, queued by the task to itself (only the task itself may queue a siginfo
//!    that claims to come from the kernel or from kill()), while every signal is blocked;
//! 3. resource limits, after the signals (a lowered RLIMIT_SIGPENDING would refuse them);
//! 4. credentials (after them the task may no longer be privileged), then dumpable and the
//!    parent-death signal, which every credential change resets, and no_new_privs
//!    ([`restore_creds_and_resets`]).
//!
//! The other threads of a process go through the per-thread steps of the same order
//! ([`super::threads`]). [`restore_cpu`] comes last, once no further remote syscall is needed.

use anyhow::{bail, Context, Result};

use super::{ARCH_REQ_XCOMP_PERM, ERESTART_RESTARTBLOCK};
use crate::image::pb;
use crate::kernel::ptrace::{Remote, Tracee};

use crate::kernel::ptrace::inject::put_str;

/// Restores everything about the main thread's task but its memory, files and registers (see
/// the module docs for the order).
pub fn restore_task(r: &mut Remote, scratch: u64, pid: i32, core: &pb::Core) -> Result<()> {
    let st = core.task.as_ref().context("core image has no task state")?;
    check_xsave(&core.xsave, &r.t.xstate()?)?;
    request_xcomp_perm(r, pid, st.xcomp_perm, &core.xsave)?;
    restore_process_state(r, scratch, st)?;
    restore_thread_state(r, scratch, core, st)?;
    queue_pending(r, scratch, pid, pid, core)?;
    restore_rlimits(r, scratch, st)?;
    restore_creds_and_resets(r, scratch, pid, st)
}

/// What the process shares between its threads, and that needs no privilege: cwd, umask,
/// signal dispositions, subreaper. Set once, by the main thread.
fn restore_process_state(r: &mut Remote, scratch: u64, st: &pb::TaskState) -> Result<()> {
    let p = put_str(r, scratch, 0, &st.cwd)?;
    r.syscall("chdir", libc::SYS_chdir, &[p])
        .with_context(|| format!("change directory to {}", st.cwd))?;
    r.syscall("umask", libc::SYS_umask, &[st.umask as u64])?;
    for sa in &st.sigactions {
        // struct kernel_sigaction { handler, flags, restorer, mask }: exactly as dumped, so
        // SA_RESTORER and the restorer address (glibc's __restore_rt) come back too.
        let mut b = [0u8; 32];
        for (i, w) in [sa.handler, sa.flags, sa.restorer, sa.mask]
            .iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
        }
        r.write_mem(scratch, &b)?;
        r.syscall(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[sa.signo as u64, scratch, 0, 8],
        )
        .with_context(|| format!("restore the action of signal {}", sa.signo))?;
    }
    if st.child_subreaper {
        r.syscall(
            "prctl(PR_SET_CHILD_SUBREAPER)",
            libc::SYS_prctl,
            &[libc::PR_SET_CHILD_SUBREAPER as u64, 1],
        )?;
    }
    Ok(())
}

/// What every thread has of its own and that needs no privilege, for the thread `r` drives:
/// alternate signal stack, personality, clear_child_tid, name, rseq, timer slack. The same
/// steps for the main thread and for the others ([`super::threads`]), from the thread's core and
/// the process's task state (which holds personality and timer slack as the main thread had
/// them; the image keeps no per-thread copy).
pub fn restore_thread_state(
    r: &mut Remote,
    scratch: u64,
    core: &pb::Core,
    st: &pb::TaskState,
) -> Result<()> {
    if let Some(ss) = &core.sigaltstack {
        restore_altstack(r, scratch, ss)?;
    }
    r.syscall(
        "personality",
        libc::SYS_personality,
        &[st.personality as u64],
    )
    .with_context(|| format!("set personality {:#x}", st.personality))?;
    restore_thread_identity(r, scratch, core)?;
    // 0 would mean "back to the default", which is what a task with slack 0 (real-time
    // scheduling) does not have: leave those alone.
    if st.timer_slack_ns != 0 {
        r.syscall(
            "prctl(PR_SET_TIMERSLACK)",
            libc::SYS_prctl,
            &[libc::PR_SET_TIMERSLACK as u64, st.timer_slack_ns],
        )?;
    }
    Ok(())
}

/// sigaltstack() of the thread `r` drives, as dumped (nothing when it had none).
fn restore_altstack(r: &mut Remote, scratch: u64, ss: &pb::SigAltStack) -> Result<()> {
    if ss.flags & libc::SS_DISABLE != 0 {
        return Ok(());
    }
    // SS_ONSTACK is a state, not a flag one can set: the thread is on the stack again as soon
    // as its rsp is back.
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(&ss.sp.to_ne_bytes());
    b[8..12].copy_from_slice(&(ss.flags & !libc::SS_ONSTACK).to_ne_bytes());
    b[16..24].copy_from_slice(&ss.size.to_ne_bytes());
    r.write_mem(scratch, &b)?;
    r.syscall("sigaltstack", libc::SYS_sigaltstack, &[scratch, 0])
        .with_context(|| {
            format!(
                "restore the alternate signal stack {:#x}+{:#x} of thread {}",
                ss.sp, ss.size, r.t.tid
            )
        })?;
    Ok(())
}

/// The per-thread identity the kernel keeps: clear_child_tid, name, rseq registration (of the
/// thread `r` drives).
fn restore_thread_identity(r: &mut Remote, scratch: u64, core: &pb::Core) -> Result<()> {
    if core.clear_child_tid != 0 {
        r.syscall(
            "set_tid_address",
            libc::SYS_set_tid_address,
            &[core.clear_child_tid],
        )?;
    }
    let p = put_str(r, scratch, 0, &core.comm)?;
    r.syscall(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, p],
    )?;
    if let Some(rs) = &core.rseq {
        r.syscall(
            "rseq",
            libc::SYS_rseq,
            &[rs.addr, rs.len as u64, 0, rs.signature as u64],
        )
        .with_context(|| format!("register rseq at {:#x} for thread {}", rs.addr, r.t.tid))?;
    }
    Ok(())
}

/// Resource limits, set by the task itself (prlimit64 on another task needs CAP_SYS_RESOURCE
/// unless the ids match). Lowering is always allowed; raising a hard limit above cr's needs
/// CAP_SYS_RESOURCE, and failing that is an error, never a silent difference.
pub fn restore_rlimits(r: &mut Remote, scratch: u64, st: &pb::TaskState) -> Result<()> {
    for rl in &st.rlimits {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&rl.cur.to_ne_bytes());
        b[8..16].copy_from_slice(&rl.max.to_ne_bytes());
        r.write_mem(scratch, &b)?;
        r.syscall(
            "prlimit64",
            libc::SYS_prlimit64,
            &[0, rl.resource as u64, scratch, 0],
        )
        .with_context(|| {
            format!(
                "set resource limit {} to {}/{} (raising a hard limit needs CAP_SYS_RESOURCE)",
                rl.resource,
                limit_str(rl.cur),
                limit_str(rl.max)
            )
        })?;
    }
    Ok(())
}

fn limit_str(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// Queues the signals that were pending at dump time, in their order (real-time signals of one
/// number arrive in queue order with their values). Called with every signal blocked, so none is
/// delivered while cr still drives the task; the task's own mask is set by [`restore_cpu`].
pub fn queue_pending(
    r: &mut Remote,
    scratch: u64,
    pid: i32,
    tid: i32,
    core: &pb::Core,
) -> Result<()> {
    for p in &core.pending {
        if p.siginfo.len() != 128 {
            bail!(
                "pending signal {}: siginfo of {} bytes",
                p.signo,
                p.siginfo.len()
            );
        }
        if !(1..=64).contains(&p.signo) {
            bail!("pending signal {} is not a signal number", p.signo);
        }
        r.write_mem(scratch, &p.siginfo)?;
        if p.shared {
            r.syscall(
                "rt_sigqueueinfo",
                libc::SYS_rt_sigqueueinfo,
                &[pid as u64, p.signo as u64, scratch],
            )
        } else {
            r.syscall(
                "rt_tgsigqueueinfo",
                libc::SYS_rt_tgsigqueueinfo,
                &[pid as u64, tid as u64, p.signo as u64, scratch],
            )
        }
        .with_context(|| format!("queue pending signal {}", p.signo))?;
    }
    Ok(())
}

/// securebits (linux/securebits.h).
const SECBIT_KEEP_CAPS: u32 = 1 << 4;
const SECBIT_KEEP_CAPS_LOCKED: u32 = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: u32 = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: u32 = 1 << 7;
const CAP_SETPCAP: u32 = 8;

/// The securebits to run with while ids change: the image's, plus KEEP_CAPS (permitted
/// capabilities survive leaving uid 0), minus what would stop cr from finishing (a locked-off
/// KEEP_CAPS, a ban on raising ambient capabilities). [`restore_creds`] sets the image's exact
/// value at the end.
fn interim_securebits(image: u32) -> u32 {
    (image
        & !(SECBIT_KEEP_CAPS_LOCKED
            | SECBIT_NO_CAP_AMBIENT_RAISE
            | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED))
        | SECBIT_KEEP_CAPS
}

/// capset(v3) of the task itself: header {version, pid 0}, then two {effective, permitted,
/// inheritable} words (low 32 capabilities, high 32).
fn capset(r: &mut Remote, scratch: u64, eff: u64, prm: u64, inh: u64) -> Result<()> {
    let mut b = [0u8; 8 + 24];
    b[0..4].copy_from_slice(&0x2008_0522u32.to_ne_bytes());
    for (i, word) in [eff, prm, inh].iter().enumerate() {
        b[8 + i * 4..12 + i * 4].copy_from_slice(&(*word as u32).to_ne_bytes());
        b[20 + i * 4..24 + i * 4].copy_from_slice(&((*word >> 32) as u32).to_ne_bytes());
    }
    r.write_mem(scratch, &b)?;
    r.syscall("capset", libc::SYS_capset, &[scratch, scratch + 8])
        .with_context(|| {
            format!("capset(effective {eff:#x}, permitted {prm:#x}, inheritable {inh:#x})")
        })?;
    Ok(())
}

/// What of the credentials differs from the image, for the error message.
fn creds_mismatch(now: &crate::kernel::proc::status::Status, c: &pb::Creds) -> Vec<String> {
    let mut d = Vec::new();
    let want_uid = [c.uid, c.euid, c.suid, c.fsuid];
    let want_gid = [c.gid, c.egid, c.sgid, c.fsgid];
    if now.uid != want_uid {
        d.push(format!("uids {:?} (want {want_uid:?})", now.uid));
    }
    if now.gid != want_gid {
        d.push(format!("gids {:?} (want {want_gid:?})", now.gid));
    }
    if now.groups != c.groups {
        d.push(format!("groups {:?} (want {:?})", now.groups, c.groups));
    }
    for (name, got, want) in [
        ("CapInh", now.cap_inh, c.cap_inh),
        ("CapPrm", now.cap_prm, c.cap_prm),
        ("CapEff", now.cap_eff, c.cap_eff),
        ("CapBnd", now.cap_bnd, c.cap_bnd),
        ("CapAmb", now.cap_amb, c.cap_amb),
    ] {
        if got != want {
            d.push(format!("{name} {got:#x} (want {want:#x})"));
        }
    }
    d
}

/// Credentials, while the task still has cr's (full) privileges:
/// 1. supplementary groups; inheritable set (while the bounding set still allows it);
/// 2. interim securebits with KEEP_CAPS, then drop bounding-set capabilities;
/// 3. real/effective/saved gids and uids (permitted capabilities survive, effective do not);
/// 4. effective = permitted again, so fsuid/fsgid can be anything and ambient capabilities and
///    the final securebits can be set;
/// 5. the image's securebits, then its exact effective/permitted/inheritable sets.
///
/// The result is checked against /proc/PID/status: a difference is an error.
fn restore_creds(r: &mut Remote, scratch: u64, pid: i32, c: &pb::Creds) -> Result<()> {
    let now = crate::kernel::proc::status::read_status(pid)?;
    let cur_secbits = r.syscall(
        "prctl(PR_GET_SECUREBITS)",
        libc::SYS_prctl,
        &[libc::PR_GET_SECUREBITS as u64],
    )? as u32;
    if creds_mismatch(&now, c).is_empty() && cur_secbits == c.securebits {
        return Ok(());
    }
    if now.cap_eff & (1 << CAP_SETPCAP) == 0 {
        bail!("cr lacks CAP_SETPCAP: it cannot restore the credentials of task {pid}");
    }
    if now.groups != c.groups {
        let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
        r.write_mem(scratch, &groups)?;
        r.syscall(
            "setgroups",
            libc::SYS_setgroups,
            &[c.groups.len() as u64, scratch],
        )
        .with_context(|| format!("set supplementary groups {:?}", c.groups))?;
    }
    capset(r, scratch, now.cap_eff, now.cap_prm, c.cap_inh)?;
    r.syscall(
        "prctl(PR_SET_SECUREBITS)",
        libc::SYS_prctl,
        &[
            libc::PR_SET_SECUREBITS as u64,
            interim_securebits(c.securebits) as u64,
        ],
    )?;
    for cap in 0..64u64 {
        if c.cap_bnd & (1 << cap) == 0 && now.cap_bnd & (1 << cap) != 0 {
            r.syscall(
                "prctl(PR_CAPBSET_DROP)",
                libc::SYS_prctl,
                &[libc::PR_CAPBSET_DROP as u64, cap],
            )
            .with_context(|| format!("drop capability {cap} from the bounding set"))?;
        }
    }
    r.syscall(
        "setresgid",
        libc::SYS_setresgid,
        &[c.gid as u64, c.egid as u64, c.sgid as u64],
    )
    .with_context(|| format!("setresgid({}, {}, {})", c.gid, c.egid, c.sgid))?;
    r.syscall(
        "setresuid",
        libc::SYS_setresuid,
        &[c.uid as u64, c.euid as u64, c.suid as u64],
    )
    .with_context(|| format!("setresuid({}, {}, {})", c.uid, c.euid, c.suid))?;
    // KEEP_CAPS kept the permitted set; make it effective for what follows.
    let mid = crate::kernel::proc::status::read_status(pid)?;
    capset(r, scratch, mid.cap_prm, mid.cap_prm, c.cap_inh)?;
    // setfs[ug]id report no error (they return the previous id): checked below with the rest.
    r.syscall("setfsgid", libc::SYS_setfsgid, &[c.fsgid as u64])?;
    r.syscall("setfsuid", libc::SYS_setfsuid, &[c.fsuid as u64])?;
    if mid.cap_amb != c.cap_amb {
        r.syscall(
            "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
            libc::SYS_prctl,
            &[
                libc::PR_CAP_AMBIENT as u64,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as u64,
                0,
                0,
                0,
            ],
        )?;
        for cap in 0..64u64 {
            if c.cap_amb & (1 << cap) != 0 {
                r.syscall(
                    "prctl(PR_CAP_AMBIENT_RAISE)",
                    libc::SYS_prctl,
                    &[
                        libc::PR_CAP_AMBIENT as u64,
                        libc::PR_CAP_AMBIENT_RAISE as u64,
                        cap,
                        0,
                        0,
                    ],
                )
                .with_context(|| format!("raise ambient capability {cap}"))?;
            }
        }
    }
    r.syscall(
        "prctl(PR_SET_SECUREBITS)",
        libc::SYS_prctl,
        &[libc::PR_SET_SECUREBITS as u64, c.securebits as u64],
    )
    .with_context(|| format!("set securebits {:#x}", c.securebits))?;
    capset(r, scratch, c.cap_eff, c.cap_prm, c.cap_inh)?;

    let after = crate::kernel::proc::status::read_status(pid)?;
    let diff = creds_mismatch(&after, c);
    if !diff.is_empty() {
        bail!(
            "the credentials of task {pid} came out different: {}",
            diff.join(", ")
        );
    }
    Ok(())
}

/// The last remote steps of every thread, main or not: its credentials (each thread has its
/// own, and [`restore_creds`] checks them in /proc/TID/status), then what every credential
/// change resets (commit_creds clears the parent-death signal and sets dumpable to the
/// suid_dumpable sysctl), and no_new_privs, which cannot be cleared once set. After this the
/// thread may no longer be privileged enough for anything else cr would ask of it.
pub fn restore_creds_and_resets(
    r: &mut Remote,
    scratch: u64,
    tid: i32,
    st: &pb::TaskState,
) -> Result<()> {
    if let Some(c) = &st.creds {
        restore_creds(r, scratch, tid, c).with_context(|| format!("credentials of task {tid}"))?;
    }
    restore_after_creds(r, tid, st)
}

/// See [`restore_creds_and_resets`].
fn restore_after_creds(r: &mut Remote, pid: i32, st: &pb::TaskState) -> Result<()> {
    // PR_GET_DUMPABLE may say 2 (SUID_DUMP_ROOT), which prctl cannot set; the image keeps a bool.
    r.syscall(
        "prctl(PR_SET_DUMPABLE)",
        libc::SYS_prctl,
        &[libc::PR_SET_DUMPABLE as u64, st.dumpable as u64],
    )?;
    r.syscall(
        "prctl(PR_SET_PDEATHSIG)",
        libc::SYS_prctl,
        &[libc::PR_SET_PDEATHSIG as u64, st.pdeath_sig as u64],
    )
    .with_context(|| format!("set the parent-death signal {}", st.pdeath_sig))?;
    if st.pdeath_sig != 0 {
        // As with CRIU: the restored task's parent is cr, so with -d it gets this signal as soon
        // as cr exits.
        log::warn!(
            "task {pid} has parent-death signal {}: it is sent when cr (its parent now) exits",
            st.pdeath_sig
        );
    }
    if st.no_new_privs {
        r.syscall(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::SYS_prctl,
            &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Offsets in the standard-format XSAVE area given by PTRACE_GETREGSET(NT_X86_XSTATE).
const XSAVE_XCR0_OFFSET: usize = 464; // sw_reserved word 0: the features the kernel exposes
const XSAVE_XSTATE_BV_OFFSET: usize = 512; // header: components not in their initial state
const XSAVE_MIN_LEN: usize = 512 + 64;
/// XTILEDATA (AMX): a dynamically enabled component.
const XFEATURE_XTILEDATA: u64 = 1 << 18;

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off + 8)?;
    let mut w = [0u8; 8];
    w.copy_from_slice(s);
    Some(u64::from_ne_bytes(w))
}

/// Checks that this machine can take the image's XSAVE area: every component the task used
/// exists here, and the layout (size) is the same. `here` is the area of a task on this machine.
pub fn check_xsave(image: &[u8], here: &[u8]) -> Result<()> {
    if image.is_empty() {
        return Ok(());
    }
    if image.len() < XSAVE_MIN_LEN {
        bail!(
            "the image's XSAVE area is {} bytes, shorter than its header",
            image.len()
        );
    }
    let (img_xcr0, img_bv) = (
        u64_at(image, XSAVE_XCR0_OFFSET).unwrap_or(0),
        u64_at(image, XSAVE_XSTATE_BV_OFFSET).unwrap_or(0),
    );
    let here_xcr0 = u64_at(here, XSAVE_XCR0_OFFSET).unwrap_or(0);
    let missing = img_bv & !here_xcr0;
    if missing != 0 {
        bail!(
            "the task used CPU state components {missing:#x} that this machine lacks \
             (image XCR0 {img_xcr0:#x}, this machine {here_xcr0:#x}): restore it on a CPU with the same features"
        );
    }
    if image.len() != here.len() {
        bail!(
            "the image's XSAVE area is {} bytes, this machine's {} (image XCR0 {img_xcr0:#x}, this machine {here_xcr0:#x}): \
             a different CPU layout",
            image.len(),
            here.len()
        );
    }
    Ok(())
}

/// Requests the dynamically enabled XSAVE components (AMX) the task was permitted, before its
/// XSAVE area (which may hold tile data) is written.
fn request_xcomp_perm(r: &mut Remote, pid: i32, perm: u64, xsave: &[u8]) -> Result<()> {
    let used = u64_at(xsave, XSAVE_XSTATE_BV_OFFSET).unwrap_or(0);
    if (perm | used) & XFEATURE_XTILEDATA != 0 {
        r.syscall(
            "arch_prctl(ARCH_REQ_XCOMP_PERM)",
            libc::SYS_arch_prctl,
            &[ARCH_REQ_XCOMP_PERM, 18],
        )
        .with_context(|| format!("request AMX tile data permission for task {pid}"))?;
    }
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

/// The registers the restored task resumes with: as dumped, except that a syscall that was to be
/// continued through its restart block (-ERESTART_RESTARTBLOCK: nanosleep, clock_nanosleep with
/// a relative time, poll, futex waits with a timeout) returns -EINTR. The restart block (the
/// remaining time) lived in the old task's kernel state and is gone; CRIU does the same. The
/// other restart codes stay: when the task leaves its ptrace stop the kernel's own restart logic
/// re-executes the call (or returns EINTR if a handler without SA_RESTART runs first), exactly
/// as without the checkpoint.
pub fn resume_regs(g: &pb::GpRegs) -> libc::user_regs_struct {
    let mut regs = user_regs(g);
    if (regs.orig_rax as i64) >= 0 && regs.rax as i64 == -ERESTART_RESTARTBLOCK {
        regs.rax = -(libc::EINTR as i64) as u64;
    }
    regs
}

/// Final CPU state: registers (see [`resume_regs`]), the XSAVE area, the blocked mask.
pub fn restore_cpu(t: &Tracee, core: &pb::Core) -> Result<()> {
    let regs = core.regs.as_ref().context("core image has no registers")?;
    let r = resume_regs(regs);
    if r.rax != regs.rax {
        log::info!(
            "task {}: syscall {} was to continue through its restart block; it returns EINTR",
            t.tid,
            regs.orig_rax as i64
        );
    }
    t.set_regs(&r)?;
    if !core.xsave.is_empty() {
        t.set_xstate(&core.xsave)?;
    }
    t.set_sigmask(core.sigmask)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xsave(len: usize, xcr0: u64, bv: u64) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[XSAVE_XCR0_OFFSET..XSAVE_XCR0_OFFSET + 8].copy_from_slice(&xcr0.to_ne_bytes());
        b[XSAVE_XSTATE_BV_OFFSET..XSAVE_XSTATE_BV_OFFSET + 8].copy_from_slice(&bv.to_ne_bytes());
        b
    }

    #[test]
    fn xsave_compatibility() {
        let avx512 = 0xe7; // x87 SSE AVX opmask ZMM_Hi256 Hi16_ZMM
        let here = xsave(2696, avx512, 0);
        check_xsave(&xsave(2696, avx512, avx512), &here).unwrap();
        check_xsave(&[], &here).unwrap();
        // Used AVX-512 state on a machine without it.
        let e = check_xsave(&xsave(2696, avx512, avx512), &xsave(832, 0x7, 0)).unwrap_err();
        assert!(format!("{e:#}").contains("0xe0"), "{e:#}");
        // Same components in use, different layout.
        let e = check_xsave(&xsave(2696, avx512, 0x3), &xsave(2440, avx512, 0)).unwrap_err();
        assert!(format!("{e:#}").contains("2696"), "{e:#}");
        assert!(check_xsave(&[0u8; 100], &here).is_err());
    }

    #[test]
    fn restart_block_becomes_eintr() {
        let mut g = pb::GpRegs {
            orig_rax: 35,
            rax: (-516i64) as u64,
            rip: 0x1000,
            ..Default::default()
        };
        assert_eq!(resume_regs(&g).rax as i64, -4);
        assert_eq!(resume_regs(&g).rip, 0x1000);
        g.rax = (-512i64) as u64; // ERESTARTSYS: left to the kernel
        assert_eq!(resume_regs(&g).rax as i64, -512);
        g.orig_rax = u64::MAX; // not in a syscall: rax is just a value
        g.rax = (-516i64) as u64;
        assert_eq!(resume_regs(&g).rax as i64, -516);
    }

    #[test]
    fn interim_securebits_keep_caps_and_allow_ambient() {
        assert_eq!(interim_securebits(0), SECBIT_KEEP_CAPS);
        assert_eq!(
            interim_securebits(SECBIT_KEEP_CAPS_LOCKED),
            SECBIT_KEEP_CAPS
        );
        assert_eq!(
            interim_securebits(SECBIT_NO_CAP_AMBIENT_RAISE | 1),
            SECBIT_KEEP_CAPS | 1
        );
    }
}
