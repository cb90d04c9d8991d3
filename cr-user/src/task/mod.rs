//! Per-task state: registers, signals, credentials and the rest, dumped ([`dump`]) and
//! restored ([`restore`], [`threads`]).

pub mod dump;
pub mod restore;
pub mod threads;
