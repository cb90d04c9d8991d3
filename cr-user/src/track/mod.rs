//! The tracker: loads cr-ebpf, arms write-protection, harvests dirty sets (DESIGN §5).
//!
//! - [`loader`]: the embedded eBPF object, tracepoint layout checks, program attach, aya-log.
//! - [`tracefs`]: tracepoint record layouts read from tracefs (pure parser + reader).
//! - [`dirty`]: the write-fault [`Tracker`]: target set, dirty pages per target, counters.
//! - [`uffd`]: userfaultfd async write-protection (arming).
//!
//! The exact (O(mapped)) dirty scan, PAGEMAP_SCAN with PM_SCAN_WP_MATCHING, is
//! [`crate::sys::pagemap`].
//!
//! Still to come (later issues): VMA-change, TCP and lock programs in the same object, and a
//! tracker process that owns all this across `cr` invocations.

pub mod arm;
pub mod client;
pub mod daemon;
pub mod dirty;
pub mod harvest;
pub mod loader;
pub mod locks;
pub mod maps;
pub mod ranges;
pub mod sockets;
pub mod tracefs;
pub mod uffd;

pub use dirty::{DirtyPage, Stats, Tracker};
pub use loader::BpfObject;
