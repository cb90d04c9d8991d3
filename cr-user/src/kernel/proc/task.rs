//! Per-process facts that are one small file or link each: threads, children, exe/cwd/root,
//! comm, personality, timer slack, and the kernel release.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{parse_dec, parse_hex, pid_path, read_text};

/// Parses a list of whitespace-separated pids (the `children` file format).
pub fn parse_pid_list(text: &str) -> Result<Vec<i32>> {
    text.split_ascii_whitespace()
        .map(|s| parse_dec(s, "pid"))
        .collect()
}

/// Parses `/proc/PID/personality` (hex, e.g. `00400000` for READ_IMPLIES_EXEC).
pub fn parse_personality(text: &str) -> Result<u32> {
    let v = parse_hex(text, "personality")?;
    u32::try_from(v).with_context(|| format!("personality out of range: {text:?}"))
}

/// The thread ids of a process (`/proc/PID/task`), sorted; the leader is among them.
pub fn threads(pid: i32) -> Result<Vec<i32>> {
    let dir = pid_path(pid, "task");
    let rd = std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))?;
    let mut tids = Vec::new();
    for ent in rd {
        let ent = ent.with_context(|| format!("read {}", dir.display()))?;
        if let Some(tid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// The children of a process: the union of `/proc/PID/task/TID/children` over its threads
/// (a child belongs to the thread that forked it), sorted and deduplicated. A thread that
/// exits while being listed is skipped.
pub fn children(pid: i32) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for tid in threads(pid)? {
        let path = pid_path(pid, &format!("task/{tid}/children"));
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                out.extend(parse_pid_list(&t).with_context(|| format!("parse {}", path.display()))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// `root` and its descendants as they are now, parents before children. `visit` sees each
/// process before its children are listed, so a child forked meanwhile is caught one way or
/// the other (by the listing, or as a descendant of a visited process the caller follows).
/// A process that exits meanwhile is skipped; a failure to list the root's children, or of
/// `visit`, is the error.
pub fn walk_tree(root: i32, mut visit: impl FnMut(i32) -> Result<()>) -> Result<Vec<i32>> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        visit(p)?;
        match children(p) {
            Ok(kids) => {
                for k in kids {
                    if !out.contains(&k) {
                        out.push(k);
                    }
                }
            }
            Err(e) if p == root => {
                return Err(e).with_context(|| format!("the children of PID {root}"))
            }
            Err(_) => {} // exited meanwhile
        }
        i += 1;
    }
    Ok(out)
}

/// `root` and its descendants now (just `root` if its children cannot be listed).
pub fn descendants(root: i32) -> Vec<i32> {
    walk_tree(root, |_| Ok(())).unwrap_or_else(|_| vec![root])
}

/// True while `/proc/PID` exists (zombies included; a thread id also counts).
pub fn exists(pid: i32) -> bool {
    pid > 0 && pid_path(pid, "").exists()
}

/// True for kernel threads (PF_KTHREAD in stat's flags), which cannot be dumped.
pub fn is_kernel_thread(pid: i32) -> Result<bool> {
    Ok(super::stat::read_stat(pid)?.is_kernel_thread())
}

fn link(pid: i32, name: &str) -> Result<PathBuf> {
    let p = pid_path(pid, name);
    std::fs::read_link(&p).with_context(|| format!("readlink {}", p.display()))
}

/// `/proc/PID/exe` target (with " (deleted)" if the binary was unlinked).
pub fn exe(pid: i32) -> Result<PathBuf> {
    link(pid, "exe")
}

/// `/proc/PID/cwd` target.
pub fn cwd(pid: i32) -> Result<PathBuf> {
    link(pid, "cwd")
}

/// `/proc/PID/root` target.
pub fn root(pid: i32) -> Result<PathBuf> {
    link(pid, "root")
}

/// `/proc/PID/comm` without the trailing newline (raw bytes of the name, as set by
/// PR_SET_NAME; at most 15 bytes).
pub fn comm(pid: i32) -> Result<String> {
    let mut s = read_text(&pid_path(pid, "comm"))?;
    if s.ends_with('\n') {
        s.pop();
    }
    Ok(s)
}

/// `/proc/PID/task/TID/comm` (threads have their own names).
pub fn task_comm(pid: i32, tid: i32) -> Result<String> {
    let mut s = read_text(&pid_path(pid, &format!("task/{tid}/comm")))?;
    if s.ends_with('\n') {
        s.pop();
    }
    Ok(s)
}

/// The persona flags (personality(2)) from `/proc/PID/personality`.
pub fn personality(pid: i32) -> Result<u32> {
    let p = pid_path(pid, "personality");
    parse_personality(&read_text(&p)?).with_context(|| format!("parse {}", p.display()))
}

/// `/proc/PID/timerslack_ns`.
pub fn timerslack_ns(pid: i32) -> Result<u64> {
    let p = pid_path(pid, "timerslack_ns");
    parse_dec(&read_text(&p)?, "timerslack_ns").with_context(|| format!("parse {}", p.display()))
}

/// The running kernel's release (`/proc/sys/kernel/osrelease`), recorded in the inventory.
pub fn kernel_release() -> Result<String> {
    Ok(read_text("/proc/sys/kernel/osrelease".as_ref())?
        .trim_end()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(parse_pid_list("12 13 400 \n").unwrap(), vec![12, 13, 400]);
        assert!(parse_pid_list("").unwrap().is_empty());
        assert!(parse_pid_list("1 x").is_err());
        assert_eq!(parse_personality("00400000\n").unwrap(), 0x0040_0000);
        assert_eq!(parse_personality("00000000").unwrap(), 0);
        assert!(parse_personality("zz").is_err());
        assert!(parse_personality("1ffffffff").is_err());
    }

    /// A child we fork shows up in children(); a thread we start shows up in threads().
    #[test]
    fn live_self() {
        let me = std::process::id() as i32;
        assert!(exists(me));
        assert!(!exists(i32::MAX));
        assert!(!is_kernel_thread(me).unwrap());
        assert_eq!(exe(me).unwrap(), std::env::current_exe().unwrap());
        assert_eq!(cwd(me).unwrap(), std::env::current_dir().unwrap());
        assert_eq!(root(me).unwrap(), PathBuf::from("/"));
        assert!(!comm(me).unwrap().is_empty());
        assert!(!comm(me).unwrap().ends_with('\n'));
        assert!(timerslack_ns(me).unwrap() > 0);
        // SAFETY: personality(0xffffffff) only queries.
        let pers = unsafe { libc::personality(0xffff_ffff) } as u32;
        assert_eq!(personality(me).unwrap(), pers);
        assert!(kernel_release()
            .unwrap()
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit()));

        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<i32>();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            ready_tx.send(unsafe { libc::gettid() }).unwrap();
            rx.recv().ok();
        });
        let tid = ready_rx.recv().unwrap();
        let t = threads(me).unwrap();
        assert!(t.contains(&me) && t.contains(&tid), "{t:?}");
        assert_eq!(task_comm(me, me).unwrap(), comm(me).unwrap());

        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let cpid = child.id() as i32;
        let kids = children(me).unwrap();
        child.kill().ok();
        child.wait().ok();
        tx.send(()).unwrap();
        h.join().unwrap();
        assert!(kids.contains(&cpid), "{kids:?} lacks {cpid}");
    }
}
