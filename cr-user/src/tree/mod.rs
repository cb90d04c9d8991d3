//! The process tree: the target checked and frozen ([`target`], [`dump`]), and recreated
//! ([`spawn`], [`restore`]).

pub mod dump;
pub mod restore;
pub mod spawn;
pub mod target;
