//! One file id for an open file description shared across the processes of a tree (inherited
//! across fork), found with kcmp among the descriptions of the same object.

use std::collections::HashMap;

use anyhow::Result;

use crate::image::pb;
use crate::kernel::sys::kcmp;

/// kcmp(pid1, pid2, KCMP_FILE, fd1, fd2) == 0: the two fds share one open file description.
fn same_description(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> Result<bool> {
    kcmp::same_file(pid1, fd1, pid2, fd2)
}

/// What identifies the object behind a description, to find candidates for kcmp.
fn identity(f: &pb::FileEntry) -> Option<String> {
    let k = f.kind.as_ref()?;
    super::kind_of(k)?.identity(k)
}

/// The blobs an entry refers to.
fn blobs(f: &pb::FileEntry) -> Vec<&str> {
    match &f.kind {
        Some(k) => super::kind_of(k)
            .map(|kind| kind.blobs(k))
            .unwrap_or_default(),
        None => Vec::new(),
    }
}

/// Makes file ids tree-wide: a description shared by several processes (inherited across fork)
/// gets one entry, so restore creates it once and offsets, flags and pipe buffers stay shared.
#[derive(Default)]
pub struct FileDedup {
    /// Descriptions seen so far: identity → (pid, a fd of it, file id).
    seen: HashMap<String, Vec<(i32, i32, u32)>>,
}

impl FileDedup {
    /// Folds the freshly collected table of `pid` into the tree: entries that are the same
    /// description as one of an earlier process are dropped and their fds point at that one.
    pub fn merge(&mut self, pid: i32, t: &mut super::dump::FdTable) -> Result<()> {
        let mut remap: HashMap<u32, u32> = HashMap::new();
        let mut keep = Vec::with_capacity(t.files.len());
        let mut dropped: Vec<String> = Vec::new();
        for f in std::mem::take(&mut t.files) {
            let Some(fd) = t.fds.fds.iter().find(|x| x.file_id == f.id).map(|x| x.fd) else {
                keep.push(f);
                continue;
            };
            let Some(key) = identity(&f) else {
                keep.push(f);
                continue;
            };
            let mut found = None;
            for &(opid, ofd, oid) in self.seen.get(&key).map(Vec::as_slice).unwrap_or(&[]) {
                if opid != pid && same_description(opid, ofd, pid, fd)? {
                    found = Some(oid);
                    break;
                }
            }
            match found {
                Some(oid) => {
                    log::debug!("PID {pid}: fd {fd} shares file {oid} with an earlier process");
                    remap.insert(f.id, oid);
                    dropped.extend(blobs(&f).into_iter().map(str::to_string));
                }
                None => {
                    self.seen.entry(key).or_default().push((pid, fd, f.id));
                    keep.push(f);
                }
            }
        }
        // Saved content (of an unlinked file) that is now someone else's, unless an entry
        // kept here refers to it too (another description of the same inode).
        dropped.retain(|b| !keep.iter().any(|k| blobs(k).contains(&b.as_str())));
        t.contents.retain(|(name, _)| !dropped.contains(name));
        t.files = keep;
        for fd in t.fds.fds.iter_mut() {
            if let Some(&n) = remap.get(&fd.file_id) {
                fd.file_id = n;
            }
        }
        Ok(())
    }
}
