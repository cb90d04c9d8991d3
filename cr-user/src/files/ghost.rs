//! Open files whose name was removed ("ghosts"): their content is saved in the image once per
//! inode (`file-ID.img`), however many descriptions point at it. Restore recreates the file
//! once per inode for the whole tree ([`super::objects`]: at its old name when that is free,
//! so /proc shows the same "path (deleted)", unlinked again at once) and opens it again for
//! every description and mapping that had it.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, FdKind, Probe};
use super::regular::{inode_identity, open_reg, reg_file};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;

/// Largest unlinked file whose content is saved in the image (CRIU's --ghost-limit, which
/// defaults to 1 MiB there; cr is more generous but still refuses to swallow huge files).
pub const GHOST_LIMIT: u64 = 512 << 20;

pub struct Ghost;

/// Unlinked inodes whose content is saved already (this process): image file name by (dev, ino).
#[derive(Default)]
struct Saved(HashMap<(u64, u64), String>);

impl FileKind for Ghost {
    fn name(&self) -> &'static str {
        "an unlinked file"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok(matches!(p.class, FdKind::Unlinked { .. }).then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, id: u32, cx: &mut DumpCx) -> Result<Kind> {
        let FdKind::Unlinked { path } = &p.class else {
            bail!("internal: fd {} is not an unlinked file", p.fd)
        };
        let key = (p.meta.dev(), p.meta.ino());
        let content = match cx.scratch.get::<Saved>().0.get(&key) {
            Some(name) => name.clone(),
            None => {
                let name = format!("file-{id}.img");
                let link = format!("/proc/{}/fd/{}", p.pid, p.fd);
                cx.contents.push((
                    name.clone(),
                    read_ghost(
                        &link,
                        path,
                        &format!("fd {} of PID {}", p.fd, p.pid),
                        p.meta.size(),
                    )?,
                ));
                cx.scratch.get::<Saved>().0.insert(key, name.clone());
                name
            }
        };
        Ok(Kind::Reg(reg_file(path.clone(), &p.meta, true, content)))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Reg(r) if r.unlinked)
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        inode_identity(k)
    }

    fn blobs<'k>(&self, k: &'k Kind) -> Vec<&'k str> {
        match k {
            Kind::Reg(r) if r.unlinked && !r.content.is_empty() => vec![r.content.as_str()],
            _ => Vec::new(),
        }
    }

    fn validate(&self, k: &Kind) -> Result<()> {
        let Kind::Reg(r) = k else { return Ok(()) };
        let dir = Path::new(&r.path).parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            bail!(
                "directory {} of the unlinked file {} is gone",
                dir.display(),
                r.path
            );
        }
        Ok(())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Reg(reg)) = &f.kind else {
            bail!("internal: file {} is not an unlinked file", f.id)
        };
        let path = o.object_path(f)?;
        open_reg(f, reg, &path, flags, fd_no, o)
    }
}

/// Reads the content of an unlinked file through its fd link (a new description: the target's
/// offset is not touched).
/// `what` names the fd or mapping for messages.
pub(super) fn read_ghost(link: &str, path: &str, what: &str, size: u64) -> Result<Vec<u8>> {
    if size > GHOST_LIMIT {
        crate::refuse!(None, "{what} is the unlinked file {path} of {size} bytes: larger than the {GHOST_LIMIT}-byte limit for saving unlinked files");
    }
    std::fs::read(link).with_context(|| format!("read the unlinked file {path} ({what})"))
}
