//! The lock model: the locks of the inodes the tree locked, replayed from the kernel's own lock
//! events (cr-ebpf/src/locks.rs: filelock:* tracepoints, see cr-common/src/lock.rs) instead of
//! read from `/proc/locks` (whose first read waits for an RCU grace period).
//!
//! The events are requests with their result, so the model replays the kernel's rules
//! (fs/locks.c), per inode and per owner:
//! - POSIX and OFD (`posix_lock_inode`): a successful request sets the owner's coverage of
//!   [start, end] to its type (F_UNLCK removes it), splitting the owner's locks it overlaps and
//!   merging adjacent or overlapping ones of the same type, so each owner's locks are its
//!   maximal runs of one type. (For a granted lock the record shows the lock as it ends up:
//!   the request merged with the owner's overlapping and adjacent locks of its type, all of
//!   that type already, so overwriting that range is the same.) A failed or deferred request (a
//!   blocked F_SETLKW; it fires again when granted) changes nothing. The owner is the process's files_struct (POSIX) or the
//!   open file description (OFD); a close is an F_UNLCK of everything of an owner, once for
//!   the process's POSIX locks and once for the description's OFD locks.
//! - flock (`flock_lock_inode`): one lock per description. A request of the type already held
//!   changes nothing; otherwise the held lock is removed *first*, then the new one is added or
//!   refused (-EAGAIN) or deferred (blocking): a failed conversion drops the old lock.
//! - A lease request marks its inode "unknown" (a dump refuses leases; it reads the inode).
//!
//! Locks taken before the tracker started come from a survey (fdinfo `lock:` lines and
//! `/proc/locks`), with no owner pointer. A POSIX owner is a process: the survey's POSIX locks
//! of PID P belong to the files_struct P's next POSIX request names (fl_pid is P's tgid, the
//! owner its files_struct; one per process unless it unshared its fd table). A surveyed flock
//! or OFD lock names no description, so an event on its inode from a description the model
//! does not know could be that lock's: the inode becomes "unknown" and the next dump reads its
//! exact state and sends it back. Every request is an overwrite of an owner's state, so
//! replaying the events queued since the tree was followed on top of a survey taken after that
//! gives the right state whatever the survey saw.

use std::collections::{BTreeMap, HashMap, HashSet};

use cr_common::lock::{
    lock_src, LockEvent, FILE_LOCK_DEFERRED, FL_ACCESS, FL_CLOSE, FL_OFDLCK, F_RDLCK, F_UNLCK,
    F_WRLCK, OFFSET_MAX,
};

use crate::tracker::locks::{InodeId, SeedSet, TableKind, TableLock};

/// The kernel's two lists on an inode: requests of one never touch the other's locks, even
/// for the same owner pointer (a description can hold an OFD lock and a flock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum List {
    Posix,
    Flock,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Owner {
    /// The owner pointer of the events.
    Bound(u64),
    /// The POSIX locks a survey showed for this process (owner: its files_struct, unknown).
    SeededPid(i32),
    /// A flock or OFD lock a survey showed (owner: a description, unknown).
    Seeded(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    start: u64,
    /// Inclusive; OFFSET_MAX: to the end of the file.
    end: u64,
    write: bool,
}

#[derive(Clone, Debug)]
struct Held {
    kind: TableKind,
    pid: i32,
    /// Sorted, disjoint, adjacent ranges of one type merged (the kernel's own form).
    ranges: Vec<Range>,
}

#[derive(Clone, Debug, Default)]
struct InodeState {
    owners: BTreeMap<(List, Owner), Held>,
    unknown: Option<String>,
}

impl InodeState {
    fn has_seeded(&self, list: List, kind: Option<TableKind>) -> bool {
        self.owners.iter().any(|((l, o), h)| {
            *l == list
                && matches!(o, Owner::Seeded(_) | Owner::SeededPid(_))
                && kind.is_none_or(|k| h.kind == k)
        })
    }
}

/// Sets `[s, e]` of one owner's ranges to `w` (None: unlocks), the way posix_lock_inode does.
fn overwrite(ranges: &mut Vec<Range>, s: u64, e: u64, w: Option<bool>) {
    let mut out = Vec::with_capacity(ranges.len() + 2);
    for r in ranges.drain(..) {
        if r.end < s || r.start > e {
            out.push(r);
            continue;
        }
        if r.start < s {
            out.push(Range {
                start: r.start,
                end: s - 1,
                write: r.write,
            });
        }
        if r.end > e {
            out.push(Range {
                start: e + 1,
                end: r.end,
                write: r.write,
            });
        }
    }
    if let Some(write) = w {
        out.push(Range {
            start: s,
            end: e,
            write,
        });
    }
    out.sort_by_key(|r| r.start);
    for r in out {
        match ranges.last_mut() {
            Some(l) if l.write == r.write && l.end.checked_add(1) == Some(r.start) => l.end = r.end,
            _ => ranges.push(r),
        }
    }
}

/// The locks of the inodes the tree locked, replayed from lock events (see the module doc).
#[derive(Debug, Default)]
pub struct LockModel {
    inodes: HashMap<InodeId, InodeState>,
    /// POSIX owners named by requests: files_struct → process, and back.
    files: HashMap<u64, i32>,
    files_of: HashMap<i32, u64>,
    /// Inodes holding SeededPid(pid) entries, by pid (binding without a walk of all inodes).
    seeded_pids: HashMap<i32, HashSet<InodeId>>,
    next_seed: u64,
    /// Inodes events touched since [`LockModel::take_touched`].
    touched: HashSet<InodeId>,
}

impl LockModel {
    pub fn new() -> LockModel {
        LockModel::default()
    }

    /// Replays one event.
    pub fn apply(&mut self, ev: &LockEvent) {
        let id = InodeId::from_kernel(ev.dev, ev.ino);
        self.touched.insert(id);
        match ev.source {
            lock_src::POSIX => self.apply_posix(id, ev),
            lock_src::FLOCK => self.apply_flock(id, ev),
            lock_src::LEASE => self.mark(id, "the tree asked for a lease or delegation on it"),
            s => self.mark(id, &format!("an event of unknown source {s}")),
        }
    }

    fn mark(&mut self, id: InodeId, why: &str) {
        let st = self.inodes.entry(id).or_default();
        if st.unknown.is_none() {
            st.unknown = Some(why.to_string());
        }
    }

    /// The type of a request (None: F_UNLCK), or the inode is marked.
    fn req_type(&mut self, id: InodeId, ev: &LockEvent) -> Option<Option<bool>> {
        match ev.ty {
            F_RDLCK => Some(Some(false)),
            F_WRLCK => Some(Some(true)),
            F_UNLCK => Some(None),
            t => {
                self.mark(id, &format!("a lock request of unknown type {t}"));
                None
            }
        }
    }

    /// Whether a request's result leaves the owner's locks as they were: 0 (applies), a
    /// refusal (no change), or anything else (marks the inode).
    fn result(&mut self, id: InodeId, ev: &LockEvent) -> Option<bool> {
        match ev.ret {
            0 => Some(true),
            r if r == -libc::EAGAIN
                || r == -libc::EDEADLK
                || r == -libc::ENOENT
                || r == FILE_LOCK_DEFERRED =>
            {
                Some(false)
            }
            r => {
                self.mark(id, &format!("a lock request ended with {r}"));
                None
            }
        }
    }

    fn apply_posix(&mut self, id: InodeId, ev: &LockEvent) {
        if ev.flags & FL_ACCESS != 0 {
            return;
        }
        let Some(applies) = self.result(id, ev) else {
            return;
        };
        let Some(ty) = self.req_type(id, ev) else {
            return;
        };
        if !applies {
            return;
        }
        if ev.start < 0 || ev.end < ev.start {
            self.mark(
                id,
                &format!("a lock request on bytes {}-{}", ev.start, ev.end),
            );
            return;
        }
        let (owner, pid) = (ev.owner, ev.pid as i32);
        let ofd = ev.flags & FL_OFDLCK != 0;
        let close = ev.flags & FL_CLOSE != 0;
        if !ofd && !close {
            // A POSIX request: its owner is the requesting process's files_struct.
            self.learn_files(owner, pid);
        }
        let known_files = self.files.contains_key(&owner);
        let st = self.inodes.entry(id).or_default();
        let key = (List::Posix, Owner::Bound(owner));
        if !st.owners.contains_key(&key) && !known_files {
            // An owner without locks here, as far as events tell. A surveyed lock it could be:
            // an OFD lock of an unnamed description, or (a close naming an unknown owner: the
            // process's files_struct or a description) the process's surveyed POSIX locks.
            let ambiguous = if ofd {
                st.has_seeded(List::Posix, Some(TableKind::Ofd))
            } else {
                close
                    && (st
                        .owners
                        .contains_key(&(List::Posix, Owner::SeededPid(pid)))
                        || st.has_seeded(List::Posix, Some(TableKind::Ofd)))
            };
            if ambiguous && st.unknown.is_none() {
                st.unknown = Some(format!(
                    "PID {pid} {} an owner cr has not seen, and a lock held since before the tracker started could be its",
                    if close { "closed a file of" } else { "took an OFD lock through" }
                ));
            }
        }
        if ty.is_none() && !st.owners.contains_key(&key) {
            return;
        }
        let held = st.owners.entry(key).or_insert_with(|| Held {
            kind: if ofd {
                TableKind::Ofd
            } else {
                TableKind::Posix
            },
            pid,
            ranges: Vec::new(),
        });
        if ty.is_some() {
            held.pid = pid;
        }
        overwrite(&mut held.ranges, ev.start as u64, ev.end as u64, ty);
        if held.ranges.is_empty() {
            st.owners.remove(&key);
        }
    }

    /// `owner` is the files_struct of `pid`: the process's surveyed POSIX locks are its.
    fn learn_files(&mut self, owner: u64, pid: i32) {
        if self.files.insert(owner, pid) != Some(pid) {
            // First sight, or a files_struct freed and reused by another process (the old
            // one's locks were all released with it).
            if let Some(old) = self.files_of.get(&pid).copied() {
                if old != owner && self.files.get(&old) == Some(&pid) {
                    self.files.remove(&old);
                }
            }
        }
        self.files_of.insert(pid, owner);
        let Some(ids) = self.seeded_pids.remove(&pid) else {
            return;
        };
        for id in ids {
            let Some(st) = self.inodes.get_mut(&id) else {
                continue;
            };
            let Some(seeded) = st.owners.remove(&(List::Posix, Owner::SeededPid(pid))) else {
                continue;
            };
            let held = st
                .owners
                .entry((List::Posix, Owner::Bound(owner)))
                .or_insert_with(|| Held {
                    kind: TableKind::Posix,
                    pid,
                    ranges: Vec::new(),
                });
            for r in seeded.ranges {
                overwrite(&mut held.ranges, r.start, r.end, Some(r.write));
            }
        }
    }

    fn apply_flock(&mut self, id: InodeId, ev: &LockEvent) {
        if ev.flags & FL_ACCESS != 0 {
            return;
        }
        let Some(applies) = self.result(id, ev) else {
            return;
        };
        let Some(ty) = self.req_type(id, ev) else {
            return;
        };
        let st = self.inodes.entry(id).or_default();
        let key = (List::Flock, Owner::Bound(ev.owner));
        let held_type = st
            .owners
            .get(&key)
            .and_then(|h| h.ranges.first())
            .map(|r| r.write);
        if held_type.is_none() && st.has_seeded(List::Flock, None) && st.unknown.is_none() {
            st.unknown = Some(format!(
                "PID {} used flock through a description cr has not seen, and a flock held since before the tracker started could be its",
                ev.pid
            ));
        }
        if !applies {
            // -EAGAIN or deferred: the lock the description held (of the other type: the same
            // type would have succeeded) was removed before the conflict was found.
            if ev.ret != -libc::ENOENT {
                st.owners.remove(&key);
            }
            return;
        }
        match ty {
            None => {
                st.owners.remove(&key);
            }
            Some(w) if held_type == Some(w) => {}
            Some(w) => {
                st.owners.insert(
                    key,
                    Held {
                        kind: TableKind::Flock,
                        pid: ev.pid as i32,
                        ranges: vec![Range {
                            start: 0,
                            end: OFFSET_MAX as u64,
                            write: w,
                        }],
                    },
                );
            }
        }
    }

    /// Replaces what the model says about the seed's inodes by the seed. Locks the events
    /// already explain are kept with their owners when the survey shows every one of them
    /// (then the survey's other locks are the unnamed ones); otherwise the survey is all.
    pub fn reseed(&mut self, seed: &SeedSet) {
        let mut by_inode: HashMap<InodeId, Vec<TableLock>> = HashMap::new();
        for l in &seed.locks {
            by_inode.entry(l.inode).or_default().push(l.clone());
        }
        let unknown: HashMap<InodeId, &String> =
            seed.unknown.iter().map(|(i, w)| (*i, w)).collect();
        let mut ids: Vec<InodeId> = seed.inodes.clone();
        ids.extend(seed.unknown.iter().map(|(i, _)| *i));
        ids.sort();
        ids.dedup();
        for id in ids {
            let lines = by_inode.remove(&id).unwrap_or_default();
            self.reseed_inode(id, lines, unknown.get(&id).map(|w| w.to_string()));
        }
    }

    fn reseed_inode(&mut self, id: InodeId, lines: Vec<TableLock>, unknown: Option<String>) {
        let st = self.inodes.entry(id).or_default();
        let mut rest = lines.clone();
        let mut keep = true;
        for b in lines_of(id, st).into_iter().filter(|l| l.owner != 0) {
            match rest.iter().position(|l| l.same_line(&b)) {
                Some(i) => {
                    rest.swap_remove(i);
                }
                None => {
                    keep = false;
                    break;
                }
            }
        }
        if !keep {
            rest = lines;
            st.owners.retain(|(_, o), _| !matches!(o, Owner::Bound(_)));
        }
        st.owners.retain(|(_, o), _| matches!(o, Owner::Bound(_)));
        st.unknown = unknown;
        for l in rest {
            let r = Range {
                start: l.start,
                end: l.end.unwrap_or(OFFSET_MAX as u64),
                write: l.write,
            };
            let (key, kind) = match l.kind {
                TableKind::Posix => match self.files_of.get(&l.pid) {
                    Some(&o) if self.files.get(&o) == Some(&l.pid) => {
                        ((List::Posix, Owner::Bound(o)), TableKind::Posix)
                    }
                    _ => {
                        self.seeded_pids.entry(l.pid).or_default().insert(id);
                        ((List::Posix, Owner::SeededPid(l.pid)), TableKind::Posix)
                    }
                },
                TableKind::Ofd => {
                    self.next_seed += 1;
                    ((List::Posix, Owner::Seeded(self.next_seed)), TableKind::Ofd)
                }
                TableKind::Flock => {
                    self.next_seed += 1;
                    (
                        (List::Flock, Owner::Seeded(self.next_seed)),
                        TableKind::Flock,
                    )
                }
            };
            let held = st.owners.entry(key).or_insert_with(|| Held {
                kind,
                pid: l.pid,
                ranges: Vec::new(),
            });
            overwrite(&mut held.ranges, r.start, r.end, Some(r.write));
        }
    }

    /// Every lock the model holds, sorted.
    pub fn locks(&self) -> Vec<TableLock> {
        let mut out: Vec<TableLock> = self
            .inodes
            .iter()
            .flat_map(|(id, st)| lines_of(*id, st))
            .collect();
        out.sort();
        out
    }

    /// Inodes of unknown state, with the reason, sorted.
    pub fn unknown(&self) -> Vec<(InodeId, String)> {
        let mut out: Vec<(InodeId, String)> = self
            .inodes
            .iter()
            .filter_map(|(id, st)| st.unknown.clone().map(|w| (*id, w)))
            .collect();
        out.sort();
        out
    }

    /// Every inode the model describes.
    pub fn inodes(&self) -> Vec<InodeId> {
        self.inodes.keys().copied().collect()
    }

    /// Forgets inodes without locks (and not unknown); returns them.
    pub fn prune(&mut self) -> Vec<InodeId> {
        let empty: Vec<InodeId> = self
            .inodes
            .iter()
            .filter(|(_, st)| st.owners.is_empty() && st.unknown.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in &empty {
            self.inodes.remove(id);
        }
        empty
    }

    /// Whether the model holds anything about `id`.
    pub fn has(&self, id: &InodeId) -> bool {
        self.inodes.contains_key(id)
    }

    /// The inodes events touched since the last call.
    pub fn take_touched(&mut self) -> HashSet<InodeId> {
        std::mem::take(&mut self.touched)
    }
}

fn lines_of(id: InodeId, st: &InodeState) -> Vec<TableLock> {
    let mut out = Vec::new();
    for ((_, owner), h) in &st.owners {
        for r in &h.ranges {
            out.push(TableLock {
                inode: id,
                kind: h.kind,
                write: r.write,
                start: r.start,
                end: (r.end != OFFSET_MAX as u64).then_some(r.end),
                pid: if h.kind == TableKind::Ofd { -1 } else { h.pid },
                owner: match owner {
                    Owner::Bound(o) => *o,
                    _ => 0,
                },
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cr_common::lock::{FL_FLOCK, FL_POSIX, FL_SLEEP};

    const DEV: u32 = (0xfe << 20) | 1;
    const A: u64 = 0xaaaa_0000;
    const B: u64 = 0xbbbb_0000;
    const FILES: u64 = 0xf11e_0000;

    #[allow(clippy::too_many_arguments)]
    fn ev(
        source: u32,
        owner: u64,
        pid: u32,
        flags: u32,
        ty: u32,
        start: i64,
        end: i64,
        ret: i32,
    ) -> LockEvent {
        LockEvent {
            owner,
            ino: 7,
            start,
            end,
            dev: DEV,
            pid,
            flags,
            ret,
            tgid: pid,
            ty,
            source,
            tree: 1,
        }
    }
    fn posix(owner: u64, pid: u32, ty: u32, start: i64, end: i64) -> LockEvent {
        ev(lock_src::POSIX, owner, pid, FL_POSIX, ty, start, end, 0)
    }
    fn ofd(owner: u64, ty: u32, start: i64, end: i64) -> LockEvent {
        ev(
            lock_src::POSIX,
            owner,
            10,
            FL_POSIX | FL_OFDLCK,
            ty,
            start,
            end,
            0,
        )
    }
    fn flock(owner: u64, pid: u32, ty: u32, ret: i32) -> LockEvent {
        ev(
            lock_src::FLOCK,
            owner,
            pid,
            FL_FLOCK,
            ty,
            0,
            OFFSET_MAX,
            ret,
        )
    }
    fn close(owner: u64, pid: u32) -> LockEvent {
        ev(
            lock_src::POSIX,
            owner,
            pid,
            FL_POSIX | FL_CLOSE,
            F_UNLCK,
            0,
            OFFSET_MAX,
            0,
        )
    }
    /// (kind, write, start, end, pid) of every lock.
    fn lines(m: &LockModel) -> Vec<(TableKind, bool, u64, Option<u64>, i32)> {
        let mut v: Vec<_> = m
            .locks()
            .into_iter()
            .map(|l| (l.kind, l.write, l.start, l.end, l.pid))
            .collect();
        v.sort_by_key(|l| (l.0, l.2));
        v
    }
    const P: TableKind = TableKind::Posix;
    const O: TableKind = TableKind::Ofd;
    const F: TableKind = TableKind::Flock;
    fn id() -> InodeId {
        InodeId::from_kernel(DEV, 7)
    }

    #[test]
    fn posix_splits_and_merges() {
        let mut m = LockModel::new();
        m.apply(&posix(FILES, 10, F_WRLCK, 0, 99));
        m.apply(&posix(FILES, 10, F_UNLCK, 40, 59));
        assert_eq!(
            lines(&m),
            vec![(P, true, 0, Some(39), 10), (P, true, 60, Some(99), 10)]
        );
        m.apply(&posix(FILES, 10, F_RDLCK, 40, 59));
        assert_eq!(
            lines(&m),
            vec![
                (P, true, 0, Some(39), 10),
                (P, false, 40, Some(59), 10),
                (P, true, 60, Some(99), 10)
            ]
        );
        m.apply(&posix(FILES, 10, F_WRLCK, 40, 59));
        assert_eq!(lines(&m), vec![(P, true, 0, Some(99), 10)]);
        // Adjacent of the same type merges, of another type does not.
        m.apply(&posix(FILES, 10, F_RDLCK, 100, 199));
        m.apply(&posix(FILES, 10, F_RDLCK, 200, OFFSET_MAX));
        assert_eq!(
            lines(&m),
            vec![(P, true, 0, Some(99), 10), (P, false, 100, None, 10)]
        );
        // Another owner's locks are untouched by this one's requests.
        m.apply(&posix(0x1234, 11, F_RDLCK, 500, 599));
        m.apply(&posix(FILES, 10, F_UNLCK, 0, OFFSET_MAX));
        assert_eq!(lines(&m), vec![(P, false, 500, Some(599), 11)]);
        // A refused or deferred request changes nothing.
        m.apply(&ev(
            lock_src::POSIX,
            FILES,
            10,
            FL_POSIX | FL_SLEEP,
            F_WRLCK,
            500,
            599,
            FILE_LOCK_DEFERRED,
        ));
        m.apply(&ev(
            lock_src::POSIX,
            FILES,
            10,
            FL_POSIX,
            F_WRLCK,
            500,
            599,
            -libc::EAGAIN,
        ));
        assert_eq!(lines(&m), vec![(P, false, 500, Some(599), 11)]);
        assert!(m.unknown().is_empty());
        m.apply(&ev(
            lock_src::POSIX,
            FILES,
            10,
            FL_POSIX,
            F_WRLCK,
            0,
            9,
            -libc::ENOLCK,
        ));
        assert_eq!(m.unknown().len(), 1);
    }

    #[test]
    fn close_releases_one_owner() {
        let mut m = LockModel::new();
        m.apply(&posix(FILES, 10, F_WRLCK, 0, 9));
        m.apply(&ofd(A, F_RDLCK, 20, 29));
        m.apply(&flock(A, 10, F_WRLCK, 0));
        // The process's close: its POSIX locks go, the description's OFD lock and flock stay.
        m.apply(&close(FILES, 10));
        assert_eq!(
            lines(&m),
            vec![(O, false, 20, Some(29), -1), (F, true, 0, None, 10)]
        );
        // The description's last close: OFD (a posix close naming it), then flock.
        m.apply(&close(A, 10));
        m.apply(&ev(
            lock_src::FLOCK,
            A,
            10,
            FL_FLOCK | FL_CLOSE,
            F_UNLCK,
            0,
            OFFSET_MAX,
            0,
        ));
        assert!(lines(&m).is_empty());
        assert!(m.unknown().is_empty());
        assert_eq!(m.prune(), vec![id()]);
    }

    #[test]
    fn flock_conversion_drops_the_old_lock_first() {
        let mut m = LockModel::new();
        m.apply(&flock(A, 10, F_RDLCK, 0));
        m.apply(&flock(B, 11, F_RDLCK, 0));
        // A's upgrade conflicts with B: refused, and A's shared lock is gone.
        m.apply(&flock(A, 10, F_WRLCK, -libc::EAGAIN));
        assert_eq!(lines(&m), vec![(F, false, 0, None, 11)]);
        // Blocking: deferred, then granted once B unlocks.
        m.apply(&flock(A, 10, F_RDLCK, 0));
        m.apply(&ev(
            lock_src::FLOCK,
            A,
            10,
            FL_FLOCK | FL_SLEEP,
            F_WRLCK,
            0,
            OFFSET_MAX,
            FILE_LOCK_DEFERRED,
        ));
        assert_eq!(lines(&m), vec![(F, false, 0, None, 11)]);
        m.apply(&flock(B, 11, F_UNLCK, 0));
        m.apply(&ev(
            lock_src::FLOCK,
            A,
            10,
            FL_FLOCK | FL_SLEEP,
            F_WRLCK,
            0,
            OFFSET_MAX,
            0,
        ));
        assert_eq!(lines(&m), vec![(F, true, 0, None, 10)]);
        // The same type again (another process sharing the description): no change, same pid.
        m.apply(&flock(A, 12, F_WRLCK, 0));
        assert_eq!(lines(&m), vec![(F, true, 0, None, 10)]);
    }

    fn seed(locks: Vec<TableLock>) -> SeedSet {
        SeedSet {
            inodes: vec![id()],
            locks,
            unknown: vec![],
        }
    }
    fn line(kind: TableKind, write: bool, start: u64, end: Option<u64>, pid: i32) -> TableLock {
        TableLock {
            inode: id(),
            kind,
            write,
            start,
            end,
            pid,
            owner: 0,
        }
    }

    #[test]
    fn surveyed_posix_locks_join_their_process() {
        let mut m = LockModel::new();
        m.reseed(&seed(vec![
            line(P, true, 0, Some(99), 10),
            line(P, false, 200, None, 10),
        ]));
        assert_eq!(
            lines(&m),
            vec![(P, true, 0, Some(99), 10), (P, false, 200, None, 10)]
        );
        // A close before any request of PID 10: its files_struct or a description? Unknown.
        let mut c = LockModel::new();
        c.reseed(&seed(vec![line(P, true, 0, Some(99), 10)]));
        c.apply(&close(0x5555, 10));
        assert_eq!(c.unknown().len(), 1);
        // A request of PID 10 names its files_struct: the surveyed locks are its.
        m.apply(&posix(FILES, 10, F_UNLCK, 0, 49));
        assert_eq!(
            lines(&m),
            vec![(P, true, 50, Some(99), 10), (P, false, 200, None, 10)]
        );
        assert!(m.locks().iter().all(|l| l.owner == FILES));
        m.apply(&close(A, 10)); // a description's close: none of the process's locks
        m.apply(&close(FILES, 10));
        assert!(lines(&m).is_empty());
        assert!(m.unknown().is_empty());
    }

    #[test]
    fn surveyed_flock_and_ofd_make_their_inode_unknown_when_touched() {
        let mut m = LockModel::new();
        m.reseed(&seed(vec![
            line(F, false, 0, None, 10),
            line(O, true, 0, Some(9), -1),
        ]));
        m.apply(&posix(FILES, 10, F_WRLCK, 100, 199));
        assert!(m.unknown().is_empty(), "POSIX requests do not touch them");
        m.apply(&flock(A, 10, F_WRLCK, 0));
        assert_eq!(m.unknown().len(), 1);
        // The exact state read by a dump: A's lock is the surveyed one (converted), kept with
        // its owner; the inode is known again.
        m.reseed(&seed(vec![
            line(F, true, 0, None, 10),
            line(O, true, 0, Some(9), -1),
            line(P, true, 100, Some(199), 10),
        ]));
        assert!(m.unknown().is_empty());
        let owners: Vec<(TableKind, u64)> = m.locks().iter().map(|l| (l.kind, l.owner)).collect();
        assert!(
            owners.contains(&(F, A)) && owners.contains(&(P, FILES)) && owners.contains(&(O, 0)),
            "{owners:?}"
        );
        // Bound locks the survey does not show: the survey is all.
        m.reseed(&seed(vec![line(O, true, 0, Some(9), -1)]));
        assert_eq!(lines(&m), vec![(O, true, 0, Some(9), -1)]);
    }

    #[test]
    fn leases_mark_their_inode() {
        let mut m = LockModel::new();
        m.apply(&ev(lock_src::LEASE, A, 10, 32, F_RDLCK, 0, 0, 0));
        assert_eq!(m.unknown().len(), 1);
        assert!(m.prune().is_empty());
    }
}
