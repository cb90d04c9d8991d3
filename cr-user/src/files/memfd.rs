//! memfds (memfd_create): the file is saved once per inode with its name, size, mode, owner,
//! seals and content, holes kept as holes ([`memfd_entry`]). Restore makes one memfd per inode
//! ([`super::objects`]) that every description and every mapping of it opens again, so a
//! MAP_SHARED mapping and an fd stay one file; seals are added once the whole tree is built.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::{FileExt, MetadataExt};

use anyhow::{bail, Context, Result};

use super::ghost::GHOST_LIMIT;
use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, FdKind, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::sys::fd::fcntl_int;
use crate::kernel::sys::fs::{data_ranges, fs_type};

pub struct Memfd;

/// memfds whose content is saved already (this process): (blob name, extents) by (dev, ino).
#[derive(Default)]
struct Saved(HashMap<(u64, u64), (String, Vec<u64>)>);

impl FileKind for Memfd {
    fn name(&self) -> &'static str {
        "a memfd"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        if !matches!(p.class, FdKind::Memfd { .. }) {
            return Ok(None);
        }
        let f = std::fs::File::open(format!("/proc/{}/fd/{}", p.pid, p.fd))
            .with_context(|| format!("open fd {} (a memfd) of PID {}", p.fd, p.pid))?;
        if fs_type(&f) == Some(libc::HUGETLBFS_MAGIC) {
            return Ok(Some(Verdict::Refuse {
                what: "a hugetlb memfd (MFD_HUGETLB)".into(),
                hint: "",
                allowed_by: None,
            }));
        }
        Ok(Some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, id: u32, cx: &mut DumpCx) -> Result<Kind> {
        let FdKind::Memfd { name } = &p.class else {
            bail!("internal: fd {} is not a memfd", p.fd)
        };
        let key = (p.meta.dev(), p.meta.ino());
        let link = format!("/proc/{}/fd/{}", p.pid, p.fd);
        let what = format!("fd {} of PID {}", p.fd, p.pid);
        let saved = cx.scratch.get::<Saved>().0.get(&key).cloned();
        let m = memfd_entry(&link, name, &p.meta, id, &what, cx.contents, saved)?;
        cx.scratch
            .get::<Saved>()
            .0
            .insert(key, (m.content.clone(), m.extents.clone()));
        Ok(Kind::Memfd(m))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Memfd(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        match k {
            Kind::Memfd(m) => Some(format!("memfd:{}:{}", m.dev, m.inode)),
            _ => None,
        }
    }

    fn blobs<'k>(&self, k: &'k Kind) -> Vec<&'k str> {
        match k {
            Kind::Memfd(m) if !m.content.is_empty() => vec![m.content.as_str()],
            _ => Vec::new(),
        }
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Memfd(m)) = &f.kind else {
            bail!("internal: file {} is not a memfd", f.id)
        };
        let path = o.object_path(f)?;
        let what = format!("the memfd {:?} for fd {fd_no}", m.name);
        let t = o.open(&path, flags & !(libc::O_TMPFILE as u32), &what)?;
        o.seek(t, f.pos, &what)?;
        Ok(t)
    }
}

/// The image entry of the memfd readable at `path` (a /proc fd or map_files link: a new
/// description, so the target's offset is untouched), its content saved as blob `file-ID.img`
/// unless `saved` already holds it (blob name and extents).
pub(super) fn memfd_entry(
    path: &str,
    name: &str,
    meta: &Metadata,
    id: u32,
    what: &str,
    contents: &mut Vec<(String, Vec<u8>)>,
    saved: Option<(String, Vec<u64>)>,
) -> Result<pb::MemfdFile> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("open the memfd {name:?} ({what}) through {path}"))?;
    let seals = fcntl_int(
        &f,
        libc::F_GET_SEALS,
        0,
        &format!("F_GET_SEALS of the memfd {name:?} ({what})"),
    )?;
    let mut m = pb::MemfdFile {
        name: name.to_string(),
        size: meta.size(),
        mode: meta.mode(),
        seals: seals as u32,
        dev: meta.dev(),
        inode: meta.ino(),
        uid: meta.uid(),
        gid: meta.gid(),
        ..Default::default()
    };
    if let Some((content, extents)) = saved {
        m.content = content;
        m.extents = extents;
        return Ok(m);
    }
    let ranges = data_ranges(&f, m.size)
        .with_context(|| format!("find the data of the memfd {name:?} ({what})"))?;
    let total: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    if total > GHOST_LIMIT {
        crate::refuse!(
            None,
            "{what} is the memfd {name:?} holding {total} bytes: larger than the {GHOST_LIMIT}-byte limit for saving file contents"
        );
    }
    let mut data = vec![0u8; total as usize];
    let mut at = 0usize;
    for &(a, b) in &ranges {
        let len = (b - a) as usize;
        f.read_exact_at(&mut data[at..at + len], a)
            .with_context(|| format!("read the memfd {name:?} ({what}) at {a}"))?;
        at += len;
        m.extents.extend([a, b]);
    }
    if !data.is_empty() {
        m.content = format!("file-{id}.img");
        contents.push((m.content.clone(), data));
    }
    Ok(m)
}

/// Makes the memfd of `m` in cr: content written where it had data, then size, owner and mode.
/// Seals come last, once every mapping exists ([`add_seals`]).
pub(super) fn create(
    m: &pb::MemfdFile,
    dir: &crate::image::dir::ImageDir,
) -> Result<std::fs::File> {
    let f = crate::kernel::sys::fs::memfd_create(&m.name)
        .with_context(|| format!("memfd_create({:?})", m.name))?;
    let data = if m.content.is_empty() {
        Vec::new()
    } else {
        dir.read_blob(&m.content)
            .with_context(|| format!("content of the memfd {:?}", m.name))?
    };
    let mut at = 0usize;
    for r in m.extents.chunks(2) {
        let [a, b] = r else {
            bail!("memfd {:?}: an odd number of extent bounds", m.name)
        };
        let len = b.saturating_sub(*a) as usize;
        let piece = data.get(at..at + len).with_context(|| {
            format!(
                "memfd {:?}: its content is shorter than its extents",
                m.name
            )
        })?;
        f.write_all_at(piece, *a)
            .with_context(|| format!("write the memfd {:?} at {a}", m.name))?;
        at += len;
    }
    f.set_len(m.size)
        .with_context(|| format!("size the memfd {:?} to {}", m.name, m.size))?;
    std::os::unix::fs::fchown(&f, Some(m.uid), Some(m.gid))
        .with_context(|| format!("chown the memfd {:?} to {}:{}", m.name, m.uid, m.gid))?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
        m.mode & 0o7777,
    ))
    .with_context(|| format!("chmod the memfd {:?} to {:o}", m.name, m.mode & 0o7777))?;
    Ok(f)
}

/// Adds the dumped seals (every mapping and fd of the tree exists: F_SEAL_WRITE would forbid
/// making a shared writable mapping, F_SEAL_SEAL any later seal).
pub(super) fn add_seals(f: &std::fs::File, name: &str, seals: u32) -> Result<()> {
    if seals != 0 {
        fcntl_int(
            f,
            libc::F_ADD_SEALS,
            seals as i32,
            &format!("F_ADD_SEALS {seals:#x} to the memfd {name:?}"),
        )?;
    }
    Ok(())
}
