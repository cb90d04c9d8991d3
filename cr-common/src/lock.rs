//! Types of the tracker's file-lock events (cr-ebpf/src/locks.rs ↔ cr-user/src/track/locks.rs).
//! Owned by the lock-table work; see DESIGN §7.
