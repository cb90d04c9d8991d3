//! cr: checkpoint/restore of Linux process trees, ptrace-driven, with eBPF-assisted tracking so
//! that incremental checkpoints cost in proportion to what changed.
//!
//! Layers (data flows one way; nothing reaches around a layer):
//! the kernel → [`proc`] / [`ptrace`] / [`track`] → [`dump`] → [`image`] → [`restore`] →
//! [`ptrace`] → the kernel. [`sys`] holds the thin `unsafe` wrappers over raw syscalls that the
//! layers share.

pub mod check;
pub mod cli;
pub mod dump;
pub mod image;
pub mod logging;
pub mod mounts;
pub mod net;
pub mod proc;
pub mod ptrace;
pub mod restore;
pub mod sys;
pub mod track;
