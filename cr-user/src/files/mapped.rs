//! Mappings of files no name reaches (memfds, unlinked files): each such VMA points at the
//! `files.img` entry of its inode (`Vma.file_id`), the one its fds use when the tree holds
//! one, else an entry of its own (no fd refers to it) made from the mapping
//! (`/proc/PID/map_files/…`). Restore maps the file recreated for that inode, so a MAP_SHARED
//! mapping and the fds stay one file and a MAP_PRIVATE one still follows the file where it
//! was not written (its written pages are in the image like any private memory).

use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result};

use super::dump::FdTable;
use crate::image::pb::file_entry::Kind;
use crate::image::{pb, vma};

/// (dev, ino) of the file behind an entry, for memfds and unlinked files.
fn inode_of(f: &pb::FileEntry) -> Option<(u64, u64)> {
    match &f.kind {
        Some(Kind::Memfd(m)) => Some((m.dev, m.inode)),
        Some(Kind::Reg(r)) if r.unlinked => Some((r.dev, r.inode)),
        _ => None,
    }
}

/// Sets `file_id` of every VMA of `pid` that maps a memfd or an unlinked file, adding an entry
/// to `t` for a file no earlier entry (`earlier`: the processes dumped before; `t`: this one)
/// has. `next_id` numbers entries across the tree.
pub fn link_mappings(
    pid: i32,
    vmas: &mut [pb::Vma],
    next_id: &mut u32,
    earlier: &[pb::FileEntry],
    t: &mut FdTable,
) -> Result<()> {
    for v in vmas.iter_mut() {
        if !v.deleted || v.flags & libc::MAP_ANONYMOUS as u32 != 0 || vma::is_special(v.kind) {
            continue;
        }
        let link = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
        let what = format!("the mapping {:#x}-{:#x} of PID {pid}", v.start, v.end);
        let meta = std::fs::metadata(&link).with_context(|| format!("stat {link} ({})", v.path))?;
        let key = (meta.dev(), meta.ino());
        if let Some(f) = t
            .files
            .iter()
            .chain(earlier)
            .find(|f| inode_of(f) == Some(key))
        {
            v.file_id = f.id;
            continue;
        }
        let id = *next_id;
        let kind = if let Some(name) = v.path.strip_prefix("/memfd:") {
            let f = std::fs::File::open(&link).with_context(|| format!("open {link}"))?;
            if crate::kernel::sys::fs::fs_type(&f) == Some(libc::HUGETLBFS_MAGIC) {
                crate::refuse!(
                    None,
                    "{what} maps a hugetlb memfd (MFD_HUGETLB): not supported"
                );
            }
            Kind::Memfd(super::memfd::memfd_entry(
                &link,
                name,
                &meta,
                id,
                &what,
                &mut t.contents,
                None,
            )?)
        } else {
            if !meta.is_file() {
                crate::refuse!(
                    None,
                    "{what} maps {}, removed and not a regular file: not supported",
                    v.path
                );
            }
            if meta.nlink() > 0 {
                crate::refuse!(None, "{what} maps {} whose name was removed but which has {} other link(s): not supported", v.path, meta.nlink());
            }
            let content = format!("file-{id}.img");
            let bytes = super::ghost::read_ghost(&link, &v.path, &what, meta.size())?;
            t.contents.push((content.clone(), bytes));
            Kind::Reg(super::regular::reg_file(
                v.path.clone(),
                &meta,
                true,
                content,
            ))
        };
        *next_id += 1;
        log::debug!("{what} maps {} (file {id}, no fd of it)", v.path);
        t.files.push(pb::FileEntry {
            id,
            flags: libc::O_RDWR as u32,
            pos: 0,
            kind: Some(kind),
        });
        v.file_id = id;
    }
    Ok(())
}
