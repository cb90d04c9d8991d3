//! File locks held by the tree (`--file-locks`): found, refused or saved in `locks.img`.
//!
//! Restore must make the same owner take each lock again: flock and OFD locks belong to an open
//! file description (saved with one fd and its file id), POSIX locks to a process and a file
//! (saved with the fd they were taken through). The survey reads every fd's fdinfo `lock:` lines
//! and cross-checks `/proc/locks` (a lock no fd of the tree shows cannot be re-taken: refused);
//! with a tracker, its lock table replaces that ([`survey_tree`]) and only the locked inodes' fds
//! are read. Without `--file-locks` a tree holding any lock is refused, naming each lock.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::image::pb;
use crate::kernel::proc;
use crate::kernel::proc::locks::{FileLock, LockAccess, LockKind, LockMode};
use crate::refusal::Refusal;
use crate::tracker::client::{self, TrackerConn};
use crate::tracker::locks::{InodeId, SeedSet, TableKind, TableLock, TableView};

/// One lock as seen through one fd of one process.
#[derive(Debug, Clone)]
pub struct Held {
    pub pid: i32,
    pub fd: i32,
    /// The fd's link target (for messages and the image).
    pub path: String,
    pub lock: FileLock,
}

impl Held {
    fn describe(&self) -> String {
        format!(
            "PID {} holds {} on {} (fd {})",
            self.pid,
            describe_lock(&self.lock),
            self.path,
            self.fd
        )
    }
}

/// "a flock write lock", "a POSIX read lock on bytes 10-19", …
pub fn describe_lock(l: &FileLock) -> String {
    let kind = match &l.kind {
        LockKind::Flock => "flock".to_string(),
        LockKind::Posix => "POSIX".to_string(),
        LockKind::Ofd => "OFD".to_string(),
        LockKind::Lease => "lease".to_string(),
        LockKind::Deleg => "delegation".to_string(),
        LockKind::Other(o) => o.clone(),
    };
    let access = match &l.access {
        LockAccess::Read => "read".to_string(),
        LockAccess::Write => "write".to_string(),
        LockAccess::Unlock => "unlock".to_string(),
        LockAccess::Other(o) => o.to_lowercase(),
    };
    let range = match (&l.kind, l.end) {
        (LockKind::Posix | LockKind::Ofd, Some(e)) => format!(" on bytes {}-{}", l.start, e),
        (LockKind::Posix | LockKind::Ofd, None) => format!(" on bytes {}-EOF", l.start),
        _ => String::new(),
    };
    let article = if matches!(l.kind, LockKind::Ofd) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind} {access} lock{range}")
}

/// The same lock, whatever line showed it (the ordinal differs between files).
fn same_lock(a: &FileLock, b: &FileLock) -> bool {
    a.kind == b.kind
        && a.access == b.access
        && a.pid == b.pid
        && (a.dev_major, a.dev_minor, a.inode) == (b.dev_major, b.dev_minor, b.inode)
        && (a.start, a.end) == (b.start, b.end)
}

/// Every lock held through the fds of `pids` (live processes of the frozen tree), and the held
/// locks of `/proc/locks` that belong to one of them but that no fd shows.
#[derive(Default)]
pub struct Survey {
    pub held: Vec<Held>,
    pub unseen: Vec<FileLock>,
    /// Every line of `/proc/locks` (empty when the tracker's lock table was used).
    pub all: Vec<FileLock>,
}

/// The tree's locks while it is frozen: from the tracker's lock table when one runs for `root`
/// (`tracker`: the dump session's connection; the tracker must follow `root` as started at
/// `root_start`, /proc/PID/stat field 22) and can tell, otherwise from fdinfo and
/// `/proc/locks` ([`survey`]), which the table then gets back so that it can tell next time.
/// The log says which source was used and why.
pub fn survey_tree(
    tracker: Option<&TrackerConn>,
    root: i32,
    root_start: u64,
    pids: &[i32],
) -> Result<Survey> {
    let t0 = Instant::now();
    let Some(conn) = tracker else {
        return slow(
            pids,
            None,
            &[],
            &format!("no tracker runs for PID {root}"),
            t0,
        );
    };
    let t_ask = Instant::now();
    let (state, view) = match conn.locks(pids) {
        Ok(v) => v,
        Err(e) => return slow(pids, None, &[], &format!("asking the tracker: {e:#}"), t0),
    };
    let t_answer = Instant::now();
    if state.pid != root || state.start_time != root_start {
        let why = format!(
            "the tracker on {} follows another process",
            client::socket_name(root)
        );
        return slow(pids, None, &[], &why, t0);
    }
    // Every inode the table describes or cannot tell gets its exact state back.
    let inodes: Vec<InodeId> = view
        .locks
        .iter()
        .map(|l| l.inode)
        .chain(view.unknown.iter().map(|(i, _)| *i))
        .collect();
    let why = if !view.usable {
        format!("the tracker's lock table cannot tell: {}", view.why)
    } else if !view.unknown.is_empty() {
        let u: Vec<String> = view
            .unknown
            .iter()
            .map(|(i, w)| format!("inode {i}: {w}"))
            .collect();
        format!(
            "the tracker's lock table cannot tell the state of {}",
            u.join("; ")
        )
    } else {
        match from_table(&view, pids)? {
            Ok((s, fds)) => {
                log::info!(
                    "file locks: from the tracker's lock table ({} events so far): {} held through the tree's fds, {fds} fds read, in {:?} (answered in {:?})",
                    view.events,
                    s.held.len(),
                    t0.elapsed(),
                    t_answer - t_ask,
                );
                return Ok(s);
            }
            Err(why) => format!("the tracker's lock table disagrees with fdinfo ({why})"),
        }
    };
    slow(pids, Some(conn), &inodes, &why, t0)
}

/// [`survey`], saying why; with a tracker, its lock table gets the exact state back (the tree is
/// frozen: nothing it does can come between).
fn slow(
    pids: &[i32],
    conn: Option<&TrackerConn>,
    inodes: &[InodeId],
    why: &str,
    t0: Instant,
) -> Result<Survey> {
    let s = survey(pids)?;
    log::info!(
        "file locks: read from /proc/locks and every fd's fdinfo in {:?} ({why})",
        t0.elapsed()
    );
    if let Some(c) = conn {
        let seed = seed_of(&s, pids, inodes);
        match c.lock_seed(&seed) {
            Ok(()) => log::debug!(
                "file locks: the tracker's lock table was given the exact state of {} inodes",
                seed.inodes.len()
            ),
            Err(e) => log::debug!("file locks: the tracker's lock table keeps its state: {e:#}"),
        }
    }
    Ok(s)
}

/// The inode of an open fd of a (frozen) process, or None if it is gone.
fn fd_inode(pid: i32, fd: i32) -> Result<Option<InodeId>> {
    use std::os::unix::fs::MetadataExt;
    let path = proc::pid_path(pid, &format!("fd/{fd}"));
    match std::fs::metadata(&path) {
        Ok(m) => Ok(Some(InodeId {
            major: libc::major(m.dev()),
            minor: libc::minor(m.dev()),
            ino: m.ino(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("stat {}", path.display())),
    }
}

/// The survey from the lock table: nothing to read when it gives the tree no lock; otherwise
/// the fdinfo of the fds on the locked inodes (the fd each lock is taken again through). The
/// two must agree: Ok(Err(why)) when they do not (then /proc/locks decides). Also returns how
/// many fdinfo files were read.
fn from_table(
    view: &TableView,
    pids: &[i32],
) -> Result<std::result::Result<(Survey, usize), String>> {
    let tree: HashSet<i32> = pids.iter().copied().collect();
    // POSIX locks are the process's; a flock or OFD lock is its description's, whoever took it.
    let ours = |l: &&TableLock| l.kind != TableKind::Posix || tree.contains(&l.pid);
    let inodes: HashSet<InodeId> = view.locks.iter().filter(ours).map(|l| l.inode).collect();
    let mut s = Survey::default();
    if inodes.is_empty() {
        return Ok(Ok((s, 0)));
    }
    let mut read = 0;
    for &pid in pids {
        let fds = proc::fdinfo::list_fds(pid)
            .with_context(|| format!("listing the fds of PID {pid} for their locks"))?;
        for (fd, path) in fds {
            if !fd_inode(pid, fd)?.is_some_and(|i| inodes.contains(&i)) {
                continue;
            }
            read += 1;
            let info = proc::fdinfo::read_fdinfo(pid, fd)
                .with_context(|| format!("fd {fd} of PID {pid}"))?;
            for lock in info
                .locks()
                .with_context(|| format!("the locks of fd {fd} ({path}) of PID {pid}"))?
            {
                if !lock.blocked {
                    s.held.push(Held {
                        pid,
                        fd,
                        path: path.clone(),
                        lock,
                    });
                }
            }
        }
    }
    if let Some(h) = s
        .held
        .iter()
        .find(|h| !view.locks.iter().any(|l| table_is(l, &h.lock)))
    {
        return Ok(Err(format!(
            "fdinfo shows that {}, which the table lacks",
            h.describe()
        )));
    }
    // What the table gives a process of the tree must show through one of the tree's fds (a
    // lock held through none is refused, and /proc/locks tells that for sure).
    let must_show = |l: &&TableLock| {
        l.kind == TableKind::Posix || (l.kind == TableKind::Flock && tree.contains(&l.pid))
    };
    if let Some(l) = view
        .locks
        .iter()
        .filter(ours)
        .filter(must_show)
        .find(|l| !s.held.iter().any(|h| table_is(l, &h.lock)))
    {
        return Ok(Err(format!(
            "the table says PID {} holds {} on inode {}, which no fd of the tree shows",
            l.pid,
            describe_lock(&file_lock_of(l)),
            l.inode
        )));
    }
    Ok(Ok((s, read)))
}

/// Whether a lock of the table is the lock a `lock:` line shows.
fn table_is(t: &TableLock, l: &FileLock) -> bool {
    same_lock(&file_lock_of(t), l)
}

/// A lock of the table as a `/proc/locks` line would show it.
fn file_lock_of(t: &TableLock) -> FileLock {
    FileLock {
        id: 0,
        blocked: false,
        kind: match t.kind {
            TableKind::Posix => LockKind::Posix,
            TableKind::Ofd => LockKind::Ofd,
            TableKind::Flock => LockKind::Flock,
        },
        mode: LockMode::Advisory,
        access: if t.write {
            LockAccess::Write
        } else {
            LockAccess::Read
        },
        pid: t.pid,
        dev_major: t.inode.major,
        dev_minor: t.inode.minor,
        inode: Some(t.inode.ino),
        start: t.start,
        end: t.end,
    }
}

/// The exact state a survey of the tree `pids` shows, for the tracker's lock table: every
/// lock `/proc/locks` shows on the inodes the tree holds locks on (whoever holds them) and on
/// `also` (inodes the table describes). A lease, or a lock kind cr does not know, makes its
/// inode unknown.
pub fn seed_of(s: &Survey, pids: &[i32], also: &[InodeId]) -> SeedSet {
    let tree: HashSet<i32> = pids.iter().copied().collect();
    let id = |l: &FileLock| {
        l.inode.map(|ino| InodeId {
            major: l.dev_major,
            minor: l.dev_minor,
            ino,
        })
    };
    let mut inodes: HashSet<InodeId> = also.iter().copied().collect();
    inodes.extend(s.held.iter().filter_map(|h| id(&h.lock)));
    inodes.extend(
        s.all
            .iter()
            .filter(|l| !l.blocked && tree.contains(&l.pid))
            .filter_map(id),
    );
    let mut seed = SeedSet::default();
    let mut unknown: HashMap<InodeId, String> = HashMap::new();
    for l in s.all.iter().filter(|l| !l.blocked) {
        let Some(i) = id(l).filter(|i| inodes.contains(i)) else {
            continue;
        };
        let kind = match l.kind {
            LockKind::Posix => TableKind::Posix,
            LockKind::Ofd => TableKind::Ofd,
            LockKind::Flock => TableKind::Flock,
            _ => {
                unknown
                    .entry(i)
                    .or_insert_with(|| format!("PID {} holds {}", l.pid, describe_lock(l)));
                continue;
            }
        };
        let write = match l.access {
            LockAccess::Write => true,
            LockAccess::Read => false,
            _ => {
                unknown
                    .entry(i)
                    .or_insert_with(|| format!("PID {} holds {}", l.pid, describe_lock(l)));
                continue;
            }
        };
        seed.locks.push(TableLock {
            inode: i,
            kind,
            write,
            start: l.start,
            end: l.end,
            pid: l.pid,
            owner: 0,
        });
    }
    // What fdinfo showed and /proc/locks did not (a lease of the tree, …).
    for h in &s.held {
        if let (Some(i), LockKind::Lease | LockKind::Deleg | LockKind::Other(_)) =
            (id(&h.lock), &h.lock.kind)
        {
            unknown.entry(i).or_insert_with(|| h.describe());
        }
    }
    seed.inodes = inodes.into_iter().collect();
    seed.inodes.sort();
    seed.unknown = unknown.into_iter().collect();
    seed.unknown.sort();
    seed
}

/// Reads the fdinfo of every fd of `pids` (frozen), then `/proc/locks`.
pub fn survey(pids: &[i32]) -> Result<Survey> {
    survey_inner(pids, false)
}

/// [`survey`] of processes that run: an fd or a process gone meanwhile is skipped.
pub fn survey_running(pids: &[i32]) -> Result<Survey> {
    survey_inner(pids, true)
}

fn survey_inner(pids: &[i32], running: bool) -> Result<Survey> {
    let gone = |e: &anyhow::Error| {
        running
            && e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|e| {
                    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
                })
            })
    };
    let mut held = Vec::new();
    for &pid in pids {
        let fds = match proc::fdinfo::list_fds(pid) {
            Ok(f) => f,
            Err(e) if gone(&e) => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("listing the fds of PID {pid} for their locks"))
            }
        };
        for (fd, path) in fds {
            let info = match proc::fdinfo::read_fdinfo(pid, fd) {
                Ok(i) => i,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e).with_context(|| format!("fd {fd} of PID {pid}")),
            };
            for lock in info
                .locks()
                .with_context(|| format!("the locks of fd {fd} ({path}) of PID {pid}"))?
            {
                if !lock.blocked {
                    held.push(Held {
                        pid,
                        fd,
                        path: path.clone(),
                        lock,
                    });
                }
            }
        }
    }
    let tree: HashSet<i32> = pids.iter().copied().collect();
    let all = proc::locks::read_locks()?;
    Ok(Survey {
        unseen: unseen(&all, &held, &tree),
        held,
        all,
    })
}

/// Held locks of `/proc/locks` (`all`) owned by a pid of `tree` that no fd showed.
fn unseen(all: &[FileLock], held: &[Held], tree: &HashSet<i32>) -> Vec<FileLock> {
    all.iter()
        .filter(|l| !l.blocked && tree.contains(&l.pid))
        .filter(|l| !held.iter().any(|h| same_lock(&h.lock, l)))
        .cloned()
        .collect()
}

impl Survey {
    /// Refuses what cr cannot dump: without `allowed` (--file-locks) any lock; with it, leases
    /// and locks held through no fd. The message names every lock.
    pub fn check(&self, allowed: bool) -> Result<()> {
        let mut refused: Vec<String> = Vec::new();
        let mut seen_desc = HashSet::new();
        for h in &self.held {
            let d = h.describe();
            if !seen_desc.insert(d.clone()) {
                continue;
            }
            match h.lock.kind {
                LockKind::Flock | LockKind::Posix | LockKind::Ofd if !allowed => refused.push(d),
                LockKind::Flock | LockKind::Posix | LockKind::Ofd => {}
                _ => refused.push(format!("{d}, which cr cannot dump")),
            }
        }
        for l in &self.unseen {
            let ino = l.inode.map(|i| i.to_string()).unwrap_or_else(|| "?".into());
            refused.push(format!(
                "PID {} holds {} on inode {:x}:{:02x}:{ino} through no open fd (a mapping of a closed fd?), which cr cannot dump",
                l.pid,
                describe_lock(l),
                l.dev_major,
                l.dev_minor
            ));
        }
        if refused.is_empty() {
            return Ok(());
        }
        let message =
            |hint: &str| format!("the tree holds file locks: {}{hint}", refused.join("; "));
        if allowed {
            Err(Refusal::new(message("")).into())
        } else {
            Err(Refusal::unless(
                "--file-locks",
                message("; dump with --file-locks (-l) to save and re-take them"),
            )
            .into())
        }
    }

    /// The image: each lock once, with the owner that takes it again. `fds` gives the file id
    /// of each (pid, fd) (from the fd tables of the dump, tree-wide ids).
    pub fn image(&self, fds: &HashMap<(i32, i32), u32>) -> Result<pb::Locks> {
        let mut out = pb::Locks::default();
        let mut done: HashSet<(String, bool, i32, u32, u64, u64)> = HashSet::new();
        for h in &self.held {
            let l = &h.lock;
            let kind = match l.kind {
                LockKind::Flock => "flock",
                LockKind::Posix => "posix",
                LockKind::Ofd => "ofd",
                _ => bail!("{}, which cr cannot dump", h.describe()),
            };
            let file_id = *fds.get(&(h.pid, h.fd)).with_context(|| {
                format!(
                    "{}: fd {} is not in the dumped fd table",
                    h.describe(),
                    h.fd
                )
            })?;
            let len = match l.end {
                None => 0,
                Some(e) if e >= l.start => e - l.start + 1,
                Some(e) => bail!("{}: its range ends ({e}) before it starts", h.describe()),
            };
            let write = l.access == LockAccess::Write;
            // flock and OFD: one per description; POSIX: one per process and range (dup'd fds
            // of one description show the same lock twice).
            let owner = if kind == "posix" { h.pid } else { 0 };
            if !done.insert((kind.to_string(), write, owner, file_id, l.start, len)) {
                continue;
            }
            out.locks.push(pb::FileLock {
                kind: kind.into(),
                write,
                pid: h.pid,
                fd: h.fd,
                file_id,
                start: l.start,
                len,
                path: h.path.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::proc::locks::parse_lock_line;

    fn held(pid: i32, fd: i32, line: &str) -> Held {
        Held {
            pid,
            fd,
            path: format!("/f{fd}"),
            lock: parse_lock_line(line).unwrap(),
        }
    }

    #[test]
    fn unseen_locks_of_the_tree() {
        let all = proc::locks::parse_locks(
            "1: POSIX  ADVISORY  WRITE 10 fe:00:5 0 9\n\
             1: -> POSIX  ADVISORY  WRITE 11 fe:00:5 0 9\n\
             2: FLOCK  ADVISORY  WRITE 10 fe:00:6 0 EOF\n\
             3: FLOCK  ADVISORY  READ 99 fe:00:7 0 EOF\n\
             4: OFDLCK ADVISORY  READ -1 fe:00:8 0 EOF\n",
        )
        .unwrap();
        let tree: HashSet<i32> = [10, 11].into_iter().collect();
        let h = vec![held(
            10,
            3,
            "lock:\t1: POSIX  ADVISORY  WRITE 10 fe:00:5 0 9",
        )];
        let u = unseen(&all, &h, &tree);
        // The waiter, the outsider's flock and the OFD lock (no pid) are not ours to report.
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].kind.clone(), u[0].inode), (LockKind::Flock, Some(6)));
    }

    #[test]
    fn refusal_names_each_lock() {
        let s = Survey {
            held: vec![
                held(10, 3, "lock:\t1: FLOCK  ADVISORY  WRITE 10 fe:00:5 0 EOF"),
                held(10, 4, "lock:\t1: POSIX  ADVISORY  READ 10 fe:00:6 10 19"),
                held(10, 5, "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:7 0 EOF"),
            ],
            unseen: vec![],
            all: vec![],
        };
        let e = format!("{:#}", s.check(false).unwrap_err());
        assert!(
            e.contains("PID 10 holds a flock write lock on /f3 (fd 3)"),
            "{e}"
        );
        assert!(
            e.contains("a POSIX read lock on bytes 10-19 on /f4 (fd 4)"),
            "{e}"
        );
        assert!(
            e.contains("an OFD write lock on bytes 0-EOF on /f5 (fd 5)"),
            "{e}"
        );
        assert!(e.contains("--file-locks"), "{e}");
        s.check(true).unwrap();
        let lease = Survey {
            held: vec![held(
                10,
                3,
                "lock:\t1: LEASE  ACTIVE  READ 10 fe:00:5 0 EOF",
            )],
            unseen: vec![],
            all: vec![],
        };
        assert!(format!("{:#}", lease.check(true).unwrap_err()).contains("lease"));
    }

    #[test]
    fn image_owners_and_ranges() {
        let s = Survey {
            held: vec![
                // One flock seen through a dup and from a child sharing the description.
                held(10, 3, "lock:\t1: FLOCK  ADVISORY  WRITE 10 fe:00:5 0 EOF"),
                held(10, 4, "lock:\t1: FLOCK  ADVISORY  WRITE 10 fe:00:5 0 EOF"),
                held(11, 3, "lock:\t1: FLOCK  ADVISORY  WRITE 10 fe:00:5 0 EOF"),
                held(10, 6, "lock:\t1: POSIX  ADVISORY  READ 10 fe:00:6 10 19"),
                held(10, 6, "lock:\t2: POSIX  ADVISORY  WRITE 10 fe:00:6 100 EOF"),
                held(10, 7, "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:7 0 4095"),
            ],
            unseen: vec![],
            all: vec![],
        };
        let fds: HashMap<(i32, i32), u32> = [
            ((10, 3), 1),
            ((10, 4), 1),
            ((11, 3), 1),
            ((10, 6), 2),
            ((10, 7), 3),
        ]
        .into_iter()
        .collect();
        let img = s.image(&fds).unwrap();
        let got: Vec<(&str, bool, i32, i32, u32, u64, u64)> = img
            .locks
            .iter()
            .map(|l| {
                (
                    l.kind.as_str(),
                    l.write,
                    l.pid,
                    l.fd,
                    l.file_id,
                    l.start,
                    l.len,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("flock", true, 10, 3, 1, 0, 0),
                ("posix", false, 10, 6, 2, 10, 10),
                ("posix", true, 10, 6, 2, 100, 0),
                ("ofd", true, 10, 7, 3, 0, 4096),
            ]
        );
        assert!(s.image(&HashMap::new()).is_err());
    }
}
