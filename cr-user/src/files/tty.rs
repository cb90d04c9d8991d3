//! Terminals (a pty slave, /dev/tty*, the console) outside the tree: with --shell-job they are
//! dumped as external, and restore gives the task cr's own terminal instead (CRIU's rule).

use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::{path_str, Opener};
use super::probe::{DumpCx, FdKind, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::sys::fd;

pub struct Terminal;

impl FileKind for Terminal {
    fn name(&self) -> &'static str {
        "a terminal"
    }

    fn recognise(&self, p: &Probe, cx: &DumpCx) -> Result<Option<Verdict>> {
        if !matches!(p.class, FdKind::Tty { .. }) {
            return Ok(None);
        }
        Ok(Some(if cx.shell_job {
            Verdict::Dump
        } else {
            Verdict::Refuse {
                what: "a terminal".into(),
                hint: "; dump it with --shell-job (-j)",
                allowed_by: Some("--shell-job"),
            }
        }))
    }

    fn dump(&self, p: &Probe, _id: u32, _cx: &mut DumpCx) -> Result<Kind> {
        let FdKind::Tty { path } = &p.class else {
            bail!("internal: fd {} is not a terminal", p.fd)
        };
        Ok(Kind::Tty(pb::TtyFile {
            path: path.clone(),
            rdev: p.meta.rdev() as u32,
        }))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Tty(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        match k {
            Kind::Tty(t) => Some(format!("tty:{}:{}", t.path, t.rdev)),
            _ => None,
        }
    }

    fn validate(&self, _k: &Kind) -> Result<()> {
        own_terminal().map(drop)
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Tty(tty)) = &f.kind else {
            bail!("internal: file {} is not a terminal", f.id)
        };
        // The terminal the tree had is outside it (--shell-job): the task gets cr's.
        let path = own_terminal()?;
        log::info!(
            "PID {}: fd {fd_no} (terminal {} at dump time) now on {path}",
            o.pid(),
            tty.path
        );
        o.open(
            &path,
            flags | libc::O_NOCTTY as u32,
            &format!("cr's terminal {path} for fd {fd_no}"),
        )
    }
}

/// The path of cr's own terminal (its stdin, stdout or stderr, whichever is one), which the
/// external terminal of a shell job is replaced with.
pub fn own_terminal() -> Result<String> {
    for n in 0..3 {
        if fd::isatty(n) {
            let p = std::fs::read_link(format!("/proc/self/fd/{n}"))
                .with_context(|| format!("readlink /proc/self/fd/{n}"))?;
            return path_str(&p);
        }
    }
    bail!("the image has fds on a terminal outside the dumped tree (--shell-job): run cr restore on a terminal to give them one")
}
