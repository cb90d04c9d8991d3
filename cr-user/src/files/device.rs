//! Character devices that need no state beyond their path (/dev/null & co., see
//! [`super::probe::PLAIN_CHAR_DEVICES`]): opened again by path.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, FdKind, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;

pub struct CharDevice;

impl FileKind for CharDevice {
    fn name(&self) -> &'static str {
        "a character device"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok(matches!(p.class, FdKind::CharDev { .. }).then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, _cx: &mut DumpCx) -> Result<Kind> {
        let FdKind::CharDev { path } = &p.class else {
            bail!("internal: fd {} is not a character device", p.fd)
        };
        Ok(Kind::Chr(pb::CharDev {
            path: path.clone(),
            rdev: p.meta.rdev() as u32,
        }))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Chr(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        match k {
            Kind::Chr(c) => Some(format!("chr:{}:{}", c.path, c.rdev)),
            _ => None,
        }
    }

    fn validate(&self, k: &Kind) -> Result<()> {
        let Kind::Chr(c) = k else { return Ok(()) };
        let meta =
            std::fs::metadata(&c.path).with_context(|| format!("device {} is gone", c.path))?;
        if !meta.file_type().is_char_device() || (c.rdev != 0 && meta.rdev() as u32 != c.rdev) {
            bail!(
                "{} is no longer the character device it was at dump time",
                c.path
            );
        }
        Ok(())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Chr(c)) = &f.kind else {
            bail!("internal: file {} is not a character device", f.id)
        };
        let what = format!("{} for fd {fd_no}", c.path);
        let t = o.open(&c.path, flags, &what)?;
        o.seek(t, f.pos, &what)?;
        Ok(t)
    }
}
