//! signalfds: the mask (fdinfo's `sigmask:`) and SFD_NONBLOCK. The signals themselves are the
//! process's pending signals, which the task's own restore queues again; a signalfd reads
//! whatever its reader has pending, so cr may make it and pass it to the task.

use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::sys::events;

pub struct Signalfd;

impl FileKind for Signalfd {
    fn name(&self) -> &'static str {
        "a signalfd"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok((p.target == "anon_inode:[signalfd]").then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, _cx: &mut DumpCx) -> Result<Kind> {
        let text = p.info.get("sigmask").with_context(|| {
            format!(
                "signalfd fd {} of PID {}: no sigmask in fdinfo",
                p.fd, p.pid
            )
        })?;
        let sigmask = u64::from_str_radix(text.trim(), 16)
            .with_context(|| format!("signalfd fd {} of PID {}: sigmask {text:?}", p.fd, p.pid))?;
        Ok(Kind::Signalfd(pb::SignalfdFile { sigmask }))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Signalfd(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        matches!(k, Kind::Signalfd(_)).then(|| "signalfd".into())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Signalfd(s)) = &f.kind else {
            bail!("internal: file {} is not a signalfd", f.id)
        };
        let what = format!("the signalfd of fd {fd_no} (mask {:#x})", s.sigmask);
        let sfd_flags = libc::SFD_CLOEXEC | (flags as i32 & libc::O_NONBLOCK);
        let mine =
            events::signalfd(s.sigmask, sfd_flags).with_context(|| format!("make {what}"))?;
        o.install_from_cr(mine.as_raw_fd(), &what)
    }
}
