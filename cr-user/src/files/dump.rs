//! Collecting the fd table and the open files behind it.
//!
//! Each fd points at an open file description; fds sharing one description (dup, fork) get one
//! `FileEntry` (found with kcmp), so offsets stay shared after restore. What each fd is comes
//! from a [`Probe`] of it; the first kind of [`super::KINDS`] that recognises it saves it.
//!
//! Every fd of a kind cr cannot restore is reported in one error, naming each fd and its kind,
//! before any data is copied: the caller then detaches and the target runs on untouched.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result};

use super::kind::{FileKind, Verdict};
use super::probe::{classify, names_same_inode, utf8_link, DumpCx, FType, FdKind, Probe};
use super::scratch::Scratch;
use crate::image::pb;
use crate::kernel::proc;
use crate::kernel::sys::kcmp;
use crate::kernel::sys::pidfd::{pidfd_getfd, pidfd_open};
use crate::kernel::sys::sock::SockType;
use crate::refusal::Refusal;
use crate::tcp::DumpNet;

/// The fd table of one process and the descriptions it points at.
#[derive(Default)]
pub struct FdTable {
    pub fds: pb::Fds,
    pub files: Vec<pb::FileEntry>,
    /// Blobs the entries refer to (content of unlinked files): (image file name, bytes).
    pub contents: Vec<(String, Vec<u8>)>,
}

/// kcmp(pid, pid, KCMP_FILE, a, b) == 0: the two fds share one open file description.
fn same_description(pid: i32, a: i32, b: i32) -> Result<bool> {
    kcmp::same_file(pid, a, pid, b)
}

/// The kind that recognised each fd, or why none can dump it.
type Recognised<'a> = (Probe<'a>, &'static dyn FileKind);

/// First pass: what every fd is. Reads only /proc (and each socket's type); fails naming every
/// fd cr cannot dump, so a refused dump has not touched a single pipe.
fn survey<'a>(pid: i32, pidfd: &'a OwnedFd, cx: &DumpCx) -> Result<Vec<Recognised<'a>>> {
    let fds =
        proc::fdinfo::list_fds(pid).with_context(|| format!("listing the fds of PID {pid}"))?;
    let mut out = Vec::with_capacity(fds.len());
    let mut refused: Vec<String> = Vec::new();
    let mut allowed_by: Vec<&'static str> = Vec::new();
    for (fd, target) in fds {
        let info =
            proc::fdinfo::read_fdinfo(pid, fd).with_context(|| format!("fd {fd} of PID {pid}"))?;
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
            .with_context(|| format!("stat fd {fd} ({target}) of PID {pid}"))?;
        let names_self = target.ends_with(" (deleted)") && names_same_inode(&target, &meta);
        let mut class = classify(&target, FType::of(&meta), meta.nlink(), names_self);
        let lossy = target.contains(char::REPLACEMENT_CHARACTER) && !utf8_link(pid, fd);
        if lossy {
            // The image stores paths as UTF-8; a lossy one would reopen the wrong name.
            class = FdKind::Unsupported("a file whose path is not valid UTF-8".into());
        }
        let sock = if target.starts_with("socket:[") {
            let mine = pidfd_getfd(pidfd, fd)?;
            let st =
                SockType::of(&mine).with_context(|| format!("fd {fd} ({target}) of PID {pid}"))?;
            Some((st, mine))
        } else {
            None
        };
        let p = Probe {
            pid,
            fd,
            target,
            info,
            meta,
            class,
            sock,
            pidfd,
        };
        let mut verdict = None;
        if !lossy {
            for k in super::KINDS {
                if let Some(v) = k
                    .recognise(&p, cx)
                    .with_context(|| format!("fd {fd} ({}) of PID {pid}", p.target))?
                {
                    verdict = Some((*k, v));
                    break;
                }
            }
        }
        match verdict {
            Some((k, Verdict::Dump)) => out.push((p, k)),
            Some((
                _,
                Verdict::Refuse {
                    what,
                    hint,
                    allowed_by: a,
                },
            )) => {
                refused.push(format!("fd {fd} is {what} ({}){hint}", p.target));
                allowed_by.extend(a);
            }
            None => {
                let what = match (&p.class, p.sock_type()) {
                    (_, Some(st)) => st.describe(),
                    (FdKind::Unsupported(what), None) => what.clone(),
                    (_, None) => "a file of a kind cr does not know".into(),
                };
                let hint = match (what.as_str(), cx.shell_job) {
                    ("a terminal", false) => {
                        allowed_by.push("--shell-job");
                        "; dump it with --shell-job (-j)"
                    }
                    _ => "",
                };
                refused.push(format!("fd {fd} is {what} ({}){hint}", p.target));
            }
        }
    }
    if !refused.is_empty() {
        allowed_by.sort();
        allowed_by.dedup();
        return Err(Refusal::allowed_by(
            &allowed_by,
            format!(
                "PID {pid} has open files cr cannot dump: {}",
                refused.join("; ")
            ),
        )
        .into());
    }
    Ok(out)
}

/// Collects the fd table of `pid`. `next_id` numbers descriptions across the whole tree.
/// `tree`: every live process of the tree; `leave_running`: `-R`; `unix`: the dump's view of
/// its UNIX sockets (made at the first).
pub fn collect(
    pid: i32,
    next_id: &mut u32,
    shell_job: bool,
    net: &mut DumpNet,
    tree: &[i32],
    leave_running: bool,
    unix: &std::cell::OnceCell<super::unix::View>,
) -> Result<FdTable> {
    let pidfd = pidfd_open(pid)?;
    let mut table = FdTable::default();
    let mut cx = DumpCx {
        pid,
        tree,
        shell_job,
        net,
        contents: &mut table.contents,
        scratch: Scratch::default(),
        leave_running,
        unix,
    };
    let surveyed = survey(pid, &pidfd, &cx)?;
    // Descriptions seen so far, (fd, file id) by (dev, ino), to compare new fds with kcmp.
    let mut seen: HashMap<(u64, u64), Vec<(i32, u32)>> = HashMap::new();
    let (mut files, mut fds) = (Vec::new(), Vec::new());
    for (p, kind) in surveyed {
        let fd = p.fd;
        let cloexec = p.info.flags & libc::O_CLOEXEC as u32 != 0;
        let key = (p.meta.dev(), p.meta.ino());
        let mut shared_with = None;
        for &(ofd, id) in seen.get(&key).map(Vec::as_slice).unwrap_or(&[]) {
            if same_description(pid, ofd, fd)? {
                shared_with = Some(id);
                break;
            }
        }
        if let Some(id) = shared_with {
            fds.push(pb::Fd {
                fd,
                file_id: id,
                cloexec,
            });
            continue;
        }
        let id = *next_id;
        let entry = kind.dump(&p, id, &mut cx)?;
        *next_id += 1;
        let flags = p.info.flags & !(libc::O_CLOEXEC as u32);
        files.push(pb::FileEntry {
            id,
            flags,
            pos: p.info.pos,
            kind: Some(entry),
        });
        fds.push(pb::Fd {
            fd,
            file_id: id,
            cloexec,
        });
        seen.entry(key).or_default().push((fd, id));
    }
    for k in super::KINDS {
        k.dumped_process(&mut cx);
    }
    table.files = files;
    table.fds.fds = fds;
    Ok(table)
}
