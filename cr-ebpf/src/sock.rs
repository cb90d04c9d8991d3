//! The tracker's TCP socket table (sock:inet_sock_set_state). See cr-common/src/sock.rs.
