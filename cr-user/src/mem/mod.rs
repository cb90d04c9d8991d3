//! Memory: the VMA list and page plan ([`dump`]), the page copy ([`pages`]), incremental
//! dumps ([`incremental`], [`harvest`], [`arm`]) and the rebuilt address space ([`restore`]).

pub mod arm;
pub mod dump;
pub mod harvest;
pub mod incremental;
pub mod pages;
pub mod restore;
pub mod shmem;
