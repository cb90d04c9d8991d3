//! inotify instances and their watches; fanotify is refused, naming it.
//!
//! Dump: each `inotify` line of fdinfo is a watch: its wd, mask, inode, device and file handle.
//! The handle is opened (open_by_handle_at on the watched filesystem) to find a name of the
//! inode now, which may not be the name it was watched by (renamed, or unlinked while another
//! link lives on). Events queued at dump time are not read (that would take them from the
//! process, and `dump -R` leaves it as it was): they are not in the image, and the log says how
//! many bytes of them a restore drops.
//!
//! Restore: cr makes the instance and adds each watch in wd order, the next wd set first
//! (INOTIFY_IOC_SETNEXTWD) so every watch gets its own number back; the inode is found by its
//! handle, else by the name found at dump, and must be the same inode (device, number).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::proc;
use crate::kernel::sys::{events, fd};

pub struct Inotify;

/// fanotify groups: refused (their marks are not listed in a way cr can restore yet).
pub struct Fanotify;

/// The kernel's dev_t encoding (fdinfo's `sdev`) as (major, minor).
fn kernel_dev(sdev: u64) -> (u32, u32) {
    ((sdev >> 20) as u32, (sdev & 0xf_ffff) as u32)
}

/// st_dev as the kernel encodes it.
fn encode_dev(dev: u64) -> u64 {
    let (ma, mi) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    (ma << 20) | mi
}

/// Bytes of a hex string.
fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd-length hex {s:?}");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).with_context(|| format!("hex {s:?}")))
        .collect()
}

fn hex_field(r: &proc::fdinfo::FdRecord, key: &str) -> Result<u64> {
    let v = r
        .get(key)
        .with_context(|| format!("inotify line without {key}: {:?}", r.raw))?;
    u64::from_str_radix(v, 16).with_context(|| format!("inotify {key} {v:?}"))
}

/// An O_PATH fd of the inode (`ino`, kernel `sdev`) by its file handle, if it opens.
fn by_handle(w: &pb::InotifyWatch) -> Option<OwnedFd> {
    if w.handle.is_empty() {
        return None;
    }
    let (ma, mi) = kernel_dev(w.sdev);
    let mounts = proc::mountinfo::read_own_mounts().ok()?;
    for m in mounts.iter().filter(|m| m.major == ma && m.minor == mi) {
        let Ok(dir) = std::fs::File::open(&m.mount_point) else {
            continue;
        };
        if let Ok(f) = events::open_by_handle_at(&dir, w.handle_type, &w.handle, libc::O_PATH) {
            if is_inode(&f, w) {
                return Some(f);
            }
        }
    }
    None
}

/// Whether `f` is the watched inode.
fn is_inode(f: &OwnedFd, w: &pb::InotifyWatch) -> bool {
    std::fs::metadata(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map(|m| m.ino() == w.ino && encode_dev(m.dev()) == w.sdev)
        .unwrap_or(false)
}

/// An O_PATH fd of the watched inode: by handle, else by the name seen at dump.
fn find_inode(w: &pb::InotifyWatch) -> Result<OwnedFd> {
    if let Some(f) = by_handle(w) {
        return Ok(f);
    }
    if !w.path.is_empty() {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&w.path)
        {
            let f = OwnedFd::from(f);
            if is_inode(&f, w) {
                return Ok(f);
            }
        }
    }
    bail!(
        "the inode {} (device {:#x}) of inotify watch {} is gone: its file handle does not open and {} is not it",
        w.ino,
        w.sdev,
        w.wd,
        if w.path.is_empty() { "no name was found at dump" } else { &w.path }
    )
}

impl FileKind for Inotify {
    fn name(&self) -> &'static str {
        "an inotify instance"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok((p.target == "anon_inode:inotify").then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, _cx: &mut DumpCx) -> Result<Kind> {
        let mut watches = Vec::new();
        for r in p.info.records.iter().filter(|r| r.kind == "inotify") {
            let handle_type = hex_field(r, "fhandle-type")? as i32;
            let handle = unhex(r.get("f_handle").unwrap_or(""))?;
            let mut w = pb::InotifyWatch {
                wd: hex_field(r, "wd")? as i32,
                mask: hex_field(r, "mask")? as u32,
                ino: hex_field(r, "ino")?,
                sdev: hex_field(r, "sdev")?,
                handle_type,
                handle,
                path: String::new(),
            };
            if let Some(f) = by_handle(&w) {
                if let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())) {
                    if let Some(path) = path.to_str() {
                        if std::fs::symlink_metadata(path)
                            .map(|m| m.ino() == w.ino)
                            .unwrap_or(false)
                        {
                            w.path = path.to_string();
                        }
                    }
                }
            }
            if w.path.is_empty() && w.handle.is_empty() {
                bail!(
                    "PID {}: fd {} is an inotify instance whose watch {} (inode {}) has neither a file handle nor a name cr can find",
                    p.pid,
                    p.fd,
                    w.wd,
                    w.ino
                );
            }
            watches.push(w);
        }
        let mine = p.copy()?;
        let bytes_queued = fd::ioctl_int(&mine, libc::FIONREAD, "FIONREAD on an inotify fd")?;
        if bytes_queued != 0 {
            log::warn!(
                "PID {}: fd {} (inotify) has {bytes_queued} bytes of events queued; they are not saved, and a restore drops them",
                p.pid,
                p.fd
            );
        }
        Ok(Kind::Inotify(pb::InotifyFile {
            watches,
            bytes_queued,
        }))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Inotify(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        matches!(k, Kind::Inotify(_)).then(|| "inotify".into())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Inotify(ino)) = &f.kind else {
            bail!("internal: file {} is not an inotify instance", f.id)
        };
        let what = format!("the inotify instance of fd {fd_no}");
        let mine = events::inotify_init1(libc::IN_CLOEXEC | (flags as i32 & libc::O_NONBLOCK))
            .with_context(|| format!("make {what}"))?;
        let mut watches: Vec<&pb::InotifyWatch> = ino.watches.iter().collect();
        watches.sort_by_key(|w| w.wd);
        for w in watches {
            let target = find_inode(w).with_context(|| what.clone())?;
            events::inotify_set_next_wd(&mine, w.wd)?;
            let path = format!("/proc/self/fd/{}", target.as_raw_fd());
            let got = events::inotify_add_watch(&mine, &path, w.mask)
                .with_context(|| format!("{what}: watch {} ({})", w.wd, w.path))?;
            if got != w.wd {
                bail!(
                    "{what}: watch of {} came back as wd {got}, not {}",
                    w.path,
                    w.wd
                );
            }
        }
        if ino.bytes_queued != 0 {
            log::warn!(
                "{what}: the {} bytes of inotify events queued at dump time were not saved: dropped",
                ino.bytes_queued
            );
        }
        o.install_from_cr(mine.as_raw_fd(), &what)
    }
}

impl FileKind for Fanotify {
    fn name(&self) -> &'static str {
        "a fanotify group"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok((p.target == "anon_inode:[fanotify]").then(|| Verdict::Refuse {
            what: "a fanotify group".into(),
            hint: ": cr does not checkpoint fanotify (its marks, and the permission events a listener may owe an answer to)",
            allowed_by: None,
        }))
    }

    fn dump(&self, p: &Probe, _id: u32, _cx: &mut DumpCx) -> Result<Kind> {
        bail!(
            "fd {} of PID {} is a fanotify group, which cr refuses",
            p.fd,
            p.pid
        )
    }

    fn owns(&self, _k: &Kind) -> bool {
        false
    }

    fn open(&self, f: &pb::FileEntry, _flags: u32, _fd_no: i32, _o: &mut Opener) -> Result<u64> {
        bail!("file {} is not a fanotify group", f.id)
    }
}
