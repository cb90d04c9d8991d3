//! File locks: surveyed and saved ([`dump`]), taken again ([`restore`]), and the tracker's
//! lock table ([`table`]).

pub mod dump;
pub mod restore;
pub mod table;
