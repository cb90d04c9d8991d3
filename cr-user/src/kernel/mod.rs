//! The kernel layer: thin wrappers over syscalls ([`sys`]), `/proc` parsers ([`proc`]),
//! ptrace ([`ptrace`]), the termination signals of a dump ([`interrupt`]) and the feature
//! probes of `cr check` ([`probe`]). With [`crate::bpf`], the only home of `unsafe`.

pub mod interrupt;
pub mod probe;
pub mod proc;
pub mod ptrace;
pub mod sys;
