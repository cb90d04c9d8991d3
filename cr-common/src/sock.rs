//! Types of the tracker's TCP socket table (cr-ebpf/src/sock.rs ↔ cr-user/src/track/sockets.rs).
//! Owned by the socket-table work; see DESIGN §6.
