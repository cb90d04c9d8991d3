//! Types shared by `cr-ebpf` (kernel side) and `cr-user` (user side).
//!
//! Everything here is `#[repr(C)]`, padding-free and `Copy`, because the same bytes are read by
//! both sides of a BPF map. Keep fields ordered largest-first and pad explicitly.
#![no_std]

pub mod lock;
pub mod sock;

/// Page size assumed by the trackers (x86_64).
pub const PAGE_SHIFT: u64 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Names of the maps and programs in the eBPF object, so both sides agree.
pub mod names {
    pub const TARGETS: &str = "CR_TARGETS";
    pub const DIRTY: &str = "CR_DIRTY";
    pub const STATS: &str = "CR_STATS";
    pub const PROG_FAULT_USER: &str = "cr_fault_user";
    pub const PROG_FAULT_KERNEL: &str = "cr_fault_kernel";
    /// `cr check`'s tc probe and its packet counter.
    pub const PROG_PROBE_TC: &str = "cr_probe_tc";
    pub const PROBE_TC: &str = "CR_PROBE_TC";
    /// Per-target counters of the syscall programs ([`super::TrackState`]).
    pub const TRACK: &str = "CR_TRACK";
    /// Ring buffer of write faults of TARGET_F_RING targets ([`super::DirtyEvent`]).
    pub const DIRTY_RING: &str = "CR_DIRTY_RING";
    /// Ring buffer of VMA-changing syscalls ([`super::VmaEvent`]).
    pub const VMA_EVENTS: &str = "CR_VMA_EVENTS";
    /// Processes that opened a target's `/proc/PID/mem` for writing ([`super::MemWriterKey`]).
    pub const MEM_WRITERS: &str = "CR_MEM_WRITERS";
    /// sched:sched_process_exec: a target replaced its address space.
    pub const PROG_EXEC: &str = "cr_exec";
    /// Thread ids of tracked processes (key: tid, value: tgid), for syscalls that name a task.
    pub const TIDS: &str = "CR_TIDS";
    /// sched:sched_process_fork: a target's new threads (and children) go into CR_TIDS.
    pub const PROG_FORK: &str = "cr_fork";
    /// Syscall tracepoint programs: (program, syscall) pairs, attached to
    /// `syscalls:sys_enter_SYSCALL`.
    pub const SYSCALL_PROGS: &[(&str, &str)] = &[
        ("cr_sys_mmap", "mmap"),
        ("cr_sys_munmap", "munmap"),
        ("cr_sys_mprotect", "mprotect"),
        ("cr_sys_pkey_mprotect", "pkey_mprotect"),
        ("cr_sys_mremap", "mremap"),
        ("cr_sys_brk", "brk"),
        ("cr_sys_madvise", "madvise"),
        ("cr_sys_mlock", "mlock"),
        ("cr_sys_mlock2", "mlock2"),
        ("cr_sys_mlockall", "mlockall"),
        ("cr_sys_remap_file_pages", "remap_file_pages"),
        ("cr_sys_process_vm_writev", "process_vm_writev"),
        ("cr_sys_ptrace", "ptrace"),
        ("cr_sys_open", "open"),
        ("cr_sys_openat", "openat"),
        ("cr_sys_openat2", "openat2"),
        ("cr_sys_fcntl", "fcntl"),
        ("cr_sys_io_uring_setup", "io_uring_setup"),
        ("cr_sys_io_setup", "io_setup"),
        ("cr_sys_io_submit", "io_submit"),
    ];
}

/// Capacity of the dirty-page map. A full map is detected (STAT_DIRTY_LOST) and makes the
/// harvest fall back to an exact PAGEMAP_SCAN.
pub const DIRTY_MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of the target set.
pub const TARGETS_MAX_ENTRIES: u32 = 1024;

/// Offsets of the fields of `exceptions:page_fault_{user,kernel}` in the tracepoint record.
/// The user side checks them against tracefs' `format` file before loading and overrides them
/// if the kernel differs (globals `FAULT_ADDR_OFF` / `FAULT_ERR_OFF`).
pub const FAULT_ADDRESS_OFFSET: u32 = 8;
pub const FAULT_ERROR_CODE_OFFSET: u32 = 24;
/// x86 page-fault error code: the access was a write.
pub const X86_PF_WRITE: u64 = 1 << 1;

/// Value in CR_TARGETS: per tracked process (key: tgid as u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetInfo {
    /// Tracking epoch; bumped by the user side at each harvest. Entries of DIRTY carry the epoch
    /// in which they were last written.
    pub epoch: u64,
    /// Bit flags (TARGET_F_*).
    pub flags: u64,
}

/// Record faults of this target in DIRTY.
pub const TARGET_F_TRACK_WRITES: u64 = 1 << 0;
/// Log every recorded fault with aya-log (debugging; costly).
pub const TARGET_F_LOG: u64 = 1 << 1;
/// Also queue every write fault in CR_DIRTY_RING ([`DirtyEvent`]); the ring, not CR_DIRTY, is
/// then the complete record (a full ring counts DIRTY_LOST, a full CR_DIRTY does not): taking
/// the set is a read of the ring, O(faults) at memory speed, instead of a walk of the hash.
pub const TARGET_F_RING: u64 = 1 << 2;

/// One record of CR_DIRTY_RING: a write fault of a target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyEvent {
    /// Page number (vaddr >> PAGE_SHIFT).
    pub page: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// Default size of CR_DIRTY_RING in bytes (the loader sizes it to the target).
pub const DIRTY_RING_BYTES: u32 = 1 << 20;

/// Key of CR_DIRTY: one written page of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PageKey {
    /// Page number (vaddr >> PAGE_SHIFT).
    pub page: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// Value of CR_DIRTY.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageInfo {
    /// Epoch of the last write seen.
    pub epoch: u64,
    /// Number of write faults seen on the page (hotness).
    pub writes: u64,
}

/// Offset of the first argument in a `syscalls:sys_enter_*` record (after the common header
/// and `__syscall_nr`); argument `i` is at `SYSCALL_ARG0_OFFSET + 8 * i`. The user side checks
/// this against tracefs for every syscall tracepoint it attaches.
pub const SYSCALL_ARG0_OFFSET: u32 = 16;

/// Value of CR_TRACK (key: tgid): what the syscall programs saw of one target, as counters
/// that only grow. The eBPF side only increments (a lost increment under a race still moves
/// the counter); the user side compares snapshots taken at checkpoints, so "did this happen
/// since the last checkpoint" is `now != then`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackState {
    /// Syscalls by the target that change its VMAs or populate pages without a fault in its
    /// context (mmap MAP_FIXED, munmap, mprotect, mremap, brk, madvise, mlock*): each also
    /// queues a [`VmaEvent`].
    pub vma_events: u64,
    /// Syscalls that may write the target's memory without a page fault in its context:
    /// process_vm_writev or PTRACE_POKE* against it, io_submit by it.
    pub gup_events: u64,
    /// Lasting ways to do so set up by the target: O_DIRECT opens or F_SETFL, io_uring and
    /// AIO contexts.
    pub sticky_events: u64,
    /// Successful execve: the address space was replaced.
    pub exec_events: u64,
    /// Syscall number of the last gup or sticky event (for the log).
    pub last_unsafe_nr: u64,
}

/// What a [`VmaEvent`] reports.
pub mod vma_ev {
    /// `[start, end)` changed (unmapped, remapped, protection, advice, populated).
    pub const RANGE: u32 = 0;
    /// brk moved to `start`: the heap's end changed.
    pub const BRK: u32 = 1;
    /// mlockall: any range may have been populated.
    pub const ALL: u32 = 2;
}

/// One record of CR_VMA_EVENTS (a ring buffer): a VMA-changing syscall of a target, recorded
/// at syscall entry with its timestamp (CLOCK_MONOTONIC, bpf_ktime_get_ns) so the user side
/// can tell the target's own calls from the remote calls cr makes while the target is frozen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmaEvent {
    pub ts_ns: u64,
    pub start: u64,
    pub end: u64,
    /// Syscall number.
    pub nr: u32,
    /// `vma_ev::*`.
    pub kind: u32,
    pub tgid: u32,
    pub _pad: u32,
}

/// Size of CR_VMA_EVENTS in bytes (a power of two, a multiple of the page size). Overflow is
/// counted (stat::VMA_LOST) and makes the harvest scan everything.
pub const VMA_EVENTS_BYTES: u32 = 256 * 1024;

/// Key of CR_MEM_WRITERS: `opener` opened `/proc/<target>/mem` (or a path ending in `/mem`
/// the programs could not attribute: `target` 0) for writing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemWriterKey {
    pub target: u32,
    pub opener: u32,
}

/// Capacity of CR_TIDS. A full map only means a task id is not recognized as a target's.
pub const TIDS_MAX_ENTRIES: u32 = 16384;

/// Offset of `child_pid` (4 bytes) in a `sched:sched_process_fork` record; the user side checks
/// it against tracefs and overrides the global `FORK_CHILD_PID_OFF` when the kernel differs.
pub const FORK_CHILD_PID_OFFSET: u32 = 20;

/// Capacity of CR_MEM_WRITERS; a full map is counted (stat::MEM_WRITERS_LOST).
pub const MEM_WRITERS_MAX_ENTRIES: u32 = 1024;

/// Indices into CR_STATS (a per-CPU array of u64 counters).
pub mod stat {
    /// Write faults recorded.
    pub const WRITE_FAULTS: u32 = 0;
    /// Write faults that could not be recorded (map full): the dirty set is incomplete.
    pub const DIRTY_LOST: u32 = 1;
    /// Read faults of tracked processes (seen, not recorded).
    pub const READ_FAULTS: u32 = 2;
    /// Kernel-mode write faults (copy_to_user and friends) recorded.
    pub const KERNEL_WRITE_FAULTS: u32 = 3;
    /// VMA events that did not fit in CR_VMA_EVENTS.
    pub const VMA_LOST: u32 = 4;
    /// /proc/PID/mem openers that did not fit in CR_MEM_WRITERS.
    pub const MEM_WRITERS_LOST: u32 = 5;
    /// Events of a target without a CR_TRACK entry (the user side creates one per target).
    pub const TRACK_MISSING: u32 = 6;
    pub const COUNT: u32 = 8;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), Copy, made of integers only, with explicit padding, so
    // every bit pattern is valid.
    unsafe impl aya::Pod for super::TargetInfo {}
    unsafe impl aya::Pod for super::PageKey {}
    unsafe impl aya::Pod for super::PageInfo {}
    // SAFETY: as above (integers only, explicit padding).
    unsafe impl aya::Pod for super::TrackState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VmaEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DirtyEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MemWriterKey {}
}
