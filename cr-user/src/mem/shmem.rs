//! Shared anonymous memory across the processes of a tree: which VMA owns an object, which
//! borrow it. Dump and restore both use this one rule ([`ShmemOwners`]).

use std::collections::HashMap;

use crate::image::{pb, vma};

/// Which VMAs map shared anonymous memory that an earlier VMA of the tree already maps (the
/// same shmem object, e.g. MAP_SHARED|MAP_ANONYMOUS memory inherited across fork).
///
/// The first VMA of the tree (in tree order, then address order) that maps an object owns it:
/// its pages are dumped and restore creates the object there. A later VMA that maps a part of
/// the owner's range borrows: its pages are not dumped, and restore maps it from the owner's
/// object (through /proc/OWNER/map_files), so the memory stays shared. A VMA reaching outside
/// the owner's range (the object was mapped piecewise) is restored as memory of its own.
/// Dump and restore both use this one rule, so they agree on which pages exist.
#[derive(Default)]
pub struct ShmemOwners {
    by_inode: HashMap<u64, (i32, u64, u64, u64)>,
}

/// Where a borrowing VMA's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmemLink {
    pub owner_pid: i32,
    pub owner_start: u64,
    pub owner_end: u64,
    /// Offset of the borrower's first byte in the owner's mapping.
    pub offset: u64,
}

impl ShmemLink {
    /// The path the borrower opens to map the owner's object.
    pub fn path(&self) -> String {
        format!(
            "/proc/{}/map_files/{:x}-{:x}",
            self.owner_pid, self.owner_start, self.owner_end
        )
    }
}

impl ShmemOwners {
    /// Registers `v` of process `pid`; returns the link if it borrows from an earlier VMA.
    /// Call for every VMA of every process in tree order.
    pub fn link(&mut self, pid: i32, v: &pb::Vma) -> Option<ShmemLink> {
        if v.kind != vma::KIND_SHMEM_ANON || v.inode == 0 {
            return None;
        }
        match self.by_inode.get(&v.inode) {
            None => {
                self.by_inode
                    .insert(v.inode, (pid, v.start, v.end, v.pgoff));
                None
            }
            Some(&(opid, ostart, oend, opgoff)) => {
                if opid == pid && ostart == v.start {
                    return None;
                }
                let len = v.end - v.start;
                if v.pgoff < opgoff || v.pgoff - opgoff + len > oend - ostart {
                    return None;
                }
                Some(ShmemLink {
                    owner_pid: opid,
                    owner_start: ostart,
                    owner_end: oend,
                    offset: v.pgoff - opgoff,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shm(start: u64, end: u64, pgoff: u64, inode: u64) -> pb::Vma {
        pb::Vma {
            start,
            end,
            pgoff,
            inode,
            kind: vma::KIND_SHMEM_ANON,
            ..Default::default()
        }
    }

    #[test]
    fn shared_anonymous_memory_owners() {
        let mut o = ShmemOwners::default();
        // Parent maps the object; the child inherited the same mapping.
        assert_eq!(o.link(10, &shm(0x1000, 0x5000, 0, 7)), None);
        assert_eq!(
            o.link(10, &shm(0x1000, 0x5000, 0, 7)),
            None,
            "the owner itself"
        );
        let l = o.link(11, &shm(0x1000, 0x5000, 0, 7)).unwrap();
        assert_eq!(
            l,
            ShmemLink {
                owner_pid: 10,
                owner_start: 0x1000,
                owner_end: 0x5000,
                offset: 0
            }
        );
        assert_eq!(l.path(), "/proc/10/map_files/1000-5000");
        // A part of it, moved elsewhere.
        let l = o.link(11, &shm(0x9000, 0xa000, 0x2000, 7)).unwrap();
        assert_eq!(l.offset, 0x2000);
        // Reaching past the owner's range: memory of its own.
        assert_eq!(o.link(11, &shm(0x9000, 0xb000, 0x3000, 7)), None);
        // Other kinds never link.
        let mut private = shm(0x1000, 0x2000, 0, 7);
        private.kind = vma::KIND_REGULAR;
        assert_eq!(o.link(12, &private), None);
    }
}
