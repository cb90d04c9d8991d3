//! The tracker's file-lock events (filelock:*). See cr-common/src/lock.rs.
