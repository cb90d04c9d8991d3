//! File locks: surveyed and saved ([`dump`]), taken again ([`restore`]), and the tracker's
//! lock table ([`table`], replaying the lock events through [`model`]).

pub mod dump;
pub mod model;
pub mod restore;
pub mod table;
