//! What the tracker says about the tree's file locks (`Locks`) and what a dump tells it back
//! (`LockSeed`): the lock table's lines, as `/proc/locks` would show them.

use serde::{Deserialize, Serialize};

pub use crate::kernel::proc::locks::InodeId;

/// The kind of a lock, as `/proc/locks` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Posix,
    Ofd,
    Flock,
}

/// One lock of the table: one line of `/proc/locks`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableLock {
    pub inode: InodeId,
    pub kind: TableKind,
    pub write: bool,
    pub start: u64,
    /// Last byte, inclusive; None: to the end of the file (flock locks too).
    pub end: Option<u64>,
    /// As `/proc/locks` shows it: the owning process for POSIX, the process that took it for
    /// flock, -1 for OFD.
    pub pid: i32,
    /// The owner pointer the events named (an identity); 0 when only a survey saw the lock.
    #[serde(default)]
    pub owner: u64,
}

impl TableLock {
    /// Same lock, whoever the owner pointer is.
    pub fn same_line(&self, o: &TableLock) -> bool {
        (
            self.inode, self.kind, self.write, self.start, self.end, self.pid,
        ) == (o.inode, o.kind, o.write, o.start, o.end, o.pid)
    }
}

/// What the tracker answers to `Locks`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TableView {
    /// The table can replace `/proc/locks` for this tree (`why` says why not).
    pub usable: bool,
    pub why: String,
    /// Every lock on the inodes the tree locked (other processes' too).
    pub locks: Vec<TableLock>,
    /// Inodes whose state the table cannot tell, with the reason.
    pub unknown: Vec<(InodeId, String)>,
    /// Events received since the tracker started.
    pub events: u64,
}

/// The exact state of some inodes, from a survey (the tracker's at start, or a dump's while
/// the tree is frozen).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SeedSet {
    /// The inodes described; every lock on them is in `locks`.
    pub inodes: Vec<InodeId>,
    /// Held locks (owner 0).
    pub locks: Vec<TableLock>,
    /// Inodes the survey cannot describe (a lease, an unknown lock kind), with the reason.
    pub unknown: Vec<(InodeId, String)>,
}
