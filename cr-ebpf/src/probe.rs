//! Programs that exist only so that `cr check` can prove a feature works on this kernel.
//!
//! `cr_probe_tc` is a pass-through tc classifier that counts the packets it sees in
//! CR_PROBE_TC. `cr check` attaches it to `lo` inside a private network namespace, sends one
//! datagram and expects the count to move: that shows tc BPF programs load, attach to a clsact
//! qdisc and run, which the eBPF network lock (--tcp-established) relies on.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};

/// Packets seen by `cr_probe_tc` (one slot).
#[map(name = "CR_PROBE_TC")]
static CR_PROBE_TC: Array<u64> = Array::with_max_entries(1, 0);

#[classifier]
pub fn cr_probe_tc(_ctx: TcContext) -> i32 {
    if let Some(p) = CR_PROBE_TC.get_ptr_mut(0) {
        // SAFETY: slot 0 of a one-slot array; a lost increment under a race only lowers the
        // count, and the probe only checks that it moved.
        unsafe { *p += 1 };
    }
    TC_ACT_OK as i32
}
