//! Types shared by `cr-ebpf` (kernel side) and `cr-user` (user side).
//!
//! Everything here is `#[repr(C)]`, padding-free and `Copy`, because the same bytes are read by
//! both sides of a BPF map. Keep fields ordered largest-first and pad explicitly.
#![no_std]

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
    pub const COUNT: u32 = 8;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), Copy, made of integers only, with explicit padding, so
    // every bit pattern is valid.
    unsafe impl aya::Pod for super::TargetInfo {}
    unsafe impl aya::Pod for super::PageKey {}
    unsafe impl aya::Pod for super::PageInfo {}
}
