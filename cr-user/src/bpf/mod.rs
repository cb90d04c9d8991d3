//! cr's eBPF object: loading it ([`loader`]), the tracepoint layouts it depends on
//! ([`tracefs`]), and the maps of its programs ([`maps`], [`dirty`], [`sockets`]); the
//! network lock's classifier ([`netlock`]).

pub mod dirty;
pub mod loader;
pub mod locks;
pub mod maps;
pub mod netlock;
pub mod probe;
pub mod sockets;
pub mod tracefs;

pub use dirty::{DirtyPage, Stats, Tracker};
pub use loader::BpfObject;
