//! The process tree of a dump: finding every process and thread under the root, freezing all of
//! them, and the tree-wide facts (sessions, groups, zombies, shared files and memory).
//!
//! [`seize`] walks `/proc/PID/task/*/children` from the root and seizes every thread of every
//! process it finds, then walks again: a task that was still running while others were being
//! seized may have forked or started a thread. Once a whole pass finds nothing new, every task
//! of the tree is stopped and nothing can change any more. Zombies cannot be seized (they have
//! no user state left); they are recorded with their exit status and restored as zombies.

use std::collections::HashSet;

use anyhow::{bail, Context, Result};

use crate::refuse;

use crate::image::pb;
use crate::kernel::proc;
use crate::kernel::ptrace::Tracee;
use crate::kernel::sys::kcmp::{self, Kcmp};
use crate::kernel::sys::process;

/// One process of the frozen tree.
pub struct Proc {
    pub pid: i32,
    pub stat: proc::stat::Stat,
    /// Its threads, the main thread first (empty for a zombie).
    pub threads: Vec<Tracee>,
    pub zombie: bool,
}

/// The frozen tree, root first, every parent before its children.
pub struct Tree {
    pub procs: Vec<Proc>,
}

impl Tree {
    pub fn root(&self) -> &Proc {
        &self.procs[0]
    }

    pub fn pids(&self) -> HashSet<i32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    /// Lets every task run on (dump -R, or an error: dropping does the same).
    pub fn detach(self) -> Result<()> {
        let mut first_err = None;
        for p in self.procs {
            for t in p.threads {
                if let Err(e) = t.detach() {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills every process of the tree (SIGKILL to each, while all are stopped), then collects
    /// each traced thread's death.
    pub fn kill(self) -> Result<()> {
        for p in &self.procs {
            if p.zombie {
                continue;
            }
            if let Err(e) = process::kill(p.pid, libc::SIGKILL) {
                log::warn!("kill({}, SIGKILL): {e}", p.pid);
            }
        }
        // Other threads first: the main thread's death is reported only once the rest of its
        // group is gone.
        for p in self.procs {
            for t in p.threads.into_iter().rev() {
                t.reap_killed();
            }
        }
        Ok(())
    }

    /// The entries of pstree.img, in tree order.
    pub fn pstree(&self) -> pb::PsTree {
        pb::PsTree {
            tasks: self
                .procs
                .iter()
                .map(|p| pb::PsTreeEntry {
                    pid: p.pid,
                    ppid: p.stat.ppid,
                    pgid: p.stat.pgrp,
                    sid: p.stat.session,
                    threads: if p.zombie {
                        vec![p.pid]
                    } else {
                        p.threads.iter().map(|t| t.tid).collect()
                    },
                    zombie: p.zombie,
                    exit_status: if p.zombie { p.stat.exit_code } else { 0 },
                })
                .collect(),
        }
    }
}

/// Seizes a thread; None if it is already gone (it exited while the tree was walked).
fn seize_thread(pid: i32, tid: i32) -> Result<Option<Tracee>> {
    match Tracee::seize(pid, tid) {
        Ok(t) => Ok(Some(t)),
        Err(e) => {
            if !proc::task::exists(tid)
                || std::fs::metadata(format!("/proc/{pid}/task/{tid}")).is_err()
            {
                log::debug!("task {tid} of PID {pid} exited before it could be seized");
                return Ok(None);
            }
            Err(e).with_context(|| format!("freezing thread {tid} of PID {pid}"))
        }
    }
}

fn is_zombie(stat: &proc::stat::Stat) -> bool {
    matches!(stat.state, 'Z' | 'X')
}

/// What [`freeze_process`] found.
enum Freeze {
    /// Every thread is seized (true: some were new).
    Done(bool),
    /// The process exited and is a zombie now.
    Zombie,
    /// The process exited and was reaped.
    Gone,
}

/// Where a process that could not be frozen went (`root` must not go anywhere).
fn vanished(pid: i32, root: i32, e: anyhow::Error) -> Result<Freeze> {
    if pid == root {
        return Err(e).with_context(|| format!("freezing PID {root}"));
    }
    match proc::stat::read_stat(pid) {
        Ok(st) if is_zombie(&st) => Ok(Freeze::Zombie),
        Ok(_) => Err(e),
        Err(_) if !proc::task::exists(pid) => Ok(Freeze::Gone),
        Err(_) => Err(e),
    }
}

/// Seizes every thread of `p` not seized yet, the main thread first.
fn freeze_process(p: &mut Proc, root: i32) -> Result<Freeze> {
    let tids = match proc::task::threads(p.pid) {
        Ok(t) => t,
        Err(e) => return vanished(p.pid, root, e),
    };
    let known: HashSet<i32> = p.threads.iter().map(|t| t.tid).collect();
    // The main thread first: it is the one the per-process work runs in.
    let mut order: Vec<i32> = tids
        .iter()
        .copied()
        .filter(|t| !known.contains(t))
        .collect();
    order.sort_by_key(|&t| (t != p.pid, t));
    let mut changed = false;
    for tid in order {
        if tid == p.pid {
            let st = match proc::stat::read_task_stat(p.pid, tid) {
                Ok(st) => st,
                Err(e) => return vanished(p.pid, root, e),
            };
            if is_zombie(&st) {
                if tids.len() == 1 {
                    return vanished(p.pid, root, anyhow::anyhow!("PID {} exited", p.pid));
                }
                refuse!(
                    None,
                    "the main thread of PID {} ({}) has exited while its other threads run on: not supported",
                    p.pid,
                    p.stat.comm
                );
            }
        }
        let seized = match seize_thread(p.pid, tid) {
            Err(e) if tid == p.pid => return vanished(p.pid, root, e),
            r => r?,
        };
        if let Some(t) = seized {
            if tid == p.pid {
                p.threads.insert(0, t);
            } else {
                p.threads.push(t);
            }
            changed = true;
        }
    }
    if p.threads.first().map(|t| t.tid) != Some(p.pid) {
        return vanished(
            p.pid,
            root,
            anyhow::anyhow!("PID {} exited while the tree was being frozen", p.pid),
        );
    }
    Ok(Freeze::Done(changed))
}

/// Whether process `p` shares its memory with its parent: a vfork child that has not called
/// exec or exit yet (its parent waits for that in the kernel).
fn in_vfork(p: &Proc) -> bool {
    !p.zombie && kcmp::shares(p.stat.ppid, p.pid, Kcmp::Vm)
}

/// Finds and freezes the whole tree under `root` (which passed [`super::target::check_root`]).
/// On error every task seized so far is let go (the returned error drops them).
///
/// A vfork child caught before its exec shares its parent's memory; it will exec or exit in a
/// moment, so the tree is let go and frozen again (a shell forking commands hits this).
pub fn seize(root: i32) -> Result<Tree> {
    let mut tries = 0;
    loop {
        let tree = seize_once(root)?;
        match tree.procs.iter().skip(1).find(|p| in_vfork(p)) {
            None => return Ok(tree),
            Some(p) => {
                tries += 1;
                let (pid, ppid) = (p.pid, p.stat.ppid);
                if tries >= 100 {
                    refuse!(None, "PID {pid} stays a vfork child of {ppid} (sharing its memory, before exec): cannot be dumped");
                }
                log::debug!(
                    "PID {pid} is a vfork child of {ppid} before its exec: freezing the tree again"
                );
                tree.detach()?;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

fn seize_once(root: i32) -> Result<Tree> {
    let mut tree = Tree { procs: Vec::new() };
    let stat =
        proc::stat::read_stat(root).with_context(|| format!("reading the state of PID {root}"))?;
    tree.procs.push(Proc {
        pid: root,
        stat,
        threads: Vec::new(),
        zombie: false,
    });
    let mut passes = 0;
    loop {
        passes += 1;
        crate::kernel::interrupt::check()?;
        let mut changed = false;
        // Every thread of every live process. A child that exits meanwhile is dropped (or
        // kept as the zombie it became); the walk then goes on.
        let mut gone = Vec::new();
        for p in tree.procs.iter_mut().filter(|p| !p.zombie) {
            match freeze_process(p, root)? {
                Freeze::Done(c) => changed |= c,
                Freeze::Zombie => {
                    log::debug!(
                        "PID {} exited while the tree was being frozen: a zombie now",
                        p.pid
                    );
                    for t in std::mem::take(&mut p.threads) {
                        t.forget();
                    }
                    p.zombie = true;
                    changed = true;
                }
                Freeze::Gone => {
                    log::debug!("PID {} exited while the tree was being frozen", p.pid);
                    gone.push(p.pid);
                    changed = true;
                }
            }
        }
        tree.procs.retain(|p| !gone.contains(&p.pid));
        // New children of any process.
        let known: HashSet<i32> = tree.pids();
        let mut found = Vec::new();
        for p in tree.procs.iter().filter(|p| !p.zombie) {
            let children = proc::task::children(p.pid)
                .with_context(|| format!("listing the children of PID {}", p.pid))?;
            for c in children {
                if !known.contains(&c) && !found.contains(&c) {
                    found.push(c);
                }
            }
        }
        for c in found {
            let stat = match proc::stat::read_stat(c) {
                Ok(s) => s,
                Err(_) if !proc::task::exists(c) => continue,
                Err(e) => return Err(e).with_context(|| format!("reading the state of PID {c}")),
            };
            let zombie = is_zombie(&stat);
            log::debug!(
                "PID {c} ({}) is a child of {}{}",
                stat.comm,
                stat.ppid,
                if zombie { " (zombie)" } else { "" }
            );
            tree.procs.push(Proc {
                pid: c,
                stat,
                threads: Vec::new(),
                zombie,
            });
            changed = true;
        }
        if !changed {
            break;
        }
    }
    // The state of each process as it is now, frozen (a group or session may have changed
    // while the walk went on).
    // A zombie may have been reaped by its parent before that was frozen: gone.
    tree.procs
        .retain(|p| !p.zombie || proc::task::exists(p.pid));
    for p in tree.procs.iter_mut() {
        p.stat = proc::stat::read_stat(p.pid)
            .with_context(|| format!("reading the state of PID {}", p.pid))?;
    }
    order_tree(&mut tree.procs);
    log::info!(
        "tree of PID {root}: {} processes, {} threads, {} zombies ({passes} passes)",
        tree.procs.len(),
        tree.procs.iter().map(|p| p.threads.len()).sum::<usize>(),
        tree.procs.iter().filter(|p| p.zombie).count()
    );
    Ok(tree)
}

/// Sorts the processes breadth-first from the root (parents before children, siblings by pid):
/// the order restore creates them in.
fn order_tree(procs: &mut Vec<Proc>) {
    let mut rest: Vec<Proc> = procs.drain(1..).collect();
    rest.sort_by_key(|p| p.pid);
    let mut i = 0;
    while i < procs.len() {
        let parent = procs[i].pid;
        let mut j = 0;
        while j < rest.len() {
            if rest[j].stat.ppid == parent {
                procs.push(rest.remove(j));
            } else {
                j += 1;
            }
        }
        i += 1;
    }
    // A process whose parent left the tree while it was walked: [`check`] refuses it.
    procs.extend(rest);
}

/// Refuses, naming the process and the flag, what a tree dump cannot restore: a session or
/// terminal outside the tree without --shell-job, a group whose leader is outside the tree.
pub fn check(tree: &Tree, shell_job: bool) -> Result<()> {
    let pids = tree.pids();
    let root = tree.root();
    for p in &tree.procs[1..] {
        if !pids.contains(&p.stat.ppid) {
            bail!("PID {} ({}) left the tree while it was being frozen (its parent is now {}); try again", p.pid, p.stat.comm, p.stat.ppid);
        }
    }
    for p in tree.procs.iter().skip(1).filter(|p| !p.zombie) {
        // clone() without CLONE_THREAD but with CLONE_VM (a vfork child before its exec),
        // CLONE_FILES, CLONE_FS or CLONE_SIGHAND: a sharing cr does not recreate.
        for (kind, what) in [
            (Kcmp::Vm, "its memory"),
            (Kcmp::Files, "its fd table"),
            (Kcmp::Fs, "its cwd/root/umask"),
            (Kcmp::Sighand, "its signal handlers"),
        ] {
            if kcmp::shares(p.stat.ppid, p.pid, kind) {
                refuse!(
                    None,
                    "PID {} ({}) shares {what} with its parent {} (clone without CLONE_THREAD, or a vfork child): not supported",
                    p.pid,
                    p.stat.comm,
                    p.stat.ppid
                );
            }
        }
    }
    for p in &tree.procs {
        if !shell_job && p.stat.tty_nr != 0 && !p.zombie {
            refuse!(
                "--shell-job",
                "PID {} ({}) has a controlling terminal (tty {}:{}); dump it with --shell-job (-j)",
                p.pid,
                p.stat.comm,
                (p.stat.tty_nr >> 8) & 0xfff,
                (p.stat.tty_nr & 0xff) | ((p.stat.tty_nr >> 12) & 0xfff00)
            );
        }
        if !pids.contains(&p.stat.session) && p.stat.session != root.stat.session {
            refuse!(
                None,
                "PID {} ({}) is in session {}, which is neither the session of the root nor led by a process of the tree",
                p.pid,
                p.stat.comm,
                p.stat.session
            );
        }
        if !pids.contains(&p.stat.pgrp) && p.stat.pgrp != root.stat.pgrp {
            refuse!(
                None,
                "PID {} ({}) is in process group {}, whose leader is outside the dumped tree: not supported",
                p.pid,
                p.stat.comm,
                p.stat.pgrp
            );
        }
    }
    if !shell_job && !pids.contains(&root.stat.session) {
        refuse!(
            "--shell-job",
            "the session leader of PID {} ({}) is PID {}, outside the dumped tree; dump it with --shell-job (-j), or dump the session leader",
            root.pid,
            root.stat.comm,
            root.stat.session
        );
    }
    Ok(())
}
