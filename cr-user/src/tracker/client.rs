//! Talking to the tracker process of a target ([`crate::cmd::tracker`]): finding it, starting it,
//! and the protocol.
//!
//! The tracker listens on the unix socket `PID.sock` in cr's own runtime directory
//! ([`super::rendezvous`]; SOCK_SEQPACKET: one message per request or reply). Requests and replies are JSON; fds travel
//! with SCM_RIGHTS. A dump asks for the state and the fds (`Get`: the map fds, then the
//! userfaultfd if armed), does all the work itself on those fds, and hands the result back
//! (`Put`, with the userfaultfd when it armed one). The tracker only keeps things alive.
//!
//! Crash safety: before a harvest consumes the dirty set the dump sends `Invalidate` (the
//! tracker forgets which image its state is relative to); `Put` after the harvest names the new
//! image, and `Commit` after the inventory is written records its CRC. A dump that dies in
//! between leaves a state no later dump will build on.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};

use crate::bpf::maps::Counters;
use crate::kernel::sys::{process, unix};
use crate::ranges::RangeSet;
use crate::tracker::locks::{SeedSet, TableView};

/// Largest message (a state with thousands of tracked ranges fits easily).
pub const MAX_MSG: usize = 1 << 20;
/// Most fds in one message.
pub const MAX_FDS: usize = unix::MAX_FDS;
// `Get` sends every map fd and the userfaultfd.
const _: () = assert!(crate::bpf::maps::MAP_FDS < MAX_FDS);

/// The socket of the tracker of `pid`, for messages.
pub fn socket_name(pid: i32) -> String {
    match super::rendezvous::socket_path(pid) {
        Ok(p) => p.display().to_string(),
        Err(_) => format!("the tracker socket of PID {pid}"),
    }
}

/// What the tracker remembers of one process of the tree between dumps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcTrack {
    /// The process and its start time (/proc/PID/stat field 22): a recycled PID is another
    /// process, first seen.
    pub pid: i32,
    pub start_time: u64,
    /// VMA ranges registered for write-protection at the end of the last checkpoint.
    pub tracked: RangeSet,
    /// eBPF counters of this process at the end of the last checkpoint's freeze.
    pub baseline: Counters,
    /// The last harvest saw a lasting way for this process's memory to change without faults
    /// (an O_DIRECT or io_uring fd, a writer of its mem file): the next one is exact too.
    pub sticky: bool,
}

/// What the tracker remembers between dumps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrackerState {
    /// The tracked root process and its start time (/proc/PID/stat field 22): a recycled PID
    /// is another process.
    pub pid: i32,
    pub start_time: u64,
    /// The tracker process itself.
    pub daemon_pid: i32,
    /// The tracker holds one userfaultfd per entry of `procs`, each write-protecting that
    /// process's memory.
    pub armed: bool,
    /// Canonical path of the image whose checkpoint the last harvest (or arming) was for:
    /// the dirty set is relative to it. None: no usable base (never armed, or a dump died
    /// after consuming the dirty set).
    pub last_image: Option<String>,
    /// CRC32C of that image's inventory.img, once committed.
    pub last_image_crc: Option<u32>,
    /// Every process of the tree the last checkpoint armed (the root first), in the order of
    /// the userfaultfds the tracker holds.
    pub procs: Vec<ProcTrack>,
    /// Checkpoints taken with this tracker.
    pub harvests: u64,
    /// PIDs of the cr dumps that worked on the target (their own /proc/PID/mem opens are not
    /// a stranger's writes). Kept by the tracker from the credentials of `Register`.
    pub dumpers: Vec<i32>,
}

impl TrackerState {
    /// The tracking of process `pid` (with its start time), if the last checkpoint armed it.
    pub fn proc(&self, pid: i32, start_time: u64) -> Option<&ProcTrack> {
        self.procs
            .iter()
            .find(|p| p.pid == pid && p.start_time == start_time)
    }
}

/// How many processes of a tree one tracker can hold a userfaultfd for (they travel with the
/// map fds in one message); the rest are copied whole at every dump.
pub const MAX_TRACKED_PROCS: usize = MAX_FDS - crate::bpf::maps::MAP_FDS;

/// A request to the tracker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The state, the map fds and the userfaultfd (if armed).
    Get,
    /// The sender is a dump working on the target: its own writes through /proc/PID/mem
    /// (remote calls) are not a stranger's.
    Register,
    /// Forget the base image (a harvest is about to consume the dirty set).
    Invalidate,
    /// Replace the state; the userfaultfds of its `procs` come along (all of them, in order).
    Put { state: TrackerState },
    /// The image `image` was committed with inventory CRC `crc`.
    Commit { image: String, crc: u32 },
    /// Exit now (the final dump killed the target, or tracking is no longer wanted).
    Stop,
    /// The file-lock table, for a dump of the (frozen) processes `tree`
    /// (`locks::table::LockTable::view`).
    Locks { tree: Vec<i32> },
    /// A dump's exact survey of the frozen tree's locks: the table describes those inodes
    /// exactly again (`locks::table::LockTable::reseed`).
    LockSeed { seed: SeedSet },
}

/// The tracker's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub error: Option<String>,
    pub state: Option<TrackerState>,
    /// Fds sent along: the map fds (`maps::MAP_FDS`), then, if `armed`, the userfaultfd of
    /// each of the state's `procs`.
    pub fds: usize,
    /// The lock table (`Locks`).
    #[serde(default)]
    pub locks: Option<TableView>,
}

/// Sends one message with optional fds.
pub fn send(sock: impl AsFd, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
    unix::send_msg(sock, bytes, fds).context("send to the tracker socket")
}

/// Receives one message and the fds that came with it. Ok(None) at end of stream.
pub fn recv(sock: impl AsFd) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    unix::recv_msg(sock, MAX_MSG).context("the tracker socket")
}

/// A connection to the tracker of one target.
pub struct TrackerConn {
    sock: OwnedFd,
    pub pid: i32,
    /// Requests sent without waiting for their reply (see [`TrackerConn::post`]).
    pending: std::cell::Cell<usize>,
}

/// What `Get` returns.
pub struct Snapshot {
    pub state: TrackerState,
    /// The map fds (see [`crate::bpf::maps::TrackMaps::from_fds`]).
    pub map_fds: Vec<OwnedFd>,
    /// The userfaultfd of each of `state.procs` (empty unless armed).
    pub uffds: Vec<OwnedFd>,
}

impl TrackerConn {
    /// Connects to the tracker of `pid`. Ok(None) if there is none.
    pub fn connect(pid: i32) -> Result<Option<TrackerConn>> {
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("create a unix socket")?;
        let path = super::rendezvous::socket_path(pid)?;
        let addr = UnixAddr::new(&path).context("socket name")?;
        match connect(sock.as_raw_fd(), &addr) {
            Ok(()) => {
                // The directory is ours alone, yet the fds and the word on what changed go only
                // to a tracker of our own uid (belt and braces).
                let cred =
                    nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
                        .context("credentials of the tracker socket's owner")?;
                let me = nix::unistd::geteuid().as_raw();
                if cred.uid() != me {
                    bail!(
                        "{} belongs to PID {} of uid {}, not to a cr tracker (uid {me}): refusing it",
                        path.display(),
                        cred.pid(),
                        cred.uid()
                    );
                }
                Ok(Some(TrackerConn {
                    sock,
                    pid,
                    pending: std::cell::Cell::new(0),
                }))
            }
            Err(nix::errno::Errno::ECONNREFUSED) | Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => {
                Err(anyhow!(e)).with_context(|| format!("connect to the tracker of PID {pid}"))
            }
        }
    }

    /// Sends a request without waiting for the reply (a round trip to another process costs
    /// scheduling latency the frozen target should not pay). Requests are served in order, so
    /// the next call sees its effect; its reply is checked by [`TrackerConn::settle`] or the
    /// next call.
    fn post(&self, req: &Request, fds: &[RawFd]) -> Result<()> {
        let bytes = serde_json::to_vec(req).context("encode a tracker request")?;
        send(&self.sock, &bytes, fds)?;
        self.pending.set(self.pending.get() + 1);
        Ok(())
    }

    /// Waits for the replies of posted requests; the first refusal is the error.
    pub fn settle(&self) -> Result<()> {
        let mut first_err = None;
        while self.pending.get() > 0 {
            self.pending.set(self.pending.get() - 1);
            if let Err(e) = self.read_reply() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn call(&self, req: &Request, fds: &[RawFd]) -> Result<(Reply, Vec<OwnedFd>)> {
        self.settle()?;
        let bytes = serde_json::to_vec(req).context("encode a tracker request")?;
        send(&self.sock, &bytes, fds)?;
        self.read_reply()
    }

    fn read_reply(&self) -> Result<(Reply, Vec<OwnedFd>)> {
        let Some((bytes, fds)) = recv(&self.sock)? else {
            bail!(
                "the tracker of PID {} closed the connection (it exited?)",
                self.pid
            );
        };
        let reply: Reply = serde_json::from_slice(&bytes).context("decode the tracker's reply")?;
        if !reply.ok {
            bail!(
                "the tracker of PID {} refused: {}",
                self.pid,
                reply.error.as_deref().unwrap_or("no reason given")
            );
        }
        Ok((reply, fds))
    }

    /// The state and the fds.
    pub fn get(&self) -> Result<Snapshot> {
        let (reply, mut fds) = self.call(&Request::Get, &[])?;
        let state = reply.state.context("the tracker sent no state")?;
        if fds.len() != reply.fds {
            bail!(
                "the tracker announced {} fds and sent {}",
                reply.fds,
                fds.len()
            );
        }
        if fds.len() < crate::bpf::maps::MAP_FDS {
            bail!(
                "the tracker sent {} fds, fewer than its {} maps",
                fds.len(),
                crate::bpf::maps::MAP_FDS
            );
        }
        let uffds = fds.split_off(crate::bpf::maps::MAP_FDS);
        let want = if state.armed { state.procs.len() } else { 0 };
        if uffds.len() != want {
            bail!(
                "the tracker sent {} userfaultfds for {want} tracked processes",
                uffds.len()
            );
        }
        Ok(Snapshot {
            state,
            map_fds: fds,
            uffds,
        })
    }

    pub fn register(&self) -> Result<()> {
        self.call(&Request::Register, &[]).map(drop)
    }

    /// Forgets the base image (posted: see [`TrackerConn::post`]; the tracker has handled it
    /// before it handles anything this connection sends later).
    pub fn invalidate(&self) -> Result<()> {
        self.post(&Request::Invalidate, &[])
    }

    /// Replaces the state; `uffds` are the userfaultfds of `state.procs`, in order (the
    /// tracker keeps these and closes the ones it held). Posted: the reply is checked by
    /// [`TrackerConn::settle`] (or the next call).
    pub fn put(&self, state: &TrackerState, uffds: &[RawFd]) -> Result<()> {
        self.post(
            &Request::Put {
                state: state.clone(),
            },
            uffds,
        )
    }

    pub fn commit(&self, image: &str, crc: u32) -> Result<()> {
        self.call(
            &Request::Commit {
                image: image.to_string(),
                crc,
            },
            &[],
        )
        .map(drop)
    }

    /// Asks the tracker to exit (it answers first).
    pub fn stop(&self) -> Result<()> {
        self.call(&Request::Stop, &[]).map(drop)
    }

    /// The tracker's state and its file-lock table, for a dump of the processes `tree`.
    pub fn locks(&self, tree: &[i32]) -> Result<(TrackerState, TableView)> {
        let (reply, _) = self.call(
            &Request::Locks {
                tree: tree.to_vec(),
            },
            &[],
        )?;
        let state = reply.state.context("the tracker sent no state")?;
        let view = reply.locks.context("the tracker sent no lock table")?;
        Ok((state, view))
    }

    /// Hands the tracker an exact survey of the frozen tree's locks.
    pub fn lock_seed(&self, seed: &SeedSet) -> Result<()> {
        self.call(&Request::LockSeed { seed: seed.clone() }, &[])
            .map(drop)
    }
}

/// How many dirty pages the tracker's map holds: a quarter of the target's resident anonymous
/// memory, within [16 Ki, 1 Mi] entries. An epoch that writes more loses records and gets the
/// exact scan; a smaller map keeps the harvest fast (taking the set walks every bucket).
fn dirty_map_size(pid: i32) -> u32 {
    let rss_anon_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("RssAnon:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    ((rss_anon_kb / 4) / 4).clamp(16 << 10, 1 << 20) as u32
}

/// The current log level on CRIU's 0..=4 scale, passed on to the tracker.
fn criu_level() -> u8 {
    match log::max_level() {
        log::LevelFilter::Off | log::LevelFilter::Error => 0,
        log::LevelFilter::Warn => 1,
        log::LevelFilter::Info => 2,
        log::LevelFilter::Debug => 3,
        log::LevelFilter::Trace => 4,
    }
}

/// Starts a tracker process for `pid` and connects to it. The tracker is `cr __tracker` (this
/// very binary, /proc/self/exe) in a session of its own, so that the dumping cr's exit, its
/// terminal or its signals do not end it. Returns once the tracker has loaded its programs,
/// started recording `pid` and listens.
pub fn spawn(pid: i32, dirty_max_entries: Option<u32>) -> Result<TrackerConn> {
    let dirty_max_entries = dirty_max_entries.or_else(|| Some(dirty_map_size(pid)));
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("pipe for the tracker's ready message")?;
    let wfd = w.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(format!("-v{}", criu_level())).args([
        "__tracker",
        "--pid",
        &pid.to_string(),
        "--ready-fd",
        "3",
    ]);
    if let Some(n) = dirty_max_entries {
        cmd.args(["--dirty-max-entries", &n.to_string()]);
    }
    if let Some(log) = &crate::tunables::get().tracker_log {
        cmd.arg("-o").arg(log);
    } else {
        cmd.args(["-o", "/dev/null"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/");
    process::new_session_with_fd(&mut cmd, wfd, 3);
    let child = cmd
        .spawn()
        .context("start the tracker process (cr __tracker)")?;
    drop(w);
    let mut msg = String::new();
    std::fs::File::from(r)
        .read_to_string(&mut msg)
        .context("read the tracker's ready message")?;
    // The tracker runs on by itself; it is not ours to wait for.
    drop(child);
    let msg = msg.trim();
    if !msg.starts_with("READY") {
        bail!(
            "the tracker for PID {pid} did not start: {}",
            if msg.is_empty() {
                "it exited without a word (set CR_TRACKER_LOG=FILE to see its log)"
            } else {
                msg
            }
        );
    }
    log::debug!("tracker for PID {pid} started: {msg}");
    TrackerConn::connect(pid)?
        .with_context(|| format!("the tracker of PID {pid} said it was ready but does not answer"))
}
