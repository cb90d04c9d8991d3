//! Syscall programs: what a tracked process (or someone acting on it) does that the write-fault
//! programs cannot see.
//!
//! The fault programs see every write that takes a hardware page fault in the target's
//! context. Two things escape them, and both make an incremental harvest wrong if ignored:
//! - VMA changes: munmap, mremap, MAP_FIXED mmap, brk, madvise(DONTNEED/FREE/POPULATE_WRITE),
//!   mprotect, mlock (which populates writable memory through GUP, without a fault). Each
//!   queues a [`VmaEvent`] with its range in CR_VMA_EVENTS; the user side re-scans those ranges
//!   exactly.
//! - Writes through GUP: process_vm_writev or PTRACE_POKE* against a target, `/proc/PID/mem`
//!   opened for writing (by anyone, the target included), O_DIRECT, io_uring and AIO. They
//!   bump counters in CR_TRACK (and CR_MEM_WRITERS records who holds a mem fd); a moved counter
//!   makes the next harvest an exact PAGEMAP_SCAN.
//!
//! Every program reads its arguments at the fixed `sys_enter_*` layout (argument i at
//! SYSCALL_ARG0_OFFSET + 8*i), which the user side checks against tracefs before attaching.

use aya_ebpf::Global;
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes,
    },
    macros::{map, tracepoint},
    maps::{HashMap, RingBuf},
    programs::TracePointContext,
};
use cr_common::{
    stat, vma_ev, MemWriterKey, TrackState, VmaEvent, FORK_CHILD_PID_OFFSET,
    MEM_WRITERS_MAX_ENTRIES, SYSCALL_ARG0_OFFSET, TARGETS_MAX_ENTRIES, TIDS_MAX_ENTRIES,
    VMA_EVENTS_BYTES,
};

use crate::fault::{bump, CR_TARGETS};

#[map(name = "CR_TRACK")]
static CR_TRACK: HashMap<u32, TrackState> = HashMap::with_max_entries(TARGETS_MAX_ENTRIES, 0);

#[map(name = "CR_VMA_EVENTS")]
static CR_VMA_EVENTS: RingBuf = RingBuf::with_byte_size(VMA_EVENTS_BYTES, 0);

#[map(name = "CR_MEM_WRITERS")]
static CR_MEM_WRITERS: HashMap<MemWriterKey, u64> =
    HashMap::with_max_entries(MEM_WRITERS_MAX_ENTRIES, 0);

/// Task ids of targets' threads (and of their children: conservative) → the target's tgid.
#[map(name = "CR_TIDS")]
static CR_TIDS: HashMap<u32, u32> = HashMap::with_max_entries(TIDS_MAX_ENTRIES, 0);

/// Offset of `child_pid` in sched_process_fork records (patched by the loader from tracefs).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFF: Global<u32> = Global::new(FORK_CHILD_PID_OFFSET);

const MAP_FIXED: u64 = 0x10;
const MREMAP_FIXED: u64 = 2;
const PTRACE_POKETEXT: u64 = 4;
const PTRACE_POKEDATA: u64 = 5;
const F_SETFL: u64 = 4;
const O_ACCMODE: u64 = 3;
const O_DIRECT: u64 = 0o40000;
const PAGE_MASK: u64 = !0xfff;

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn is_target(tgid: u32) -> bool {
    // SAFETY: read-only look at a plain-data map value.
    tgid != 0 && unsafe { CR_TARGETS.get(&tgid) }.is_some()
}

/// The target a task id (as a syscall names it: any thread) belongs to, if any.
#[inline(always)]
fn target_of(tid: u32) -> Option<u32> {
    if is_target(tid) {
        return Some(tid);
    }
    // SAFETY: read-only look at a plain-data map value.
    let t = unsafe { CR_TIDS.get(&tid) }.copied()?;
    is_target(t).then_some(t)
}

/// Syscall argument `i` (0 if the record cannot be read: callers treat 0 conservatively).
#[inline(always)]
fn arg(ctx: &TracePointContext, i: usize) -> u64 {
    // SAFETY: the offset is inside every sys_enter record with at least i+1 arguments (checked
    // against tracefs by the user side for each program).
    unsafe { ctx.read_at::<u64>(SYSCALL_ARG0_OFFSET as usize + 8 * i) }.unwrap_or(0)
}

#[inline(always)]
fn syscall_nr(ctx: &TracePointContext) -> u32 {
    // SAFETY: `__syscall_nr` sits at offset 8 of every sys_enter record.
    unsafe { ctx.read_at::<i32>(8) }.unwrap_or(-1) as u32
}

/// Applies `f` to the CR_TRACK entry of `tgid` (created by the user side with the target).
#[inline(always)]
fn with_track(tgid: u32, f: impl FnOnce(&mut TrackState)) {
    match CR_TRACK.get_ptr_mut(&tgid) {
        // SAFETY: the value lives in the map; concurrent increments may lose a count, which
        // still leaves the counter moved (all the user side asks).
        Some(t) => f(unsafe { &mut *t }),
        None => bump(stat::TRACK_MISSING),
    }
}

/// A VMA-changing syscall of the current process, if it is a target.
#[inline(always)]
fn vma_event(ctx: &TracePointContext, kind: u32, start: u64, end: u64) {
    let tgid = current_tgid();
    if !is_target(tgid) {
        return;
    }
    with_track(tgid, |t| t.vma_events += 1);
    let ev = VmaEvent {
        // SAFETY: no arguments, no memory access.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        start: start & PAGE_MASK,
        end: end.saturating_add(0xfff) & PAGE_MASK,
        nr: syscall_nr(ctx),
        kind,
        tgid,
        _pad: 0,
    };
    if CR_VMA_EVENTS.output(&ev, 0).is_err() {
        bump(stat::VMA_LOST);
    }
}

/// `[a0, a0 + a1)`: the usual (start, len) pair.
#[inline(always)]
fn range_event(ctx: &TracePointContext) {
    let start = arg(ctx, 0);
    let len = arg(ctx, 1);
    vma_event(ctx, vma_ev::RANGE, start, start.saturating_add(len));
}

#[tracepoint(category = "syscalls", name = "sys_enter_mmap")]
pub fn cr_sys_mmap(ctx: TracePointContext) -> u32 {
    // Only MAP_FIXED replaces existing memory; any other mmap makes a new VMA, which the user
    // side finds unregistered anyway.
    if arg(&ctx, 3) & MAP_FIXED != 0 {
        range_event(&ctx);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_munmap")]
pub fn cr_sys_munmap(ctx: TracePointContext) -> u32 {
    range_event(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_mprotect")]
pub fn cr_sys_mprotect(ctx: TracePointContext) -> u32 {
    range_event(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_pkey_mprotect")]
pub fn cr_sys_pkey_mprotect(ctx: TracePointContext) -> u32 {
    range_event(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_madvise")]
pub fn cr_sys_madvise(ctx: TracePointContext) -> u32 {
    range_event(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_mlock")]
pub fn cr_sys_mlock(ctx: TracePointContext) -> u32 {
    range_event(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_mlock2")]
pub fn cr_sys_mlock2(ctx: TracePointContext) -> u32 {
    range_event(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_remap_file_pages")]
pub fn cr_sys_remap_file_pages(ctx: TracePointContext) -> u32 {
    range_event(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_mremap")]
pub fn cr_sys_mremap(ctx: TracePointContext) -> u32 {
    let (addr, old_len, new_len, flags, new_addr) = (
        arg(&ctx, 0),
        arg(&ctx, 1),
        arg(&ctx, 2),
        arg(&ctx, 3),
        arg(&ctx, 4),
    );
    // The old range (it may grow in place up to new_len) and, with MREMAP_FIXED, whatever
    // the new range replaces.
    let len = if new_len > old_len { new_len } else { old_len };
    vma_event(&ctx, vma_ev::RANGE, addr, addr.saturating_add(len));
    if flags & MREMAP_FIXED != 0 {
        vma_event(
            &ctx,
            vma_ev::RANGE,
            new_addr,
            new_addr.saturating_add(new_len),
        );
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_brk")]
pub fn cr_sys_brk(ctx: TracePointContext) -> u32 {
    let brk = arg(&ctx, 0);
    if brk != 0 {
        vma_event(&ctx, vma_ev::BRK, brk, brk);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_mlockall")]
pub fn cr_sys_mlockall(ctx: TracePointContext) -> u32 {
    vma_event(&ctx, vma_ev::ALL, 0, 0);
    0
}

/// A syscall that may write `tgid`'s memory without a fault in its context.
#[inline(always)]
fn gup_event(ctx: &TracePointContext, tgid: u32) {
    let nr = syscall_nr(ctx) as u64;
    with_track(tgid, |t| {
        t.gup_events += 1;
        t.last_unsafe_nr = nr;
    });
}

/// The target set up a lasting way to have its memory written without faults.
#[inline(always)]
fn sticky_event(ctx: &TracePointContext, tgid: u32) {
    let nr = syscall_nr(ctx) as u64;
    with_track(tgid, |t| {
        t.sticky_events += 1;
        t.last_unsafe_nr = nr;
    });
}

#[tracepoint(category = "syscalls", name = "sys_enter_process_vm_writev")]
pub fn cr_sys_process_vm_writev(ctx: TracePointContext) -> u32 {
    if let Some(t) = target_of(arg(&ctx, 0) as u32) {
        gup_event(&ctx, t);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_ptrace")]
pub fn cr_sys_ptrace(ctx: TracePointContext) -> u32 {
    let req = arg(&ctx, 0);
    if req == PTRACE_POKETEXT || req == PTRACE_POKEDATA {
        if let Some(t) = target_of(arg(&ctx, 1) as u32) {
            gup_event(&ctx, t);
        }
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_io_submit")]
pub fn cr_sys_io_submit(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if is_target(tgid) {
        gup_event(&ctx, tgid);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_io_uring_setup")]
pub fn cr_sys_io_uring_setup(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if is_target(tgid) {
        sticky_event(&ctx, tgid);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_io_setup")]
pub fn cr_sys_io_setup(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if is_target(tgid) {
        sticky_event(&ctx, tgid);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_fcntl")]
pub fn cr_sys_fcntl(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 1) == F_SETFL && arg(&ctx, 2) & O_DIRECT != 0 {
        let tgid = current_tgid();
        if is_target(tgid) {
            sticky_event(&ctx, tgid);
        }
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_open")]
pub fn cr_sys_open(ctx: TracePointContext) -> u32 {
    on_open(&ctx, arg(&ctx, 0), arg(&ctx, 1));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat")]
pub fn cr_sys_openat(ctx: TracePointContext) -> u32 {
    on_open(&ctx, arg(&ctx, 1), arg(&ctx, 2));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat2")]
pub fn cr_sys_openat2(ctx: TracePointContext) -> u32 {
    let how = arg(&ctx, 2) as *const u64;
    // struct open_how starts with `u64 flags`. Unreadable: assume the worst (read-write).
    // SAFETY: a user pointer read through the helper, which handles faults.
    let flags = unsafe { bpf_probe_read_user(how) }.unwrap_or(2);
    on_open(&ctx, arg(&ctx, 1), flags);
    0
}

/// Length of the path prefix read from user memory: enough for `/proc/PID/task/TID/mem`.
const PATH_READ: usize = 48;

/// open/openat/openat2: O_DIRECT by a target, or a `.../mem` file opened for writing by anyone.
#[inline(always)]
fn on_open(ctx: &TracePointContext, path: u64, flags: u64) {
    let tgid = current_tgid();
    if flags & O_DIRECT != 0 && is_target(tgid) {
        sticky_event(ctx, tgid);
    }
    if flags & O_ACCMODE == 0 {
        return;
    }
    let mut buf = [0u8; PATH_READ];
    // SAFETY: a user pointer read through the helper, which handles faults.
    let Ok(p) = (unsafe { bpf_probe_read_user_str_bytes(path as *const u8, &mut buf) }) else {
        return;
    };
    let Some(named) = mem_path_target(p, tgid) else {
        return;
    };
    let target = if named == 0 {
        0
    } else {
        match target_of(named) {
            Some(t) => t,
            None => return,
        }
    };
    let key = MemWriterKey {
        target,
        opener: tgid,
    };
    match CR_MEM_WRITERS.get_ptr_mut(&key) {
        // SAFETY: the value lives in the map; a lost increment is harmless.
        Some(c) => unsafe { *c += 1 },
        None => {
            if CR_MEM_WRITERS.insert(&key, &1, 0).is_err() {
                bump(stat::MEM_WRITERS_LOST);
            }
        }
    }
}

/// If `p` names a process's `mem` file: `Some(pid)` (the opener's for `self`/`thread-self`),
/// or `Some(0)` when it ends in `/mem` but the process cannot be told (relative paths,
/// unusual spellings); `None` otherwise.
#[inline(always)]
fn mem_path_target(p: &[u8], opener: u32) -> Option<u32> {
    let n = p.len();
    let ends_mem = n >= 3
        && p.get(n.wrapping_sub(3)) == Some(&b'm')
        && p.get(n.wrapping_sub(2)) == Some(&b'e')
        && p.get(n.wrapping_sub(1)) == Some(&b'm')
        && (n == 3 || p.get(n.wrapping_sub(4)) == Some(&b'/'));
    if !ends_mem {
        return None;
    }
    // Truncated reads (a path longer than PATH_READ) also end up here only if they happened
    // to end in "/mem"; anything else is ignored, like any other file.
    const PROC: &[u8; 6] = b"/proc/";
    let mut i = 0;
    while i < 6 {
        if p.get(i) != PROC.get(i) {
            return Some(0);
        }
        i += 1;
    }
    if p.get(6) == Some(&b's') || p.get(6) == Some(&b't') {
        // "self/..." or "thread-self/...".
        return Some(opener);
    }
    let mut pid: u32 = 0;
    let mut digits = 0;
    let mut j = 6;
    while j < 6 + 10 {
        match p.get(j) {
            Some(&c) if c.is_ascii_digit() => {
                pid = pid.wrapping_mul(10).wrapping_add((c - b'0') as u32);
                digits += 1;
            }
            Some(&b'/') => break,
            _ => return Some(0),
        }
        j += 1;
    }
    if digits == 0 {
        return Some(0);
    }
    Some(pid)
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn cr_exec(_ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if is_target(tgid) {
        with_track(tgid, |t| t.exec_events += 1);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn cr_fork(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if !is_target(tgid) {
        return 0;
    }
    // SAFETY: the offset is checked against this kernel's tracefs format by the loader.
    if let Ok(child) = unsafe { ctx.read_at::<i32>(FORK_CHILD_PID_OFF.load() as usize) } {
        // A full map only means this task id is not recognized later: nothing to count.
        let _ = CR_TIDS.insert(&(child as u32), &tgid, 0);
    }
    0
}
