//! Write-fault tracker: exceptions:page_fault_user and exceptions:page_fault_kernel.
//!
//! Every write fault taken by a tracked process (key: tgid in CR_TARGETS) is recorded in
//! CR_DIRTY as one page. With userfaultfd async write-protection armed by the user side, the
//! first write to every page after a harvest faults, so CR_DIRTY is the exact dirty set for
//! writes made by the process itself (user mode) and by the kernel on its behalf
//! (copy_to_user: read() into a buffer). A write the map cannot hold is counted in
//! STAT DIRTY_LOST, and the user side then falls back to an exact PAGEMAP_SCAN.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    Global,
};
use aya_log_ebpf::debug;
use cr_common::{
    stat, DirtyEvent, PageInfo, PageKey, TargetInfo, DIRTY_MAX_ENTRIES, DIRTY_RING_BYTES,
    FAULT_ADDRESS_OFFSET, FAULT_ERROR_CODE_OFFSET, PAGE_SHIFT, TARGETS_MAX_ENTRIES, TARGET_F_LOG,
    TARGET_F_RING, TARGET_F_TRACK_WRITES, X86_PF_WRITE,
};

#[map(name = "CR_TARGETS")]
pub(crate) static CR_TARGETS: HashMap<u32, TargetInfo> =
    HashMap::with_max_entries(TARGETS_MAX_ENTRIES, 0);

#[map(name = "CR_DIRTY")]
static CR_DIRTY: HashMap<PageKey, PageInfo> = HashMap::with_max_entries(DIRTY_MAX_ENTRIES, 0);

#[map(name = "CR_DIRTY_RING")]
static CR_DIRTY_RING: RingBuf = RingBuf::with_byte_size(DIRTY_RING_BYTES, 0);

#[map(name = "CR_STATS")]
pub(crate) static CR_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Offsets of `address` and `error_code` in the tracepoint record; the loader overrides them
/// with the values read from tracefs if this kernel's layout differs.
#[unsafe(no_mangle)]
static FAULT_ADDR_OFF: Global<u32> = Global::new(FAULT_ADDRESS_OFFSET);
#[unsafe(no_mangle)]
static FAULT_ERR_OFF: Global<u32> = Global::new(FAULT_ERROR_CODE_OFFSET);

#[tracepoint(category = "exceptions", name = "page_fault_user")]
pub fn cr_fault_user(ctx: TracePointContext) -> u32 {
    on_fault(&ctx, false);
    0
}

#[tracepoint(category = "exceptions", name = "page_fault_kernel")]
pub fn cr_fault_kernel(ctx: TracePointContext) -> u32 {
    on_fault(&ctx, true);
    0
}

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(p) = CR_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; no other program touches it concurrently on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn on_fault(ctx: &TracePointContext, kernel: bool) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the map value is plain data; a concurrent update only changes `epoch`.
    let Some(target) = (unsafe { CR_TARGETS.get(&tgid) }) else {
        return;
    };
    if target.flags & TARGET_F_TRACK_WRITES == 0 {
        return;
    }
    // SAFETY: offsets are checked against this kernel's tracefs format by the loader.
    let (addr, err) = unsafe {
        match (
            ctx.read_at::<u64>(FAULT_ADDR_OFF.load() as usize),
            ctx.read_at::<u64>(FAULT_ERR_OFF.load() as usize),
        ) {
            (Ok(a), Ok(e)) => (a, e),
            _ => {
                bump(stat::DIRTY_LOST);
                return;
            }
        }
    };
    if err & X86_PF_WRITE == 0 {
        bump(stat::READ_FAULTS);
        return;
    }
    let page = addr >> PAGE_SHIFT;
    let ring = target.flags & TARGET_F_RING != 0;
    if ring
        && CR_DIRTY_RING
            .output(
                &DirtyEvent {
                    page,
                    tgid,
                    _pad: 0,
                },
                0,
            )
            .is_err()
    {
        bump(stat::DIRTY_LOST);
        return;
    }
    let key = PageKey {
        page,
        tgid,
        _pad: 0,
    };
    let epoch = target.epoch;
    match CR_DIRTY.get_ptr_mut(&key) {
        Some(v) => {
            // SAFETY: the value lives in the map; a racing writer at worst loses one count.
            unsafe {
                (*v).epoch = epoch;
                (*v).writes += 1;
            }
        }
        None => {
            // With the ring, the hash only serves looks (hotness, tests): a full one loses
            // nothing the harvest needs.
            if CR_DIRTY
                .insert(&key, &PageInfo { epoch, writes: 1 }, 0)
                .is_err()
                && !ring
            {
                bump(stat::DIRTY_LOST);
                return;
            }
        }
    }
    bump(if kernel {
        stat::KERNEL_WRITE_FAULTS
    } else {
        stat::WRITE_FAULTS
    });
    if target.flags & TARGET_F_LOG != 0 {
        debug!(
            ctx,
            "cr: write fault tgid={} addr={:x} kernel={}", tgid, addr, kernel as u8
        );
    }
}
