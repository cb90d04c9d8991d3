//! The tracker's TCP socket table (sock:inet_sock_set_state). See cr-common/src/sock.rs.
//!
//! `inet_sock_set_state` fires for every TCP state change of the machine, often in softirq
//! context where the current task is whoever happened to be interrupted (on loopback, often a
//! target sending to a peer). So the current pid is trusted only where a state change can only
//! come from a syscall of the socket's owner: leaving TCP_CLOSE (connect → SYN_SENT,
//! listen → LISTEN). A socket attributed then is followed by its kernel address (CR_SOCK_PTRS)
//! whatever the context of its later changes; a listener's new connection is attributed to the
//! target owning the listener (CR_SOCK_LISTENERS), at the clone event, whose record still
//! carries the listener's address. Sockets the targets had before the tracker started are
//! seeded by the user side from a scan and adopted by their 4-tuple at their first event.
//!
//! Entering TCP_CLOSE removes a socket. A socket's entry in CR_SOCKS appears once its 4-tuple
//! is complete (a connect's local port is chosen after SYN_SENT: the entry appears at
//! ESTABLISHED). A map too full for an entry counts LOST: the user side then scans instead.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
    Global,
};
use cr_common::sock::{
    sock_stat, tcp_state, ListenKey, SockInfo, SockKey, SockLayout, SockPtr, AF_INET, AF_INET6,
    IPPROTO_TCP, LISTENERS_MAX_ENTRIES, SOCKS_MAX_ENTRIES, SOCK_F_CHILD, SOCK_F_IN_TABLE,
    SOCK_F_SEEDED, SOCK_PROCS_MAX_ENTRIES,
};

use crate::fault::CR_TARGETS;

#[map(name = "CR_SOCKS")]
static CR_SOCKS: HashMap<SockKey, SockInfo> = HashMap::with_max_entries(SOCKS_MAX_ENTRIES, 0);

#[map(name = "CR_SOCK_PTRS")]
static CR_SOCK_PTRS: HashMap<u64, SockPtr> = HashMap::with_max_entries(SOCKS_MAX_ENTRIES, 0);

#[map(name = "CR_SOCK_LISTENERS")]
static CR_SOCK_LISTENERS: HashMap<ListenKey, u32> =
    HashMap::with_max_entries(LISTENERS_MAX_ENTRIES, 0);

#[map(name = "CR_SOCK_PROCS")]
static CR_SOCK_PROCS: HashMap<u32, u32> = HashMap::with_max_entries(SOCK_PROCS_MAX_ENTRIES, 0);

#[map(name = "CR_SOCK_STATS")]
static CR_SOCK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(sock_stat::COUNT, 0);

/// Field offsets of the records read here (patched by the loader from tracefs).
#[unsafe(no_mangle)]
static SOCK_LAYOUT: Global<SockLayout> = Global::new(SockLayout::DEFAULT);

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = CR_SOCK_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; no other program touches it concurrently on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn rd<T>(ctx: &TracePointContext, off: u32) -> Option<T> {
    // SAFETY: a read of the tracepoint record through the probe-read helper, which fails
    // cleanly past its end; offsets are checked against tracefs by the user side.
    unsafe { ctx.read_at::<T>(off as usize) }.ok()
}

#[inline(always)]
fn is_target(tgid: u32) -> bool {
    // SAFETY: read-only look at a plain-data map value.
    tgid != 0 && unsafe { CR_TARGETS.get(&tgid) }.is_some()
}

/// The current process's target (the target whose tree it belongs to, or itself), or 0.
/// A child of a tracked tree may itself be a target of the dirty-page programs (every
/// process of a tree is tracked): its sockets still belong to its tree's table, so the tree
/// it was recorded in (CR_SOCK_PROCS) comes first.
#[inline(always)]
fn current_target() -> (u32, u32) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: read-only look at a plain-data map value.
    if let Some(&t) = unsafe { CR_SOCK_PROCS.get(&tgid) } {
        if is_target(t) {
            return (t, tgid);
        }
    }
    if is_target(tgid) {
        return (tgid, tgid);
    }
    (0, tgid)
}

/// One state change of a TCP socket.
struct Change {
    sk: u64,
    old: u32,
    new: u32,
    key: SockKey,
}

#[inline(always)]
fn read_change(ctx: &TracePointContext, l: &SockLayout) -> Option<Change> {
    let sk: u64 = rd(ctx, l.skaddr)?;
    let old: i32 = rd(ctx, l.oldstate)?;
    let new: i32 = rd(ctx, l.newstate)?;
    let family: u16 = rd(ctx, l.family)?;
    let mut key = SockKey {
        lport: rd(ctx, l.sport)?,
        rport: rd(ctx, l.dport)?,
        family,
        ..SockKey::default()
    };
    if family == AF_INET {
        let s: [u8; 4] = rd(ctx, l.saddr)?;
        let d: [u8; 4] = rd(ctx, l.daddr)?;
        key.laddr[0] = s[0];
        key.laddr[1] = s[1];
        key.laddr[2] = s[2];
        key.laddr[3] = s[3];
        key.raddr[0] = d[0];
        key.raddr[1] = d[1];
        key.raddr[2] = d[2];
        key.raddr[3] = d[3];
    } else if family == AF_INET6 {
        key.laddr = rd(ctx, l.saddr_v6)?;
        key.raddr = rd(ctx, l.daddr_v6)?;
    } else {
        return None;
    }
    Some(Change {
        sk,
        old: old as u32,
        new: new as u32,
        key,
    })
}

#[inline(always)]
fn listen_key(k: &SockKey, wildcard: bool) -> ListenKey {
    ListenKey {
        addr: if wildcard { [0u8; 16] } else { k.laddr },
        port: k.lport,
        family: k.family,
        _pad: 0,
    }
}

/// The target owning the listener on `k`'s local address and port (exact, then wildcard).
#[inline(always)]
fn listener_owner(k: &SockKey) -> u32 {
    // SAFETY: read-only looks at plain-data map values.
    unsafe {
        if let Some(&t) = CR_SOCK_LISTENERS.get(&listen_key(k, false)) {
            return t;
        }
        if let Some(&t) = CR_SOCK_LISTENERS.get(&listen_key(k, true)) {
            return t;
        }
    }
    0
}

/// Removes `k` from the table if the entry is socket `sk`'s (or an unclaimed seeded one).
#[inline(always)]
fn remove_entry(k: &SockKey, sk: u64) {
    // SAFETY: read-only look at a plain-data map value.
    let mine = match unsafe { CR_SOCKS.get(k) } {
        Some(i) => i.skaddr == sk || i.skaddr == 0,
        None => false,
    };
    if mine {
        let _ = CR_SOCKS.remove(k);
    }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn cr_sock_state(ctx: TracePointContext) -> u32 {
    bump(sock_stat::EVENTS);
    let l = SOCK_LAYOUT.load();
    match rd::<u16>(&ctx, l.protocol) {
        Some(p) if p == IPPROTO_TCP => {}
        Some(_) => return 0,
        None => {
            bump(sock_stat::READ_ERRORS);
            return 0;
        }
    }
    match read_change(&ctx, &l) {
        Some(c) => on_change(&c),
        None => bump(sock_stat::READ_ERRORS),
    }
    0
}

#[inline(always)]
fn on_change(c: &Change) {
    // Whose socket, and where the table has it now.
    let owner: u32;
    let mut pid = 0u32;
    let mut flags = 0u32;
    let mut prev: Option<SockKey> = None;
    // SAFETY: a copy of a plain-data map value.
    let known = unsafe { CR_SOCK_PTRS.get(&c.sk) }.copied();
    if let Some(p) = known {
        let stale =
            p.state != c.old || (c.old == tcp_state::LISTEN && c.new == tcp_state::SYN_RECV);
        if stale {
            // Not the socket we followed: its last events were lost, or it was freed unseen
            // and this is a new socket at the same address.
            bump(sock_stat::DESYNC);
            if p.flags & SOCK_F_IN_TABLE != 0 {
                remove_entry(&p.key, c.sk);
            }
            let _ = CR_SOCK_PTRS.remove(&c.sk);
        }
    }
    let followed = known.filter(|p| {
        p.state == c.old && !(c.old == tcp_state::LISTEN && c.new == tcp_state::SYN_RECV)
    });
    if c.old == tcp_state::LISTEN && c.new == tcp_state::SYN_RECV {
        // A listener's new connection, cloned from it: the record still shows the listener's
        // address and port (the peer's are set after the clone).
        owner = listener_owner(&c.key);
        if owner == 0 {
            return;
        }
        flags = SOCK_F_CHILD;
        bump(sock_stat::CHILDREN);
    } else if let Some(p) = followed {
        owner = p.tgid;
        pid = p.pid;
        flags = p.flags & !SOCK_F_IN_TABLE;
        if p.flags & SOCK_F_IN_TABLE != 0 {
            prev = Some(p.key);
        }
    } else if let Some(s) =
        // SAFETY: a copy of a plain-data map value.
        unsafe { CR_SOCKS.get(&c.key) }
            .copied()
            .filter(|s| s.skaddr == 0)
    {
        // Seeded from the tracker's scan: adopted at its first event, whatever it was.
        owner = s.tgid;
        pid = s.pid;
        flags = s.flags & !SOCK_F_SEEDED;
        prev = Some(c.key);
    } else if c.old == tcp_state::SYN_RECV {
        // A listener's connection whose clone event was missed.
        owner = listener_owner(&c.key);
        if owner == 0 {
            return;
        }
        flags = SOCK_F_CHILD;
        bump(sock_stat::CHILDREN);
    } else if c.old == tcp_state::CLOSE {
        // Only a syscall of the socket's owner leaves TCP_CLOSE (connect, listen): the
        // current process is the owner.
        let (t, cur) = current_target();
        if t == 0 {
            return;
        }
        owner = t;
        pid = cur;
    } else {
        return;
    }

    if c.new == tcp_state::CLOSE {
        if let Some(k) = prev {
            remove_entry(&k, c.sk);
        }
        let _ = CR_SOCK_PTRS.remove(&c.sk);
        if c.old == tcp_state::LISTEN {
            let lk = listen_key(&c.key, false);
            // SAFETY: read-only look at a plain-data map value.
            if unsafe { CR_SOCK_LISTENERS.get(&lk) }.copied() == Some(owner) {
                let _ = CR_SOCK_LISTENERS.remove(&lk);
            }
        }
        bump(sock_stat::APPLIED);
        return;
    }
    // A listener's clone shows the listener's address (no peer yet); a connect, port 0 until
    // the kernel picks one: such a socket is followed but not in the table yet.
    let complete = c.key.lport != 0 && (c.new == tcp_state::LISTEN || c.key.rport != 0);
    if let Some(k) = prev {
        if !complete || k != c.key {
            remove_entry(&k, c.sk);
        }
    }
    let mut ptr_flags = flags;
    if complete {
        let info = SockInfo {
            skaddr: c.sk,
            tgid: owner,
            pid,
            state: c.new,
            flags,
        };
        if CR_SOCKS.insert(&c.key, &info, 0).is_ok() {
            ptr_flags |= SOCK_F_IN_TABLE;
        } else {
            bump(sock_stat::LOST);
        }
        if c.new == tcp_state::LISTEN
            && CR_SOCK_LISTENERS
                .insert(&listen_key(&c.key, false), &owner, 0)
                .is_err()
        {
            bump(sock_stat::LOST);
        }
    } else if c.new == tcp_state::LISTEN {
        bump(sock_stat::UNTRACKABLE);
    }
    let p = SockPtr {
        key: c.key,
        tgid: owner,
        state: c.new,
        pid,
        flags: ptr_flags,
    };
    if CR_SOCK_PTRS.insert(&c.sk, &p, 0).is_err() {
        bump(sock_stat::LOST);
    }
    bump(sock_stat::APPLIED);
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn cr_sock_fork(ctx: TracePointContext) -> u32 {
    let (t, _) = current_target();
    if t == 0 {
        return 0;
    }
    let l = SOCK_LAYOUT.load();
    match rd::<i32>(&ctx, l.fork_child_pid) {
        Some(child) => {
            // A child (or thread) missing here would make its sockets invisible: count it.
            if CR_SOCK_PROCS.insert(&(child as u32), &t, 0).is_err() {
                bump(sock_stat::LOST);
            }
        }
        None => bump(sock_stat::READ_ERRORS),
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn cr_sock_exit(_ctx: TracePointContext) -> u32 {
    // Every exiting task of the machine: a miss costs one hash lookup.
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = CR_SOCK_PROCS.remove(&tid);
    0
}
