//! Types of the tracker's TCP socket table (cr-ebpf/src/sock.rs ↔ cr-user/src/track/sockets.rs).
//! See DESIGN §5-§6.
//!
//! The table follows the TCP sockets of tracked processes through `sock:inet_sock_set_state`,
//! which often fires in softirq context (the current task is then whoever was interrupted), so
//! a socket is attributed once, when a target creates it or when a target's listener spawns
//! it, and followed from then on by its kernel address (`skaddr`) and its 4-tuple, never by the
//! current pid. The user side reads [`SOCKS`](names::SOCKS): one entry per socket whose
//! identity (addresses and ports) is known, keyed by [`SockKey`].

/// Names of the table's maps and programs in the eBPF object.
pub mod names {
    /// The table: [`super::SockKey`] → [`super::SockInfo`].
    pub const SOCKS: &str = "CR_SOCKS";
    /// Every followed socket by kernel address (u64) → [`super::SockPtr`], including those
    /// whose 4-tuple is not complete yet (a connect before its port is chosen).
    pub const SOCK_PTRS: &str = "CR_SOCK_PTRS";
    /// Listening sockets of targets: [`super::ListenKey`] → tgid of the owning target, to
    /// attribute the connections they spawn (in softirq context).
    pub const LISTENERS: &str = "CR_SOCK_LISTENERS";
    /// Processes (and threads) of a target's tree: pid → tgid of the target.
    pub const SOCK_PROCS: &str = "CR_SOCK_PROCS";
    /// Per-CPU counters ([`super::sock_stat`]).
    pub const SOCK_STATS: &str = "CR_SOCK_STATS";
    /// sock:inet_sock_set_state.
    pub const PROG_SOCK_STATE: &str = "cr_sock_state";
    /// sched:sched_process_fork: children of a target's tree join CR_SOCK_PROCS.
    pub const PROG_SOCK_FORK: &str = "cr_sock_fork";
    /// sched:sched_process_exit: a task of the tree leaves CR_SOCK_PROCS (its pid may be reused).
    pub const PROG_SOCK_EXIT: &str = "cr_sock_exit";
    /// The global holding the record layout ([`super::SockLayout`]).
    pub const GLOBAL_LAYOUT: &str = "SOCK_LAYOUT";
}

/// Capacity of CR_SOCKS and CR_SOCK_PTRS. A full map is counted (sock_stat::LOST) and makes
/// dumps fall back to a sock_diag scan.
pub const SOCKS_MAX_ENTRIES: u32 = 16384;
/// Capacity of CR_SOCK_LISTENERS.
pub const LISTENERS_MAX_ENTRIES: u32 = 1024;
/// Capacity of CR_SOCK_PROCS.
pub const SOCK_PROCS_MAX_ENTRIES: u32 = 8192;

/// TCP states (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Key of CR_SOCKS: one TCP socket by address. IPv4 addresses fill the first 4 bytes (the rest
/// is zero); an IPv6 socket carrying IPv4 (dual-stack) has v4-mapped addresses, as the kernel
/// reports them. Ports in host byte order; a listener has zero remote address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    pub _pad: u16,
}

/// Value of CR_SOCKS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockInfo {
    /// The socket's kernel address (0 for an entry seeded from a scan and not seen since).
    pub skaddr: u64,
    /// The target (CR_TARGETS key) the socket belongs to.
    pub tgid: u32,
    /// The process in whose context the socket entered the table (0: a listener's child, or
    /// seeded).
    pub pid: u32,
    /// TCP state (`tcp_state`).
    pub state: u32,
    /// `SOCK_F_*`.
    pub flags: u32,
}

/// Spawned by a listener of the target (accepted or not: accept() changes no state).
pub const SOCK_F_CHILD: u32 = 1 << 0;
/// Seeded by the tracker from a sock_diag scan; no event seen since.
pub const SOCK_F_SEEDED: u32 = 1 << 1;

/// Value of CR_SOCK_PTRS (key: the socket's kernel address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockPtr {
    /// The key the socket had at its last event.
    pub key: SockKey,
    pub tgid: u32,
    /// State after the last event: the next event's old state must equal it, or the entry is
    /// stale (events were lost, or the address was reused by a socket freed unseen).
    pub state: u32,
    /// As in [`SockInfo::pid`].
    pub pid: u32,
    /// `SOCK_F_*`, and [`SOCK_F_IN_TABLE`] when `key` is complete and in CR_SOCKS.
    pub flags: u32,
}

/// In [`SockPtr::flags`] only: the socket's key is in CR_SOCKS.
pub const SOCK_F_IN_TABLE: u32 = 1 << 8;

/// Key of CR_SOCK_LISTENERS: a listening address (all-zero for the wildcard).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Indices into CR_SOCK_STATS (a per-CPU array of u64).
pub mod sock_stat {
    /// TCP state changes seen (all sockets, before any filtering).
    pub const EVENTS: u32 = 0;
    /// Changes applied to the table (sockets of targets).
    pub const APPLIED: u32 = 1;
    /// Entries that did not fit (a map was full): the table is incomplete for good.
    pub const LOST: u32 = 2;
    /// Followed sockets whose next event did not start from their recorded state.
    pub const DESYNC: u32 = 3;
    /// Sockets of targets the table cannot hold: a listener without a port (listen() without
    /// bind()); its connections cannot be attributed.
    pub const UNTRACKABLE: u32 = 4;
    /// Children of targets' listeners attributed.
    pub const CHILDREN: u32 = 5;
    /// Records the program could not read.
    pub const READ_ERRORS: u32 = 6;
    /// Written by the tracker (CPU 0's slot only), never by the programs: `status::*`.
    pub const STATUS: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// Values of the STATUS slot: what a dump may expect of the table.
pub mod status {
    /// The programs are not attached: nothing is recorded.
    pub const UNAVAILABLE: u64 = 0;
    /// Attached, but the sockets the targets had before are not in the table yet.
    pub const ATTACHED: u64 = 1;
    /// Attached and seeded: the table holds every socket of the targets.
    pub const READY: u64 = 2;
}

/// Offsets of the fields of `sock:inet_sock_set_state` (and of `child_pid` in
/// `sched:sched_process_fork`) that cr_sock_state reads. The defaults match Linux 5.x-6.x; the
/// user side checks them against tracefs and patches the global SOCK_LAYOUT when they differ.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockLayout {
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
    pub fork_child_pid: u32,
}

impl SockLayout {
    pub const DEFAULT: SockLayout = SockLayout {
        skaddr: 8,
        oldstate: 16,
        newstate: 20,
        sport: 24,
        dport: 26,
        family: 28,
        protocol: 30,
        saddr: 32,
        daddr: 36,
        saddr_v6: 40,
        daddr_v6: 56,
        fork_child_pid: crate::FORK_CHILD_PID_OFFSET,
    };
}

impl Default for SockLayout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, made of integers and byte arrays only, with explicit
    // padding (sizes are multiples of their alignment: 40, 24, 56, 24, 48), so every bit
    // pattern is valid.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockPtr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<SockKey>(), 40);
        assert_eq!(core::mem::size_of::<SockInfo>(), 24);
        assert_eq!(core::mem::size_of::<SockPtr>(), 56);
        assert_eq!(core::mem::size_of::<ListenKey>(), 24);
        assert_eq!(core::mem::size_of::<SockLayout>(), 48);
    }
}
