//! TCP sockets (listening, or established with --tcp-established): saved and rebuilt by
//! [`crate::tcp`]; the restored socket is made in cr and passed to the task.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;

pub struct TcpSocket;

impl FileKind for TcpSocket {
    fn name(&self) -> &'static str {
        "a TCP socket"
    }

    fn recognise(&self, p: &Probe, cx: &DumpCx) -> Result<Option<Verdict>> {
        let Some((st, mine)) = &p.sock else {
            return Ok(None);
        };
        if !st.is_tcp() {
            return Ok(None);
        }
        Ok(Some(match cx.net.refusal(mine)? {
            None => Verdict::Dump,
            Some((what, allowed_by)) => Verdict::Refuse {
                what,
                hint: "",
                allowed_by,
            },
        }))
    }

    fn dump(&self, p: &Probe, _id: u32, cx: &mut DumpCx) -> Result<Kind> {
        Ok(Kind::Tcp(
            cx.net
                .dump_socket(p.copy()?, p.meta.ino())
                .with_context(|| format!("fd {} ({}) of PID {}", p.fd, p.target, p.pid))?,
        ))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Tcp(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        match k {
            Kind::Tcp(t) => Some(format!("tcp:{}", t.inode)),
            _ => None,
        }
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Tcp(tcp)) = &f.kind else {
            bail!("internal: file {} is not a TCP socket", f.id)
        };
        let what = format!("TCP socket:[{}] for fd {fd_no}", tcp.inode);
        let mine = crate::tcp::socket::restore(tcp).with_context(|| what.clone())?;
        let t = o.install_from_cr(mine.as_raw_fd(), &what)?;
        o.setfl(t, flags)?;
        Ok(t)
    }
}
