//! eventfds: the counter and EFD_SEMAPHORE (fdinfo's `eventfd-semaphore:`, which CRIU 4.2
//! does not save: its semaphores come back as plain counters), EFD_NONBLOCK in the flags.
//!
//! Restore: cr makes the eventfd, writes the counter into it (a u64: eventfd2's initial value
//! is only 32 bits) and passes it to the task.

use std::io::Write;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::sys::events;

pub struct Eventfd;

impl FileKind for Eventfd {
    fn name(&self) -> &'static str {
        "an eventfd"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok((p.target == "anon_inode:[eventfd]").then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, _cx: &mut DumpCx) -> Result<Kind> {
        let count = p
            .info
            .eventfd_count()?
            .with_context(|| format!("fd {} of PID {}: no eventfd-count in fdinfo", p.fd, p.pid))?;
        let semaphore = match p.info.get("eventfd-semaphore") {
            Some(v) => v.trim() == "1",
            None => bail!(
                "fd {} of PID {}: fdinfo has no eventfd-semaphore (kernel older than 6.6): cr cannot tell a semaphore from a counter",
                p.fd,
                p.pid
            ),
        };
        Ok(Kind::Eventfd(pb::EventfdFile { count, semaphore }))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Eventfd(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        matches!(k, Kind::Eventfd(_)).then(|| "eventfd".into())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Eventfd(e)) = &f.kind else {
            bail!("internal: file {} is not an eventfd", f.id)
        };
        let what = format!("the eventfd of fd {fd_no}");
        let mut efd_flags = libc::EFD_CLOEXEC | (flags as i32 & libc::O_NONBLOCK);
        if e.semaphore {
            efd_flags |= libc::EFD_SEMAPHORE;
        }
        let mine = events::eventfd(efd_flags).with_context(|| format!("make {what}"))?;
        if e.count == u64::MAX {
            bail!("{what}: count {:#x} is more than an eventfd holds", e.count);
        }
        if e.count != 0 {
            // From 0, any count up to the largest never blocks.
            let mut w = std::fs::File::from(mine.try_clone().context("dup an eventfd")?);
            w.write_all(&e.count.to_ne_bytes())
                .with_context(|| format!("set the counter of {what} to {}", e.count))?;
        }
        use std::os::fd::AsRawFd;
        o.install_from_cr(mine.as_raw_fd(), &what)
    }
}
