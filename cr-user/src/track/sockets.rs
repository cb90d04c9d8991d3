//! The tracker's TCP socket table: maps of cr-ebpf/src/sock.rs, taken from a loaded object
//! (the tracker) or rebuilt from the fds it hands out (a dump).

use std::os::fd::OwnedFd;

use anyhow::Result;

use super::loader::BpfObject;

/// The socket table's maps.
pub struct SockMaps {}

impl SockMaps {
    /// How many map fds [`SockMaps::fds`] hands over.
    pub const FDS: usize = 0;

    /// Takes the maps out of a freshly loaded object (before its programs are attached).
    pub fn take(_obj: &mut BpfObject) -> Result<SockMaps> {
        Ok(SockMaps {})
    }

    /// Attaches the programs.
    pub fn attach(&mut self, _obj: &mut BpfObject) -> Result<()> {
        Ok(())
    }

    /// Duplicates of the map fds, in the order [`SockMaps::from_fds`] expects.
    pub fn fds(&self) -> Result<Vec<OwnedFd>> {
        Ok(Vec::new())
    }

    /// The maps from `FDS` fds sent by the tracker.
    pub fn from_fds(_fds: Vec<OwnedFd>) -> Result<SockMaps> {
        Ok(SockMaps {})
    }
}
