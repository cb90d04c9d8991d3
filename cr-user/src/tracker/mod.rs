//! The tracker process's protocol and client (the process itself is `cmd::tracker`).

pub mod client;
pub mod locks;
pub mod rendezvous;
