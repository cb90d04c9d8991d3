//! Open files: the fd table collected ([`dump`]) and rebuilt ([`restore`]).

pub mod dedup;
pub mod dump;
pub mod restore;
