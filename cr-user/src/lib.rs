//! cr: checkpoint/restore of Linux process trees, ptrace-driven, with eBPF-assisted tracking so
//! that incremental checkpoints cost in proportion to what changed.
//!
//! Layers (docs/architecture.md; `cargo xtask lint` checks them): [`kernel`] at the bottom,
//! [`bpf`] and [`image`] on it, [`tracker`] above, then one module per resource ([`tree`],
//! [`task`], [`mem`], [`files`], [`locks`], [`tcp`]), and [`cmd`] on top, which alone
//! sequences them.

pub mod bpf;
pub mod cli;
pub mod cmd;
pub mod files;
pub mod image;
pub mod kernel;
pub mod locks;
pub mod logging;
pub mod mem;
pub mod progress;
pub mod ranges;
pub mod refusal;
pub mod task;
pub mod tcp;
pub mod tracker;
pub mod tree;
pub mod tunables;
