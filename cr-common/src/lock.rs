//! Types of the tracker's file-lock events (cr-ebpf/src/locks.rs ↔ cr-user/src/track/locks.rs).
//!
//! The eBPF side reports lock *requests* with their result, as the filelock tracepoints do
//! (`posix_lock_inode` for POSIX and OFD locks, closes included; `flock_lock_inode` for flock;
//! `generic_add_lease` for leases); the user side replays them with the kernel's own rules.
//! A request is queued in CR_LOCK_EVENTS when the current process belongs to the tracked tree
//! (CR_LOCK_TREE, kept by the fork and exit programs) or when it touches an inode the tree
//! locked (CR_LOCK_INODES): releases often run in another context (the last close of a shared
//! description, an exiting process already gone from the tree).

/// Names of the lock table's maps and programs in the eBPF object.
pub mod names {
    /// Ring buffer of [`super::LockEvent`]s.
    pub const EVENTS: &str = "CR_LOCK_EVENTS";
    /// Processes of the tracked tree (key: tgid or tid, value: 1).
    pub const TREE: &str = "CR_LOCK_TREE";
    /// Inodes the tree took a lock on (key: [`super::LockInode`], value: 1).
    pub const INODES: &str = "CR_LOCK_INODES";
    /// Per-CPU counters ([`super::lock_stat`]).
    pub const STATS: &str = "CR_LOCK_STATS";
    /// (program, category, tracepoint) of every lock-table program.
    pub const PROGS: &[(&str, &str, &str)] = &[
        ("cr_lock_posix", "filelock", "posix_lock_inode"),
        ("cr_lock_flock", "filelock", "flock_lock_inode"),
        ("cr_lock_lease", "filelock", "generic_add_lease"),
        ("cr_lock_fork", "sched", "sched_process_fork"),
        ("cr_lock_exit", "sched", "sched_process_exit"),
    ];
}

/// Size of CR_LOCK_EVENTS in bytes (72 bytes a record with the ring's header: ~14 Ki events
/// between two drains by the tracker). A full ring is counted (LOST) and makes the table
/// unusable until a dump reads the exact state again.
pub const LOCK_EVENTS_BYTES: u32 = 1 << 20;
/// Capacity of CR_LOCK_TREE (processes and threads of the tree alive at once).
pub const LOCK_TREE_MAX: u32 = 16384;
/// Capacity of CR_LOCK_INODES (inodes the tree holds or held locks on, between two prunes;
/// a full map is counted and makes the table unusable until a dump reads the exact state).
pub const LOCK_INODES_MAX: u32 = 16384;

/// Indices into CR_LOCK_STATS.
pub mod lock_stat {
    /// Events that did not fit in CR_LOCK_EVENTS.
    pub const LOST: u32 = 0;
    /// Children of the tree that did not fit in CR_LOCK_TREE.
    pub const TREE_LOST: u32 = 1;
    /// Locked inodes that did not fit in CR_LOCK_INODES.
    pub const INODES_LOST: u32 = 2;
    /// Events queued.
    pub const EVENTS: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Which tracepoint an event comes from ([`LockEvent::source`]).
pub mod lock_src {
    /// filelock:posix_lock_inode (POSIX and OFD requests, and the releases of a close).
    pub const POSIX: u32 = 0;
    /// filelock:flock_lock_inode (flock requests, and the release of a last close).
    pub const FLOCK: u32 = 1;
    /// filelock:generic_add_lease (a lease or delegation was asked for).
    pub const LEASE: u32 = 2;
}

/// `fl_flags` bits (include/linux/filelock.h; checked against the tracepoints' print format).
pub const FL_POSIX: u32 = 1;
pub const FL_FLOCK: u32 = 2;
pub const FL_DELEG: u32 = 4;
pub const FL_ACCESS: u32 = 8;
pub const FL_EXISTS: u32 = 16;
pub const FL_LEASE: u32 = 32;
pub const FL_CLOSE: u32 = 64;
pub const FL_SLEEP: u32 = 128;
pub const FL_OFDLCK: u32 = 1024;
/// `fl_type` values.
pub const F_RDLCK: u32 = 0;
pub const F_WRLCK: u32 = 1;
pub const F_UNLCK: u32 = 2;
/// A blocking request was queued behind a conflicting lock (it fires again when granted).
pub const FILE_LOCK_DEFERRED: i32 = 1;
/// `fl_end` of a lock to the end of the file.
pub const OFFSET_MAX: i64 = i64::MAX;

/// Offsets of the fields of filelock:posix_lock_inode and flock_lock_inode records (one event
/// class, `filelock_lock`), checked against tracefs before the programs are attached.
pub mod lock_off {
    pub const INO: u32 = 16;
    pub const DEV: u32 = 24;
    pub const OWNER: u32 = 40;
    pub const PID: u32 = 48;
    pub const FLAGS: u32 = 52;
    pub const TYPE: u32 = 56;
    pub const START: u32 = 64;
    pub const END: u32 = 72;
    pub const RET: u32 = 80;
    /// filelock:generic_add_lease (class `filelock_lease`).
    pub const LEASE_INO: u32 = 8;
    pub const LEASE_DEV: u32 = 28;
    pub const LEASE_OWNER: u32 = 32;
    pub const LEASE_FLAGS: u32 = 40;
    pub const LEASE_TYPE: u32 = 44;
    /// sched:sched_process_fork `child_pid`, sched:sched_process_exit `group_dead`.
    pub const FORK_CHILD_PID: u32 = 20;
    pub const EXIT_GROUP_DEAD: u32 = 32;
}

/// Key of CR_LOCK_INODES: an inode as the tracepoints name it (`s_dev` in the kernel's
/// encoding: major << 20 | minor).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LockInode {
    pub ino: u64,
    pub dev: u32,
    pub _pad: u32,
}

/// One record of CR_LOCK_EVENTS: a lock request and its result, as the tracepoint saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockEvent {
    /// `fl_owner`: the files_struct of a POSIX lock's process, the struct file of a flock or
    /// OFD lock's open file description (an identity only; never dereferenced).
    pub owner: u64,
    pub ino: u64,
    pub start: i64,
    /// Inclusive; OFFSET_MAX for "to the end of the file".
    pub end: i64,
    /// `s_dev` (kernel encoding).
    pub dev: u32,
    /// `fl_pid`: the requesting process (tgid).
    pub pid: u32,
    /// `fl_flags`.
    pub flags: u32,
    /// 0 or -errno, or FILE_LOCK_DEFERRED (always 0 for leases).
    pub ret: i32,
    /// The process the tracepoint ran in.
    pub tgid: u32,
    /// `fl_type`.
    pub ty: u32,
    /// [`lock_src`].
    pub source: u32,
    /// 1 if the current process belongs to the tree.
    pub tree: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, integers only with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::LockInode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LockEvent {}
}
