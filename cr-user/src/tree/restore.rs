//! Creating the process tree: every process at its PID, under its original parent, in its
//! session and process group; zombies made zombies again.
//!
//! The root is made by cr ([`super::spawn::spawn_at`]); every other process is made from inside
//! its parent, by a clone3(set_tid = [pid]) cr injects there, so that parentage, and with it
//! the inherited session, comes out right. A traced task that forks reports
//! PTRACE_EVENT_FORK and its child is attached to cr from its first instant, stopped before
//! it runs a single instruction: it is a copy of its parent, which is still a clean copy of
//! cr, and is rebuilt later like the root.
//!
//! Order (as in CRIU's restore of sids and pgids):
//! 1. Parents before children. A session leader calls setsid() before it makes its children,
//!    so they inherit the session; any other process must be in its parent's session.
//! 2. Process group leaders call setpgid(0, 0), then the members join their group.
//! 3. Zombies exit with their status (exit_group, or their fatal signal). Their parent has
//!    every signal blocked, so the SIGCHLD stays pending; it is dequeued when the parent is
//!    rebuilt ([`dequeue_sigchld`]), and the parent's own pending signals from the image are
//!    queued after that.
//!
//! With --shell-job the tree joins cr's session and group instead of the ones it had
//! (CRIU's rule: the root's session and group, wherever they appear, become cr's).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::pb;
use crate::kernel::ptrace::{self, raw, Remote, Tracee};
use crate::logging::TaskScope;

use super::spawn;

/// Checks the tree's shape, sessions and groups, and applies the --shell-job mapping. `shell`
/// is cr's (sid, pgid) when restoring a shell job. Returns the entries to restore, in the
/// image's order (parents before children).
pub fn plan_sessions(
    entries: &[pb::PsTreeEntry],
    shell: Option<(i32, i32)>,
) -> Result<Vec<pb::PsTreeEntry>> {
    let Some(root) = entries.first() else {
        bail!("pstree.img holds no process")
    };
    let mut out: Vec<pb::PsTreeEntry> = entries.to_vec();
    if let Some((sid, pgid)) = shell {
        let (old_sid, old_pgid) = (root.sid, root.pgid);
        for e in out.iter_mut() {
            if e.sid == old_sid {
                e.sid = sid;
            }
            if e.pgid == old_pgid {
                e.pgid = pgid;
            }
        }
    }
    let mut seen: HashMap<i32, usize> = HashMap::new();
    for (i, e) in out.iter().enumerate() {
        if seen.insert(e.pid, i).is_some() {
            bail!("pstree.img lists PID {} twice", e.pid);
        }
        if !e.zombie && e.threads.first() != Some(&e.pid) {
            bail!(
                "pstree.img: the first thread of PID {} is not its main thread",
                e.pid
            );
        }
    }
    let root = &out[0];
    if root.sid != root.pid && shell.map(|s| s.0) != Some(root.sid) {
        crate::refuse!(
            "--shell-job",
            "the session of PID {} is led by PID {}, outside the image (dumped with --shell-job?): restore with --shell-job (-j)",
            root.pid,
            root.sid
        );
    }
    for (i, e) in out.iter().enumerate().skip(1) {
        let Some(&pi) = seen.get(&e.ppid) else {
            bail!("the parent {} of PID {} is not in the image", e.ppid, e.pid);
        };
        if pi >= i {
            bail!(
                "pstree.img lists PID {} before its parent {}",
                e.pid,
                e.ppid
            );
        }
        if out[pi].zombie {
            bail!("PID {} has the zombie {} as its parent", e.pid, e.ppid);
        }
        if e.sid != e.pid && e.sid != out[pi].sid {
            crate::refuse!(
                None,
                "PID {} is in session {}, but its parent {} is in session {}: a session it did not inherit is not supported",
                e.pid,
                e.sid,
                e.ppid,
                out[pi].sid
            );
        }
    }
    for e in &out {
        if e.pgid == e.pid {
            continue;
        }
        let ok = match seen.get(&e.pgid) {
            Some(&li) => out[li].pgid == e.pgid && out[li].sid == e.sid,
            None => shell.is_some_and(|(sid, pgid)| e.pgid == pgid && e.sid == sid),
        };
        if !ok {
            crate::refuse!(None, "PID {} is in process group {}, which has no leader in its session in the image: not supported", e.pid, e.pgid);
        }
    }
    Ok(out)
}

/// The `syscall` instruction of a task that is still a copy of cr (its vDSO is cr's).
fn clean_copy_syscall_ip(pid: i32) -> Result<u64> {
    let cur = crate::kernel::proc::maps::read_maps(pid)?;
    let vdso = cur
        .iter()
        .find(|v| v.name == crate::kernel::proc::maps::VmaName::Vdso)
        .context(
            "the new task has no vDSO (booted with vdso=0?): cr needs it for remote syscalls",
        )?;
    ptrace::locate_syscall(pid, vdso.start, vdso.end)
}

/// Makes process `pid` as a child of the process `parent` (a clean copy of cr), stopped and
/// traced. A PID still held by a dying process is waited for, up to `wait`.
fn fork_child(parent: &mut Tracee, pid: i32, wait: Duration) -> Result<Tracee> {
    let ppid = parent.tgid;
    let ip = clean_copy_syscall_ip(ppid)?;
    let deadline = Instant::now() + wait;
    loop {
        let mut r = Remote::new(parent, ip)?;
        let scratch = r.scratch(4096)?.addr;
        let res =
            crate::kernel::ptrace::inject::clone3(&mut r, scratch, 0, libc::SIGCHLD as u64, pid);
        r.finish()?;
        let res = res?;
        if res == -(libc::EEXIST as i64) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res as i32);
            if res == -(libc::EEXIST as i64) {
                bail!("PID {pid} is taken by another process; cr restores a process at its original PID, so that process must exit first");
            }
            return Err(e).with_context(|| format!("remote clone3(set_tid={pid}) in PID {ppid}"));
        }
        let made = parent.new_tasks.pop();
        if res != pid as i64 || made != Some(pid) {
            bail!("clone3 in PID {ppid} made task {res} (event for {made:?}), not {pid}");
        }
        log::debug!("PID {pid} created by its parent {ppid}");
        return Tracee::adopt_new_task(pid, pid)
            .with_context(|| format!("taking the new process {pid}"));
    }
}

/// One remote syscall in a task that is still a clean copy of cr (a short-lived Remote with
/// its own scratch page).
fn clean_copy_syscall(t: &mut Tracee, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
    let ip = clean_copy_syscall_ip(t.tgid)?;
    let mut r = Remote::new(t, ip)?;
    let res = r.syscall(what, nr, args);
    r.finish()?;
    res
}

/// The processes of the tree, created: a stopped, traced main thread for every live process
/// (zombies are zombies already), by PID.
pub struct Created {
    pub tasks: HashMap<i32, Tracee>,
    /// Processes that got a SIGCHLD from a zombie child made during restore.
    pub zombie_parents: HashSet<i32>,
}

/// Steps 1–3 of the module docs. On error every task made so far is killed (dropping the
/// tracees).
pub fn create(entries: &[pb::PsTreeEntry], pid_wait: Duration) -> Result<Created> {
    let root = &entries[0];
    let mut tasks: HashMap<i32, Tracee> = HashMap::new();
    {
        let _scope = TaskScope::enter(root.pid);
        let t = spawn::spawn_at(root.pid, pid_wait)?;
        // Nothing may run a handler mid-restore, and a zombie's SIGCHLD must stay pending.
        t.set_sigmask(!0)?;
        tasks.insert(root.pid, t);
    }
    for e in entries {
        let _scope = TaskScope::enter(e.pid);
        let t = tasks
            .get_mut(&e.pid)
            .context("internal: a process was not created")?;
        if e.sid == e.pid {
            clean_copy_syscall(t, "setsid", libc::SYS_setsid, &[])
                .with_context(|| format!("make PID {} a session leader", e.pid))?;
        }
        for c in entries.iter().filter(|c| c.ppid == e.pid) {
            let _child_scope = TaskScope::enter(c.pid);
            let t = tasks
                .get_mut(&e.pid)
                .context("internal: a process was not created")?;
            let child = fork_child(t, c.pid, pid_wait)?;
            tasks.insert(c.pid, child);
        }
    }
    // Group leaders, then members.
    for e in entries.iter().filter(|e| e.pgid == e.pid && e.sid != e.pid) {
        let _scope = TaskScope::enter(e.pid);
        let t = tasks
            .get_mut(&e.pid)
            .context("internal: a process was not created")?;
        clean_copy_syscall(t, "setpgid(0, 0)", libc::SYS_setpgid, &[0, 0])
            .with_context(|| format!("make PID {} a group leader", e.pid))?;
    }
    for e in entries.iter().filter(|e| e.pgid != e.pid) {
        let _scope = TaskScope::enter(e.pid);
        let now = crate::kernel::proc::stat::read_stat(e.pid)?.pgrp;
        if now == e.pgid {
            continue;
        }
        let t = tasks
            .get_mut(&e.pid)
            .context("internal: a process was not created")?;
        clean_copy_syscall(t, "setpgid", libc::SYS_setpgid, &[0, e.pgid as u64])
            .with_context(|| format!("move PID {} into group {}", e.pid, e.pgid))?;
    }
    for e in entries {
        let st = crate::kernel::proc::stat::read_stat(e.pid)?;
        if (st.session, st.pgrp) != (e.sid, e.pgid) {
            bail!(
                "PID {} came out in session {} group {}, not {} {}",
                e.pid,
                st.session,
                st.pgrp,
                e.sid,
                e.pgid
            );
        }
    }
    let mut zombie_parents = HashSet::new();
    for e in entries.iter().filter(|e| e.zombie) {
        let _scope = TaskScope::enter(e.pid);
        let t = tasks
            .remove(&e.pid)
            .context("internal: a zombie was not created")?;
        make_zombie(t, e.exit_status)
            .with_context(|| format!("making PID {} a zombie again", e.pid))?;
        zombie_parents.insert(e.ppid);
    }
    Ok(Created {
        tasks,
        zombie_parents,
    })
}

/// Ends task `t` (a clean copy of cr, never run) with the wait status `status` it had: an
/// exit code, or a fatal signal. cr, its tracer, collects the death; the kernel then hands the
/// zombie to its real parent with a SIGCHLD.
fn make_zombie(mut t: Tracee, status: i32) -> Result<()> {
    let pid = t.tid;
    let sig = status & 0x7f;
    if sig == 0 {
        let code = (status >> 8) & 0xff;
        let ip = clean_copy_syscall_ip(pid)?;
        let mut regs = t.regs()?;
        regs.rip = ip;
        regs.rax = libc::SYS_exit_group as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = code as u64;
        t.set_regs(&regs)?;
        raw::cont(pid, 0).with_context(|| format!("resume PID {pid} into exit_group({code})"))?;
        loop {
            match raw::wait(pid)? {
                raw::Wait::Exited(c) if c == code => break,
                raw::Wait::Stopped(s, _) => raw::cont(
                    pid,
                    if s == libc::SIGSTOP || s == libc::SIGTRAP {
                        0
                    } else {
                        s
                    },
                )?,
                other => {
                    t.forget();
                    bail!("PID {pid} ended with {other:?}, not exit code {code}");
                }
            }
        }
        log::info!("PID {pid} is a zombie again (exit code {code})");
    } else {
        // The signal's default action, no core file: the kernel ends the task with it.
        let ip = clean_copy_syscall_ip(pid)?;
        {
            let mut r = Remote::new(&mut t, ip)?;
            let scratch = r.scratch(4096)?.addr;
            r.write_mem(scratch, &[0u8; 32])?;
            r.syscall(
                "rt_sigaction(SIG_DFL)",
                libc::SYS_rt_sigaction,
                &[sig as u64, scratch, 0, 8],
            )?;
            r.syscall(
                "prlimit64(RLIMIT_CORE, 0)",
                libc::SYS_prlimit64,
                &[0, libc::RLIMIT_CORE as u64, scratch, 0],
            )?;
            r.finish()?;
        }
        t.set_sigmask(0)?;
        raw::tgkill(pid, pid, sig).with_context(|| format!("send signal {sig} to PID {pid}"))?;
        raw::cont(pid, 0)?;
        loop {
            match raw::wait(pid)? {
                raw::Wait::Signaled(s) if s == sig => break,
                raw::Wait::Stopped(s, 0) if s == sig => raw::cont(pid, s)?,
                raw::Wait::Stopped(..) => raw::cont(pid, 0)?,
                other => {
                    t.forget();
                    bail!("PID {pid} ended with {other:?}, not signal {sig}");
                }
            }
        }
        log::info!("PID {pid} is a zombie again (killed by signal {sig})");
    }
    t.forget();
    Ok(())
}

/// Takes back the SIGCHLD a zombie child sent while the tree was made (the parent has every
/// signal blocked, so it is pending), before the parent's own pending signals are queued.
pub fn dequeue_sigchld(r: &mut Remote, scratch: u64) -> Result<()> {
    let set: u64 = 1 << (libc::SIGCHLD - 1);
    r.write_mem(scratch, &set.to_ne_bytes())?;
    r.write_mem(scratch + 8, &[0u8; 16])?;
    let got = r.raw_syscall(libc::SYS_rt_sigtimedwait, &[scratch, 0, scratch + 8, 8])?;
    if got != libc::SIGCHLD as i64 {
        log::debug!("task {}: no SIGCHLD to take back ({got})", r.t.tid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(pid: i32, ppid: i32, pgid: i32, sid: i32) -> pb::PsTreeEntry {
        pb::PsTreeEntry {
            pid,
            ppid,
            pgid,
            sid,
            threads: vec![pid],
            zombie: false,
            exit_status: 0,
        }
    }

    #[test]
    fn sessions_and_groups() {
        // A session leader, a child in its own group, a grandchild in the child's group, a
        // child that leads a session of its own.
        let tree = vec![
            e(10, 1, 10, 10),
            e(11, 10, 11, 10),
            e(13, 10, 13, 13),
            e(12, 11, 11, 10),
        ];
        assert_eq!(plan_sessions(&tree, None).unwrap(), tree);
        // A group whose leader is in another session.
        let bad = vec![e(10, 1, 10, 10), e(13, 10, 13, 13), e(14, 13, 10, 13)];
        assert!(format!("{:#}", plan_sessions(&bad, None).unwrap_err()).contains("group 10"));
        // A session the child cannot have inherited.
        let bad = vec![e(10, 1, 10, 10), e(11, 10, 11, 11), e(12, 11, 10, 10)];
        assert!(plan_sessions(&bad, None).is_err());
        // Children listed before their parent.
        let bad = vec![e(10, 1, 10, 10), e(12, 11, 10, 10), e(11, 10, 10, 10)];
        assert!(plan_sessions(&bad, None).is_err());
    }

    #[test]
    fn shell_job_joins_crs_session() {
        // `sleep` started by an interactive shell 5: its own group, the shell's session.
        let tree = vec![e(20, 5, 20, 5), e(21, 20, 20, 5)];
        let err = plan_sessions(&tree, None).unwrap_err();
        assert!(format!("{err:#}").contains("--shell-job"), "{err:#}");
        let got = plan_sessions(&tree, Some((100, 101))).unwrap();
        assert_eq!(got, vec![e(20, 5, 101, 100), e(21, 20, 101, 100)]);
        // A session leader dumped with -j (it had a terminal) joins cr's session too.
        let got = plan_sessions(&[e(30, 1, 30, 30)], Some((100, 101))).unwrap();
        assert_eq!(got, vec![e(30, 1, 101, 100)]);
    }
}
