//! TCP: sockets saved and rebuilt with TCP_REPAIR ([`socket`]), the tree's sockets and the
//! tracker's table of them ([`inventory`]), the network lock of `--tcp-established`, and the
//! repair guard ([`guard`]).
//!
//! A dump holds every established connection it saved in repair mode ([`DumpNet`]) until
//! the dump ends: if the tree is killed, cr's copies are closed still in repair mode, so the
//! kernel sends neither FIN nor RST; on failure or with --leave-running, repair mode is left
//! and the connections run on. If cr itself dies meanwhile, the kernel removes the lock (held
//! by cr's fds until the image is complete) and the guard takes the connections out of repair
//! mode.

pub mod guard;
pub mod inventory;
pub mod socket;

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};

use crate::bpf::netlock as lock;
use crate::image::dir::{ImageDir, ImageWriter};
use crate::image::pb;

use self::socket as tcp;

/// The image file recording a pinned network lock (framed and checksummed like every other).
pub const LOCK_RECORD: &str = "netlock.img";

/// The network side of one dump: the connections cr holds in repair mode and the network
/// lock. `cmd::dump` owns it (declared after the frozen tree, so that on error it is dropped
/// first and the connections leave repair mode before the tree runs on). Dropping it without
/// [`DumpNet::target_killed`] takes every saved connection out of repair mode and removes the
/// lock.
pub struct DumpNet {
    tcp_established: bool,
    /// cr's copies of the sockets put in repair mode, with a name for messages.
    held: Vec<(OwnedFd, String)>,
    /// The network lock, once a connection needed it.
    lock: Option<lock::NetLock>,
    /// The guard of the connections in repair mode (with --tcp-established).
    guard: Option<guard::RepairGuard>,
    /// Names the lock's pin directory.
    tag: String,
    killed: bool,
}

/// A network lock loaded before the freeze, with no link and no connection yet (nothing is
/// dropped until the first connection is added, and loading the classifier, tens of ms, is
/// not paid while the tree is frozen and its peers wait), and the repair guard, started. Held
/// by cr's fds only: dropped unused, or with cr, it is gone.
pub struct PreparedLock(Option<(lock::NetLock, guard::RepairGuard)>);

impl PreparedLock {
    /// With --tcp-established, loads the lock of the dump of `pid` and starts the guard;
    /// otherwise nothing.
    pub fn new(tcp_established: bool, pid: i32) -> Result<PreparedLock> {
        if !tcp_established {
            return Ok(PreparedLock(None));
        }
        let t = std::time::Instant::now();
        let l = lock::NetLock::create(&lock_tag(pid))?;
        let g = guard::RepairGuard::spawn()?;
        log::debug!(
            "network lock and repair guard prepared in {:.1} ms (before the freeze)",
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(PreparedLock(Some((l, g))))
    }
}

/// Names the lock's pin directory: the dumped PID and cr's own.
fn lock_tag(pid: i32) -> String {
    format!("{pid}-{}", std::process::id())
}

impl DumpNet {
    /// `prepared`: the lock loaded before the freeze ([`PreparedLock`]); it is ours from here.
    pub fn begin(tcp_established: bool, pid: i32, prepared: PreparedLock) -> DumpNet {
        let (lock, guard) = match prepared.0 {
            Some((l, g)) => (Some(l), Some(g)),
            None => (None, None),
        };
        DumpNet {
            tcp_established,
            held: Vec::new(),
            lock,
            guard,
            tag: lock_tag(pid),
            killed: false,
        }
    }

    /// Right after the freeze, before any remote syscall: the tree's TCP sockets from the
    /// inventory (the tracker's table, or a scan: see [`inventory`]) checked against their
    /// fds. Established connections are refused without --tcp-established, each named; with
    /// it, every one goes into the network lock now, in one go. Connections waiting in a
    /// listener's accept queue are lost at restore (as in CRIU): logged.
    pub fn survey(&mut self, pids: &[i32], root: i32, src: &inventory::TableSource) -> Result<()> {
        let s = inventory::survey(pids, root, src)?;
        for (c, l) in &s.unaccepted {
            log::warn!("TCP connection {c} waits in the accept queue of listener {l}: not accepted yet, it is lost (as in CRIU)");
        }
        if s.established.is_empty() {
            // A lock prepared for connections the tree does not have: none to keep.
            self.lock = None;
            return Ok(());
        }
        if !self.tcp_established {
            let named: Vec<String> = s
                .established
                .iter()
                .map(|f| format!("{} (fd {} of PID {})", f.conn, f.fd, f.pid))
                .collect();
            crate::refuse!("--tcp-established", "the tree holds {} established TCP connection(s): {}; dump them with --tcp-established", named.len(), named.join(", "));
        }
        let l = self.lock()?;
        for f in &s.established {
            let c = &f.conn;
            let t = lock::Flow {
                family: if c.family == cr_common::sock::AF_INET {
                    libc::AF_INET as u32
                } else {
                    libc::AF_INET6 as u32
                },
                src_addr: c.addr_bytes(false),
                src_port: c.lport as u32,
                dst_addr: c.addr_bytes(true),
                dst_port: c.rport as u32,
            };
            l.add(&t)
                .with_context(|| format!("lock TCP connection {c}"))?;
        }
        log::info!(
            "{} established TCP connection(s) of the tree locked",
            s.established.len()
        );
        Ok(())
    }

    /// The network lock, made now if no connection needed it yet.
    fn lock(&mut self) -> Result<&mut lock::NetLock> {
        if self.lock.is_none() {
            self.lock = Some(lock::NetLock::create(&self.tag)?);
        }
        self.lock
            .as_mut()
            .context("internal: the network lock vanished")
    }

    /// Before the commit of an image whose tree is killed: the lock's record goes into the
    /// image (the pins it names are made by [`DumpNet::pin_lock`] once the image is complete).
    pub fn write_record(&self, w: &ImageWriter) -> Result<()> {
        match &self.lock {
            Some(l) if l.is_used() => w.write_blob(LOCK_RECORD, &l.record().to_bytes()?),
            _ => Ok(()),
        }
    }

    /// The image is complete and the tree is about to be killed: the lock is pinned (it
    /// outlives cr until a restore or `cr network-unlock` removes it) and the guard let go (the
    /// connections go with the tree, silently, still in repair mode).
    pub fn pin_lock(&mut self) -> Result<()> {
        if let Some(l) = self.lock.as_mut().filter(|l| l.is_used()) {
            l.pin()?;
        }
        if let Some(g) = self.guard.take() {
            g.done();
        }
        Ok(())
    }

    /// The tree is gone: close the connections silently (still in repair mode).
    pub fn target_killed(mut self) {
        self.killed = true;
    }

    /// Takes the connections out of repair mode and removes the lock, now (before a
    /// --leave-running tree runs on).
    pub fn resume(&mut self) {
        for (fd, what) in std::mem::take(&mut self.held) {
            if let Err(e) = tcp::set_repair(&fd, false) {
                log::warn!("{what}: leaving repair mode: {e:#}");
            }
        }
        if let Some(g) = self.guard.take() {
            g.done();
        }
        if let Some(l) = self.lock.take() {
            let rec = l.record().clone();
            // Its links close with it: the connections pass packets again.
            drop(l);
            if rec.locked_at_ns != 0 {
                lock::log_unlocked(&rec);
            }
        }
    }

    /// Why the socket `fd` (cr's copy) cannot be dumped, and the flag that would allow it, or
    /// `None` when it can.
    pub fn refusal(&self, fd: &OwnedFd) -> Result<Option<(String, Option<&'static str>)>> {
        Ok(match tcp::classify(fd)? {
            tcp::SockKind::Listen => None,
            tcp::SockKind::Established if self.tcp_established => None,
            tcp::SockKind::Established => Some((
                "an established TCP connection; dump it with --tcp-established".into(),
                Some("--tcp-established"),
            )),
            tcp::SockKind::Other(what) => Some((what, None)),
        })
    }

    /// Saves the socket `fd` (cr's copy of a socket of the target, inode `inode`). An
    /// established connection is locked, then put in repair mode and held until the dump ends.
    pub fn dump_socket(&mut self, fd: OwnedFd, inode: u64) -> Result<pb::TcpSocket> {
        let kind = tcp::classify(&fd)?;
        let mut s = tcp::describe(&fd, inode, &kind)?;
        match kind {
            tcp::SockKind::Listen => tcp::save_listen(&fd, &mut s)?,
            tcp::SockKind::Established => {
                let what = format!(
                    "TCP connection {} -> {}",
                    tcp::show_addr(s.family, &s.src_addr, s.src_port),
                    tcp::show_addr(s.family, &s.dst_addr, s.dst_port)
                );
                // Locked before its state is read: no packet reaches or leaves it from here on.
                self.lock()?
                    .add(&flow(&s))
                    .map_err(|e| e.context(what.clone()))?;
                if let Some(g) = &self.guard {
                    g.hold(&fd).map_err(|e| e.context(what.clone()))?;
                }
                tcp::set_repair(&fd, true)?;
                let r = tcp::save_established(&fd, &mut s);
                self.held.push((fd, what.clone()));
                r.map_err(|e| e.context(what))?;
            }
            tcp::SockKind::Other(what) => bail!("{what} cannot be dumped"),
        }
        Ok(s)
    }
}

impl Drop for DumpNet {
    fn drop(&mut self) {
        if !self.killed {
            self.resume();
        }
    }
}

/// The lock's view of a saved connection.
fn flow(t: &pb::TcpSocket) -> lock::Flow {
    lock::Flow {
        family: t.family,
        src_addr: t.src_addr.clone(),
        src_port: t.src_port,
        dst_addr: t.dst_addr.clone(),
        dst_port: t.dst_port,
    }
}

/// The network lock a restore removes once the connections are rebuilt. Dropped without
/// [`RestoreLock::release`] (a failed restore), it stays: the connections stay locked for
/// another try, as with CRIU.
pub struct RestoreLock {
    rec: Option<lock::Record>,
}

impl RestoreLock {
    pub fn release(self) {
        if let Some(rec) = &self.rec {
            lock::release(rec);
        }
    }
}

/// The lock record of an image, if its dump pinned a lock.
pub fn lock_record(dir: &ImageDir) -> Result<Option<lock::Record>> {
    if !dir.has(LOCK_RECORD) {
        return Ok(None);
    }
    let b = dir.read_blob(LOCK_RECORD)?;
    Ok(Some(
        lock::Record::from_bytes(&b).with_context(|| format!("{LOCK_RECORD} of the image"))?,
    ))
}

/// `cr network-unlock -D DIR`: removes the network lock the dump in DIR left (the image will
/// not be restored, or the target runs on). Returns whether there was one to remove.
pub fn unlock(dir: &ImageDir) -> Result<bool> {
    let Some(rec) = lock_record(dir)? else {
        return Ok(false);
    };
    lock::release(&rec);
    Ok(true)
}

/// Refuses to restore established connections without --tcp-established, or when the lock the
/// dump left is gone (the peers may have reset them meanwhile).
pub fn check_restore(
    files: &pb::Files,
    tcp_established: bool,
    dir: &ImageDir,
) -> Result<RestoreLock> {
    let est: Vec<&pb::TcpSocket> = files
        .files
        .iter()
        .filter_map(|f| match &f.kind {
            Some(pb::file_entry::Kind::Tcp(t)) if t.state == tcp::TCP_ESTABLISHED => Some(t),
            _ => None,
        })
        .collect();
    let rec = lock_record(dir)?;
    if tcp_established {
        if !est.is_empty() {
            match &rec {
                Some(r) => {
                    let flows: Vec<lock::Flow> = est.iter().map(|t| flow(t)).collect();
                    lock::check_locked(r, &flows)?
                }
                None => bail!(
                    "the image holds established TCP connections but no network lock record ({LOCK_RECORD})"
                ),
            }
        }
        return Ok(RestoreLock { rec });
    }
    if let Some(t) = est.first() {
        crate::refuse!(
            "--tcp-established",
            "the image holds the established TCP connection {} -> {}: restore it with --tcp-established",
            tcp::show_addr(t.family, &t.src_addr, t.src_port),
            tcp::show_addr(t.family, &t.dst_addr, t.dst_port)
        );
    }
    Ok(RestoreLock { rec })
}
