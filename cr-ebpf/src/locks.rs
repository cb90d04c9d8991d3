//! The tracker's file-lock events (filelock:*). See cr-common/src/lock.rs.
//!
//! Every lock request that reaches the kernel's lock lists passes a filelock tracepoint with
//! its owner, range, type and result. A request is queued in CR_LOCK_EVENTS when the current
//! process belongs to the tracked tree (CR_LOCK_TREE) or when its inode is one the tree locked
//! (CR_LOCK_INODES): a release may run outside the tree (the last close of a description the
//! tree shared, an exiting process already taken out of CR_LOCK_TREE). A successful request of
//! the tree adds its inode to CR_LOCK_INODES; the user side removes inodes that hold nothing.
//! The fork and exit programs keep CR_LOCK_TREE equal to the tree's live processes and threads.
//!
//! Field offsets are the compiled-in `lock_off` values; the user side checks them against
//! tracefs and does not attach the programs when they differ.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use cr_common::lock::{
    lock_off, lock_src, lock_stat, LockEvent, LockInode, FL_ACCESS, F_UNLCK, LOCK_EVENTS_BYTES,
    LOCK_INODES_MAX, LOCK_TREE_MAX,
};

#[map(name = "CR_LOCK_EVENTS")]
static CR_LOCK_EVENTS: RingBuf = RingBuf::with_byte_size(LOCK_EVENTS_BYTES, 0);

/// Both hash maps are allocated as they fill (they hold a handful of entries): every load of
/// the object (tracker, network lock, `cr check`) would otherwise pay for their full size.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "CR_LOCK_TREE")]
static CR_LOCK_TREE: HashMap<u32, u32> =
    HashMap::with_max_entries(LOCK_TREE_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CR_LOCK_INODES")]
static CR_LOCK_INODES: HashMap<LockInode, u32> =
    HashMap::with_max_entries(LOCK_INODES_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CR_LOCK_STATS")]
static CR_LOCK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(lock_stat::COUNT, 0);

/// bpf_ringbuf_output/query flags (include/uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Queues an event. The tracker is woken only once the ring is half full (it also drains
/// on its own every quarter second and before answering a dump): a process taking locks in a
/// loop does not wake another process at every call.
#[inline(always)]
fn queue(ev: &LockEvent) {
    let wake = if CR_LOCK_EVENTS.query(BPF_RB_AVAIL_DATA) > (LOCK_EVENTS_BYTES / 2) as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if CR_LOCK_EVENTS.output(ev, wake).is_err() {
        bump(lock_stat::LOST);
    } else {
        bump(lock_stat::EVENTS);
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = CR_LOCK_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; no other program touches it concurrently on this CPU.
        unsafe { *p += 1 };
    }
}

// Membership is read as the stored value (always 1), not as "the lookup returned a pointer":
// LLVM may otherwise fold `a || ptr != null` into an OR on the pointer, which the verifier
// refuses.
#[inline(always)]
fn in_tree(id: u32) -> bool {
    // SAFETY: read-only look at a plain-data map value.
    id != 0 && unsafe { CR_LOCK_TREE.get(&id) }.copied().unwrap_or(0) != 0
}

#[inline(always)]
fn inode_followed(key: &LockInode) -> bool {
    // SAFETY: read-only look at a plain-data map value.
    unsafe { CR_LOCK_INODES.get(key) }.copied().unwrap_or(0) != 0
}

/// Reads a record field (0 when unreadable: the checked layout makes that not happen).
#[inline(always)]
fn field<T: Default>(ctx: &TracePointContext, off: u32) -> T {
    // SAFETY: the offset lies inside the record (layout checked against tracefs).
    unsafe { ctx.read_at::<T>(off as usize) }.unwrap_or_default()
}

#[tracepoint(category = "filelock", name = "posix_lock_inode")]
pub fn cr_lock_posix(ctx: TracePointContext) -> u32 {
    on_lock(&ctx, lock_src::POSIX);
    0
}

#[tracepoint(category = "filelock", name = "flock_lock_inode")]
pub fn cr_lock_flock(ctx: TracePointContext) -> u32 {
    on_lock(&ctx, lock_src::FLOCK);
    0
}

#[inline(always)]
fn on_lock(ctx: &TracePointContext, source: u32) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let tree = in_tree(tgid);
    let key = LockInode {
        ino: field(ctx, lock_off::INO),
        dev: field(ctx, lock_off::DEV),
        _pad: 0,
    };
    let known = inode_followed(&key);
    if !tree && !known {
        return;
    }
    let ty = field::<u8>(ctx, lock_off::TYPE) as u32;
    let ret: i32 = field(ctx, lock_off::RET);
    let flags: u32 = field(ctx, lock_off::FLAGS);
    let ev = LockEvent {
        owner: field(ctx, lock_off::OWNER),
        ino: key.ino,
        start: field(ctx, lock_off::START),
        end: field(ctx, lock_off::END),
        dev: key.dev,
        pid: field(ctx, lock_off::PID),
        flags,
        ret,
        tgid,
        ty,
        source,
        tree: tree as u32,
    };
    queue(&ev);
    // Queued first, then the inode: the user side, pruning an inode it saw empty, drains the
    // ring again after removing it and puts back any inode an event arrived for meanwhile.
    if tree && !known && ret == 0 && ty != F_UNLCK && flags & FL_ACCESS == 0 {
        if CR_LOCK_INODES.insert(&key, &1, 0).is_err() {
            bump(lock_stat::INODES_LOST);
        }
    }
}

#[tracepoint(category = "filelock", name = "generic_add_lease")]
pub fn cr_lock_lease(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !in_tree(tgid) {
        return 0;
    }
    let ev = LockEvent {
        owner: field(&ctx, lock_off::LEASE_OWNER),
        ino: field(&ctx, lock_off::LEASE_INO),
        dev: field(&ctx, lock_off::LEASE_DEV),
        pid: tgid,
        flags: field(&ctx, lock_off::LEASE_FLAGS),
        ty: field::<u8>(&ctx, lock_off::LEASE_TYPE) as u32,
        tgid,
        source: lock_src::LEASE,
        tree: 1,
        ..LockEvent::default()
    };
    queue(&ev);
    0
}

/// A new task of a tree process (a child process or a thread) joins the tree.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn cr_lock_fork(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !in_tree(tgid) {
        return 0;
    }
    let child: i32 = field(&ctx, lock_off::FORK_CHILD_PID);
    if child > 0 && CR_LOCK_TREE.insert(&(child as u32), &1, 0).is_err() {
        bump(lock_stat::TREE_LOST);
    }
    0
}

/// A task of the tree exits: a thread leaves the tree, and its process with the last one. The
/// releases of its exit (its fds are closed after this tracepoint) pass by their inode.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn cr_lock_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    if tid != tgid {
        let _ = CR_LOCK_TREE.remove(&tid);
    }
    if field::<u8>(&ctx, lock_off::EXIT_GROUP_DEAD) != 0 {
        let _ = CR_LOCK_TREE.remove(&tgid);
    }
    0
}
