//! The tracker's file-lock table: maps of cr-ebpf/src/locks.rs, taken from a loaded object
//! (the tracker) or rebuilt from the fds it hands out (a dump).

use std::os::fd::OwnedFd;

use anyhow::Result;

use super::loader::BpfObject;

/// The lock table's maps.
pub struct LockMaps {}

impl LockMaps {
    /// How many map fds [`LockMaps::fds`] hands over.
    pub const FDS: usize = 0;

    /// Takes the maps out of a freshly loaded object (before its programs are attached).
    pub fn take(_obj: &mut BpfObject) -> Result<LockMaps> {
        Ok(LockMaps {})
    }

    /// Attaches the programs.
    pub fn attach(&mut self, _obj: &mut BpfObject) -> Result<()> {
        Ok(())
    }

    /// Duplicates of the map fds, in the order [`LockMaps::from_fds`] expects.
    pub fn fds(&self) -> Result<Vec<OwnedFd>> {
        Ok(Vec::new())
    }

    /// The maps from `FDS` fds sent by the tracker.
    pub fn from_fds(_fds: Vec<OwnedFd>) -> Result<LockMaps> {
        Ok(LockMaps {})
    }
}
