//! The tracker process (`cr __tracker --pid PID`): keeps a target's tracking alive between `cr`
//! invocations (DESIGN §5).
//!
//! It loads cr's eBPF programs, records the target, and then holds things: the programs and
//! their maps, the userfaultfd that write-protects the target's memory (handed over by the dump
//! that armed it) and a small [`TrackerState`]. The one thing it computes is the tree's lock table
//! ([`crate::locks::table`]). Dumps work on the fds it hands out ([`crate::tracker::client`]). It
//! exits when the target does or when told to; exiting closes everything (nothing is pinned).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use crate::bpf::maps::TrackMaps;
use crate::kernel::sys::{fd, pidfd_open, unix};
use crate::locks::table::LockTable;
use crate::tracker::client::{recv, send, Reply, Request, TrackerState};
use crate::tracker::locks::TableView;
use crate::tracker::rendezvous::Claim;

/// How often the lock events are drained when nothing wakes the tracker (ms).
const LOCK_DRAIN_MS: u16 = 250;

/// How many dumper PIDs the state remembers.
const MAX_DUMPERS: usize = 16;

/// Entry point of `cr __tracker`. `ready_fd` (inherited) receives `READY <pid>` once the
/// tracker listens, or `ERROR <why>`; it is closed either way.
pub fn run(pid: i32, ready_fd: Option<RawFd>, dirty_max_entries: Option<u32>) -> Result<i32> {
    // The spawner passed this fd for us alone.
    let mut ready = ready_fd.map(|fd| std::fs::File::from(fd::take_inherited(fd)));
    let tracker = match Tracker::setup(pid, dirty_max_entries) {
        Ok(t) => t,
        Err(e) => {
            if let Some(r) = ready.as_mut() {
                let _ = writeln!(r, "ERROR {e:#}");
            }
            return Err(e);
        }
    };
    if let Some(mut r) = ready.take() {
        // The cr that started us may be gone (killed mid pre-dump): stay and serve the next
        // dump of the target rather than exit while it may already be connecting.
        if let Err(e) = writeln!(r, "READY {}", std::process::id()) {
            log::warn!("the cr that started this tracker is gone ({e}); serving on");
        }
    }
    log::info!(
        "tracker of PID {pid} ready (tracker PID {})",
        std::process::id()
    );
    tracker.serve()
}

struct Tracker {
    pid: i32,
    pidfd: OwnedFd,
    listener: OwnedFd,
    /// Held for the tracker's life; dropping it removes the socket file.
    _claim: Claim,
    maps: TrackMaps,
    /// One userfaultfd per process of `state.procs`, in that order.
    uffds: Vec<OwnedFd>,
    state: TrackerState,
    /// The tree's file locks (see [`crate::locks::table`]).
    locks: LockTable,
}

impl Tracker {
    fn setup(pid: i32, dirty_max_entries: Option<u32>) -> Result<Tracker> {
        let pidfd = pidfd_open(pid).with_context(|| format!("PID {pid} to track"))?;
        let start_time = crate::kernel::proc::stat::read_stat(pid)?.starttime;
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("create the tracker socket")?;
        // One tracker per target (the claim's lock), on a path only cr's user can make.
        let claim = Claim::take(pid)?;
        let name = claim.socket.display().to_string();
        let addr = UnixAddr::new(&claim.socket).context("socket name")?;
        bind(listener.as_raw_fd(), &addr).with_context(|| format!("bind {name}"))?;
        listen(&listener, Backlog::new(4).context("backlog")?)
            .with_context(|| format!("listen on {name}"))?;
        let mut maps = TrackMaps::load(dirty_max_entries)?;
        maps.add_target(pid as u32)?;
        let locks = LockTable::start(&mut maps.locks, pid);
        let state = TrackerState {
            pid,
            start_time,
            daemon_pid: std::process::id() as i32,
            ..Default::default()
        };
        Ok(Tracker {
            pid,
            pidfd,
            listener,
            _claim: claim,
            maps,
            uffds: Vec::new(),
            state,
            locks,
        })
    }

    /// Waits for the target's exit, new clients, their requests and lock events. Clients are
    /// served side by side (a dump keeps its connection open while it asks for the lock table
    /// on another), each request answered in order; lock events are drained as they come so
    /// that the ring never fills while nobody asks.
    fn serve(mut self) -> Result<i32> {
        let mut clients: Vec<OwnedFd> = Vec::new();
        loop {
            let (ring, ready) = {
                let mut fds = Vec::with_capacity(3 + clients.len());
                fds.push(PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN));
                fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
                let ring = self.maps.locks.ring_fd();
                let has_ring = ring.is_some();
                if let Some(r) = ring {
                    fds.push(PollFd::new(r, PollFlags::POLLIN));
                }
                for c in &clients {
                    fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
                }
                // The lock programs wake us only when their ring is half full: look at it
                // every quarter second meanwhile.
                let timeout = if has_ring {
                    PollTimeout::from(LOCK_DRAIN_MS)
                } else {
                    PollTimeout::NONE
                };
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("poll in the tracker"),
                }
                let ready: Vec<bool> = fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect();
                (has_ring, ready)
            };
            let first_client = if ring { 3 } else { 2 };
            if ring && ready[2] {
                if let Err(e) = self.locks.pump(&mut self.maps.locks) {
                    log::warn!("lock events: {e:#}");
                }
            }
            // Requests first (a client may still be talking when the target exits), newest
            // client last; a client that hung up or failed is dropped.
            for i in (0..clients.len()).rev() {
                if !ready[first_client + i] {
                    continue;
                }
                match self.message(&clients[i]) {
                    Ok(Some(true)) => {
                        log::info!("told to stop: the tracker of PID {} exits", self.pid);
                        return Ok(0);
                    }
                    Ok(Some(false)) => {}
                    Ok(None) => {
                        clients.remove(i);
                    }
                    Err(e) => {
                        log::warn!("tracker connection: {e:#}");
                        clients.remove(i);
                    }
                }
            }
            if ready[0] {
                log::info!("PID {} exited: the tracker stops", self.pid);
                return Ok(0);
            }
            if ready[1] {
                let conn = match unix::accept(&self.listener) {
                    Ok(fd) => fd,
                    Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => {
                        continue
                    }
                    Err(e) => return Err(e).context("accept on the tracker socket"),
                };
                match self.trusted(&conn) {
                    Ok(true) => clients.push(conn),
                    Ok(false) => {}
                    Err(e) => log::warn!("tracker connection: {e:#}"),
                }
            }
        }
    }

    /// Only a client with the tracker's own effective uid (root: cr's) is served: the fds
    /// handed out can rewrite the tracking state and write-protect the target's memory.
    fn trusted(&self, conn: &OwnedFd) -> Result<bool> {
        let cred = getsockopt(conn, sockopt::PeerCredentials)
            .context("credentials of a tracker client")?;
        let me = nix::unistd::geteuid().as_raw();
        if cred.uid() != me {
            log::warn!(
                "refused a tracker client with uid {} (PID {})",
                cred.uid(),
                cred.pid()
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// Serves one request of a client. None: the client hung up; Some(true): `Stop`.
    fn message(&mut self, conn: &OwnedFd) -> Result<Option<bool>> {
        let Some((bytes, fds)) = recv(conn)? else {
            return Ok(None);
        };
        let req: Request = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                self.reply(conn, Err(format!("bad request: {e}")), &[])?;
                return Ok(Some(false));
            }
        };
        log::debug!("request {} with {} fds", request_name(&req), fds.len());
        match req {
            Request::Get => {
                self.maps.sockets.seed_once(&crate::tcp::inventory::seeds);
                let mut out = self.maps.fds()?;
                if self.state.armed {
                    for u in &self.uffds {
                        out.push(u.try_clone().context("dup a userfaultfd")?);
                    }
                }
                let raw: Vec<RawFd> = out.iter().map(|f| f.as_raw_fd()).collect();
                self.reply(conn, Ok(()), &raw)?;
            }
            Request::Register => {
                if let Ok(cred) = getsockopt(conn, sockopt::PeerCredentials) {
                    let p = cred.pid();
                    if !self.state.dumpers.contains(&p) {
                        self.state.dumpers.push(p);
                        let n = self.state.dumpers.len();
                        if n > MAX_DUMPERS {
                            self.state.dumpers.drain(..n - MAX_DUMPERS);
                        }
                    }
                }
                self.reply(conn, Ok(()), &[])?;
            }
            Request::Invalidate => {
                self.state.last_image = None;
                self.state.last_image_crc = None;
                self.reply(conn, Ok(()), &[])?;
            }
            Request::Put { state } => {
                let r = if state.armed && fds.len() != state.procs.len() {
                    Err(format!(
                        "armed with {} userfaultfds for {} processes",
                        fds.len(),
                        state.procs.len()
                    ))
                } else {
                    // The old ones close here: each process's protection lives on in the new
                    // set (a dup of the same userfaultfd) or ends with the process.
                    self.uffds = fds;
                    let keep = (self.state.pid, self.state.start_time, self.state.daemon_pid);
                    let dumpers = std::mem::take(&mut self.state.dumpers);
                    self.state = TrackerState { dumpers, ..state };
                    (self.state.pid, self.state.start_time, self.state.daemon_pid) = keep;
                    Ok(())
                };
                self.reply(conn, r, &[])?;
            }
            Request::Commit { image, crc } => {
                let r = if self.state.last_image.as_deref() == Some(image.as_str()) {
                    self.state.last_image_crc = Some(crc);
                    Ok(())
                } else {
                    Err(format!("{image} is not the image of the last checkpoint"))
                };
                self.reply(conn, r, &[])?;
            }
            Request::Stop => {
                self.reply(conn, Ok(()), &[])?;
                return Ok(Some(true));
            }
            Request::Locks { tree } => {
                let view = self.locks.view(&mut self.maps.locks, &tree);
                log::debug!(
                    "lock table: {} locks, {} unknown inodes, usable: {} {}",
                    view.locks.len(),
                    view.unknown.len(),
                    view.usable,
                    view.why
                );
                self.reply_with(conn, Ok(()), &[], Some(view))?;
            }
            Request::LockSeed { seed } => {
                let r = self
                    .locks
                    .reseed(&mut self.maps.locks, &seed)
                    .map_err(|e| format!("{e:#}"));
                self.reply(conn, r, &[])?;
            }
        }
        Ok(Some(false))
    }

    fn reply(
        &self,
        conn: &OwnedFd,
        r: std::result::Result<(), String>,
        fds: &[RawFd],
    ) -> Result<()> {
        self.reply_with(conn, r, fds, None)
    }

    fn reply_with(
        &self,
        conn: &OwnedFd,
        r: std::result::Result<(), String>,
        fds: &[RawFd],
        locks: Option<TableView>,
    ) -> Result<()> {
        let reply = Reply {
            ok: r.is_ok(),
            error: r.err(),
            state: Some(self.state.clone()),
            fds: fds.len(),
            locks,
        };
        send(
            conn,
            &serde_json::to_vec(&reply).context("encode a reply")?,
            fds,
        )
    }
}

/// A request's name for the log (a seed may be long).
fn request_name(r: &Request) -> String {
    match r {
        Request::Put { .. } => "put".into(),
        Request::LockSeed { seed } => format!("lock-seed ({} locks)", seed.locks.len()),
        r => format!("{r:?}"),
    }
}
