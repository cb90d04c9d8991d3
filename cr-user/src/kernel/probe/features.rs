//! One function per kernel feature cr relies on. Each really uses the feature (on a child
//! process or on memory of its own), checks the result, and leaves nothing behind: children
//! are killed and reaped ([`Child`]), mappings unmapped, pins and directories removed, and the
//! tc probe runs in a private network namespace that vanishes with its thread.
//!
//! A probe returns a short note on success (logged at debug level) and an error saying what
//! failed otherwise.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::ptrace;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::child::{raw, read_byte, write_byte_raw, Child, TIMEOUT};
use crate::kernel::sys::abi::CloneArgs;
use crate::kernel::sys::abi::PrctlMmMap;
use crate::kernel::sys::pagemap::{PagemapScanner, ScanQuery, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::kernel::sys::pidfd::{pidfd_getfd, pidfd_open};
use crate::kernel::sys::uffd::{Userfaultfd, CR_FEATURES};

const PAGE: usize = cr_common::PAGE_SIZE as usize;

/// An anonymous private mapping owned by a probe (unmapped on drop). THP is disabled on it so
/// that every page faults on its own.
struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

impl Mapping {
    fn anon(pages: usize) -> Result<Mapping> {
        let len = pages * PAGE;
        let nz = NonZeroUsize::new(len).ok_or_else(|| anyhow!("empty mapping"))?;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .context("mmap an anonymous probe region")?;
        let m = Mapping { ptr, len };
        // SAFETY: advice on our own fresh mapping.
        unsafe {
            nix::sys::mman::madvise(m.ptr, m.len, nix::sys::mman::MmapAdvise::MADV_NOHUGEPAGE)
        }
        .context("madvise(MADV_NOHUGEPAGE) on the probe region")?;
        Ok(m)
    }

    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn page_addr(&self, i: usize) -> u64 {
        self.addr() + (i * PAGE) as u64
    }

    fn write(&self, i: usize, v: u8) {
        assert!(i * PAGE < self.len);
        // SAFETY: inside our own RW mapping (checked above).
        unsafe { std::ptr::write_volatile((self.ptr.as_ptr() as *mut u8).add(i * PAGE), v) }
    }

    fn read(&self, i: usize) -> u8 {
        assert!(i * PAGE < self.len);
        // SAFETY: inside our own RW mapping (checked above).
        unsafe { std::ptr::read_volatile((self.ptr.as_ptr() as *const u8).add(i * PAGE)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing refers to it any more.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

/// A child that does nothing until killed.
fn idle_child() -> Result<Child> {
    Child::fork(|| loop {
        // SAFETY: pause(2) is async-signal-safe.
        unsafe { libc::pause() };
    })
}

/// PTRACE_SEIZE + PTRACE_INTERRUPT of a child, then its registers.
pub fn ptrace_seize() -> Result<String> {
    let mut child = idle_child()?;
    let pid = child.pid();
    ptrace::seize(pid, ptrace::Options::PTRACE_O_EXITKILL)
        .with_context(|| format!("PTRACE_SEIZE of child {pid}"))?;
    ptrace::interrupt(pid).with_context(|| format!("PTRACE_INTERRUPT of child {pid}"))?;
    match child.wait(TIMEOUT)? {
        WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => {}
        other => bail!("expected PTRACE_EVENT_STOP after PTRACE_INTERRUPT, got {other:?}"),
    }
    let regs =
        ptrace::getregs(pid).with_context(|| format!("PTRACE_GETREGS of stopped child {pid}"))?;
    Ok(format!(
        "child {pid} stopped, in syscall {}",
        regs.orig_rax as i64
    ))
}

/// process_vm_readv of a buffer the child changed after fork.
pub fn process_vm_readv() -> Result<String> {
    const MINE: u8 = 0xA5;
    const CHILDS: u8 = 0x5A;
    let buf = vec![MINE; PAGE];
    let addr = buf.as_ptr() as usize;
    let (r, w) = nix::unistd::pipe().context("pipe")?;
    let wfd = raw(&w);
    let child = Child::fork(move || {
        // SAFETY: the child's copy of `buf`, PAGE bytes at `addr`.
        unsafe { std::ptr::write_bytes(addr as *mut u8, CHILDS, PAGE) };
        write_byte_raw(wfd, b'r');
        loop {
            // SAFETY: async-signal-safe.
            unsafe { libc::pause() };
        }
    })?;
    drop(w);
    read_byte(&r, TIMEOUT)?;
    let mut got = vec![0u8; PAGE];
    let n = crate::kernel::sys::vm::process_vm_readv(child.pid().as_raw(), &mut got, addr as u64)?;
    if n != PAGE || got.iter().any(|b| *b != CHILDS) {
        bail!("process_vm_readv returned {n} bytes that are not the child's memory");
    }
    drop(buf);
    Ok(format!("read {n} bytes of child {}", child.pid()))
}

/// pidfd_open of a child, then pidfd_getfd of an fd only the child still has.
pub fn pidfd_getfd_probe() -> Result<String> {
    let (theirs, other_end) = nix::unistd::pipe().context("pipe")?;
    let st = nix::sys::stat::fstat(&theirs).context("fstat the pipe")?;
    let child = idle_child()?;
    let their_fd = theirs.as_raw_fd();
    drop(theirs);
    let pidfd = pidfd_open(child.pid().as_raw())?;
    let got = pidfd_getfd(&pidfd, their_fd)?;
    let st2 = nix::sys::stat::fstat(&got).context("fstat the fd taken from the child")?;
    if (st.st_dev, st.st_ino) != (st2.st_dev, st2.st_ino) {
        bail!("pidfd_getfd returned a different file");
    }
    drop(other_end);
    Ok(format!("took fd {their_fd} of child {}", child.pid()))
}

/// clone3 with set_tid: a child at a PID chosen here.
pub fn clone3_set_tid() -> Result<String> {
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .context("read /proc/sys/kernel/pid_max")?
        .trim()
        .parse()
        .context("parse /proc/sys/kernel/pid_max")?;
    if pid_max < 1000 {
        bail!("pid_max {pid_max} is too small to pick a free PID");
    }
    let half = pid_max / 2;
    let seed = std::process::id() as i64;
    let mut last_err = None;
    for i in 0..64i64 {
        let want = (half as i64 + (seed * 7919 + i * 104_729) % (half as i64 - 1)) as i32;
        if std::path::Path::new(&format!("/proc/{want}")).exists() {
            continue;
        }
        let tid = [want];
        let args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            set_tid: tid.as_ptr() as u64,
            set_tid_size: 1,
            ..Default::default()
        };
        // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of our memory and
        // immediately _exit()s (async-signal-safe) without touching anything else.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if r == 0 {
            // SAFETY: in the child; _exit is async-signal-safe.
            unsafe { libc::_exit(0) };
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                last_err = Some(e);
                continue; // taken meanwhile: try another
            }
            return Err(e).context(format!("clone3 with set_tid={want} (needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, Linux 5.5+)"));
        }
        let mut child = Child::adopt(Pid::from_raw(r as i32));
        let code = child.wait_exit(TIMEOUT)?;
        if r as i32 != want {
            bail!("clone3 asked for PID {want}, the child got {r}");
        }
        if code != 0 {
            bail!("the clone3 child exited with {code}");
        }
        return Ok(format!("child created at PID {want}"));
    }
    Err(anyhow!(
        "no free PID found to test clone3 set_tid (last error: {last_err:?})"
    ))
}

/// Fields of /proc/self/stat that PR_SET_MM_MAP takes (man 5 proc numbering).
struct MmFields {
    start_code: u64,
    end_code: u64,
    start_stack: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
}

fn parse_stat_mm(stat: &str) -> Result<MmFields> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("no ')' in /proc/self/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state).
    let get = |n: usize| -> Result<u64> {
        f.get(n - 3)
            .ok_or_else(|| anyhow!("/proc/self/stat has no field {n}"))?
            .parse()
            .with_context(|| format!("field {n} of /proc/self/stat"))
    };
    Ok(MmFields {
        start_code: get(26)?,
        end_code: get(27)?,
        start_stack: get(28)?,
        start_data: get(45)?,
        end_data: get(46)?,
        start_brk: get(47)?,
        arg_start: get(48)?,
        arg_end: get(49)?,
        env_start: get(50)?,
        env_end: get(51)?,
    })
}

/// prctl(PR_SET_MM, PR_SET_MM_MAP) in a child, setting its mm fields to their current values.
pub fn prctl_mm_map() -> Result<String> {
    let mut size: u32 = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE writes one u32 at the pointer.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP_SIZE,
            &mut size as *mut u32,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context(
            "prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE) (kernel without CONFIG_CHECKPOINT_RESTORE?)",
        );
    }
    if size as usize != std::mem::size_of::<PrctlMmMap>() {
        bail!(
            "the kernel's struct prctl_mm_map is {size} bytes, cr's is {}",
            std::mem::size_of::<PrctlMmMap>()
        );
    }
    let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    let m = parse_stat_mm(&stat)?;
    let mut child = Child::fork(move || {
        // SAFETY: brk(0) only reports the current break.
        let brk = unsafe { libc::syscall(libc::SYS_brk, 0) } as u64;
        let map = PrctlMmMap {
            start_code: m.start_code,
            end_code: m.end_code,
            start_data: m.start_data,
            end_data: m.end_data,
            start_brk: m.start_brk,
            brk,
            start_stack: m.start_stack,
            arg_start: m.arg_start,
            arg_end: m.arg_end,
            env_start: m.env_start,
            env_end: m.env_end,
            auxv: 0,
            auxv_size: 0,
            exe_fd: u32::MAX,
        };
        // SAFETY: PR_SET_MM_MAP reads a prctl_mm_map of the given size (checked above) and
        // sets this child's own mm fields to the values they already have.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_MM,
                libc::PR_SET_MM_MAP,
                &map as *const PrctlMmMap,
                std::mem::size_of::<PrctlMmMap>(),
                0,
            )
        };
        if r == 0 {
            0
        } else {
            // SAFETY: reading this thread's errno.
            unsafe { *libc::__errno_location() }
        }
    })?;
    match child.wait_exit(TIMEOUT)? {
        0 => Ok("a child re-set its mm fields".into()),
        e => Err(std::io::Error::from_raw_os_error(e))
            .context("prctl(PR_SET_MM, PR_SET_MM_MAP) in a child (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)"),
    }
}

/// A region of `pages` pages registered with an async write-protect userfaultfd and
/// write-protected.
fn armed_region(pages: usize) -> Result<(Userfaultfd, Mapping)> {
    let uffd = Userfaultfd::new_local()?;
    uffd.handshake(CR_FEATURES)?;
    let m = Mapping::anon(pages)?;
    uffd.register_wp(m.addr(), m.len as u64)?;
    uffd.write_protect(m.addr(), m.len as u64, true)?;
    Ok((uffd, m))
}

/// userfaultfd with WP_ASYNC + WP_UNPOPULATED: handshake, register, write-protect, and a write
/// to a protected page that the kernel resolves on its own.
pub fn userfaultfd_wp_async() -> Result<String> {
    let (_uffd, m) = armed_region(4)?;
    // With WP_ASYNC the kernel unprotects the page itself; without it this would block forever
    // (the probe's thread timeout reports that).
    m.write(1, 1);
    Ok(format!("armed {} pages at {:#x}", m.len / PAGE, m.addr()))
}

/// Region-relative indices of the pages of `m` that match `q`.
fn scan_pages(scanner: &mut PagemapScanner, m: &Mapping, q: &ScanQuery) -> Result<Vec<u64>> {
    let regions = scanner.scan(m.addr(), m.addr() + m.len as u64, q)?;
    let base = m.addr() / PAGE as u64;
    Ok(regions
        .iter()
        .flat_map(|r| (r.start / PAGE as u64 - base)..(r.end / PAGE as u64 - base))
        .collect())
}

/// PAGEMAP_SCAN: present pages of a fresh region, then (with uffd) the written pages of an
/// armed region with PM_SCAN_WP_MATCHING, which must re-arm them.
pub fn pagemap_scan_probe() -> Result<String> {
    let mut pagemap = PagemapScanner::open(std::process::id() as i32)?;
    let m = Mapping::anon(6)?;
    m.write(0, 1);
    m.write(3, 1);
    let present = ScanQuery {
        category_mask: PAGE_IS_PRESENT,
        return_mask: PAGE_IS_PRESENT,
        ..Default::default()
    };
    let got = scan_pages(&mut pagemap, &m, &present)?;
    if got != [0, 3] {
        bail!("PAGEMAP_SCAN for present pages reported pages {got:?} of a region where 0 and 3 were written");
    }
    let (_uffd, a) = match armed_region(6) {
        Ok(x) => x,
        Err(e) => {
            log::debug!("PAGEMAP_SCAN write-protect matching not tried: {e:#}");
            return Ok(
                "present-page scan works (no userfaultfd WP_ASYNC: WP matching not tried)".into(),
            );
        }
    };
    let wp = ScanQuery {
        category_mask: PAGE_IS_WRITTEN,
        return_mask: PAGE_IS_WRITTEN,
        wp_matching: true,
        check_wpasync: true,
        ..Default::default()
    };
    a.write(1, 1);
    let _ = a.read(2);
    a.write(4, 1);
    let got = scan_pages(&mut pagemap, &a, &wp)?;
    if got != [1, 4] {
        bail!("PAGEMAP_SCAN (WP matching) reported written pages {got:?}, expected [1, 4]");
    }
    let got = scan_pages(&mut pagemap, &a, &wp)?;
    if !got.is_empty() {
        bail!("PAGEMAP_SCAN (WP matching) did not re-arm: second scan reported {got:?}");
    }
    a.write(4, 2);
    let got = scan_pages(&mut pagemap, &a, &wp)?;
    if got != [4] {
        bail!("after re-arming, a write to page 4 was reported as {got:?}");
    }
    Ok("present-page scan and exact written-page scan with re-arm work".into())
}

/// Loads cr-ebpf, attaches the page-fault tracepoints, tracks this process, writes one fresh
/// page and reads another: the write must be recorded, the read not.
pub fn tracepoints() -> Result<String> {
    use cr_common::{TARGET_F_LOG, TARGET_F_TRACK_WRITES};
    let mut t = crate::bpf::Tracker::start()?;
    let me = std::process::id();
    let m = Mapping::anon(2)?;
    let flags = TARGET_F_TRACK_WRITES
        | if log::log_enabled!(log::Level::Debug) {
            TARGET_F_LOG
        } else {
            0
        };
    t.add_target(me, flags)?;
    m.write(0, 1);
    let _ = m.read(1);
    t.remove_target(me)?;
    let pages = t.dirty_pages(me)?;
    let stats = t.stats()?;
    t.flush_log();
    let (w, r) = (
        m.page_addr(0) >> cr_common::PAGE_SHIFT,
        m.page_addr(1) >> cr_common::PAGE_SHIFT,
    );
    if !pages.contains(&w) {
        bail!(
            "the write fault on page {w:#x} was not recorded (recorded {} pages, stats {stats:?})",
            pages.len()
        );
    }
    if pages.contains(&r) {
        bail!("a read fault on page {r:#x} was recorded as a write");
    }
    if stats.read_faults == 0 {
        bail!("no read fault was counted (stats {stats:?})");
    }
    Ok(format!(
        "saw the write to {:#x}; stats {stats:?}",
        m.page_addr(0)
    ))
}

fn setsockopt_int(fd: i32, level: i32, opt: i32, v: i32, what: &str) -> Result<()> {
    // SAFETY: an int option, passed by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const i32 as *const c_void,
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setsockopt {what}={v}"));
    }
    Ok(())
}

fn getsockopt_u32(fd: i32, level: i32, opt: i32, what: &str) -> Result<u32> {
    let mut v: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as u32;
    // SAFETY: a u32 option, buffer and length valid for the call.
    let r =
        unsafe { libc::getsockopt(fd, level, opt, &mut v as *mut u32 as *mut c_void, &mut len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("getsockopt {what}"));
    }
    Ok(v)
}

/// TCP_REPAIR on an established loopback connection: enter repair, read the send queue's
/// sequence number, leave repair.
pub fn tcp_repair() -> Result<String> {
    const TCP_REPAIR_QUEUE: i32 = 20;
    const TCP_SEND_QUEUE: i32 = 2;
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a loopback TCP listener")?;
    let addr = l.local_addr().context("listener address")?;
    let c =
        std::net::TcpStream::connect_timeout(&addr, TIMEOUT).context("connect over loopback")?;
    let (_s, _) = l.accept().context("accept the loopback connection")?;
    let fd = c.as_raw_fd();
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1, "TCP_REPAIR")
        .context("TCP_REPAIR needs CAP_NET_ADMIN")?;
    let seq = setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_QUEUE,
        TCP_SEND_QUEUE,
        "TCP_REPAIR_QUEUE",
    )
    .and_then(|_| getsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ"));
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 0, "TCP_REPAIR")?;
    Ok(format!("send queue seq {}", seq?))
}

/// Map and program of cr-ebpf/src/probe.rs.
const PROBE_TC_PROG: &str = cr_common::names::PROG_PROBE_TC;
const PROBE_TC_MAP: &str = cr_common::names::PROBE_TC;

/// tc BPF: in a private network namespace (so nothing on the host is touched and everything
/// vanishes with the thread), add a clsact qdisc to `lo`, attach cr's probe classifier at
/// ingress, send a datagram over loopback and see the program count it. Where no network
/// namespace can be made, attach through TCX on the host's `lo` instead (a link: gone when
/// dropped, no qdisc left behind).
pub fn tc_bpf() -> Result<String> {
    let h = std::thread::Builder::new()
        .name("cr-check-tc".into())
        .spawn(|| -> Result<String> {
            match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                Ok(()) => {
                    set_lo_up()?;
                    tc_roundtrip(true).map(|n| format!("clsact + classifier on lo (private netns) saw {n} packet(s)"))
                }
                Err(e) => {
                    log::debug!("no private network namespace for the tc probe ({e}); using TCX on the host's lo");
                    tc_roundtrip(false).map(|n| format!("TCX classifier on the host's lo saw {n} packet(s)"))
                }
            }
        })
        .context("start the tc probe thread")?;
    h.join()
        .map_err(|_| anyhow!("the tc probe thread panicked"))?
}

/// Brings `lo` up in the current thread's network namespace.
fn set_lo_up() -> Result<()> {
    // SAFETY: a plain datagram socket, owned right away.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCSIFFLAGS");
    }
    // SAFETY: fresh fd.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write an ifreq, which `ifr` is.
    unsafe {
        if libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            &mut ifr as *mut libc::ifreq,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS on lo");
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            &mut ifr as *mut libc::ifreq,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS (up) on lo");
        }
    }
    Ok(())
}

/// Loads the probe classifier, attaches it at lo ingress (netlink/clsact or TCX), sends one
/// datagram to itself over loopback and returns the program's packet count (must be > 0).
fn tc_roundtrip(netlink: bool) -> Result<u64> {
    use aya::maps::{Array, MapData};
    use aya::programs::tc::{self, NlOptions, TcAttach, TcAttachType};
    use aya::programs::{LinkOrder, SchedClassifier};

    let mut obj = crate::bpf::BpfObject::load()?;
    let count: Array<MapData, u64> = obj.take_map(PROBE_TC_MAP)?;
    let prog: &mut SchedClassifier = obj
        .ebpf_mut()
        .program_mut(PROBE_TC_PROG)
        .ok_or_else(|| anyhow!("the eBPF object has no program {PROBE_TC_PROG} (stale build? run cargo xtask build)"))?
        .try_into()
        .context("cr_probe_tc is not a classifier")?;
    prog.load()
        .context("load the tc probe classifier (verifier)")?;
    if netlink {
        tc::qdisc_add_clsact(c"lo").context("add a clsact qdisc to lo")?;
        prog.attach(
            c"lo",
            TcAttach::Netlink {
                parent: TcAttachType::Ingress.into(),
                options: NlOptions::default(),
            },
        )
        .context("attach the classifier at lo ingress (netlink)")?;
    } else {
        prog.attach(
            c"lo",
            TcAttach::Tcx {
                attach_type: TcAttachType::Ingress,
                order: LinkOrder::default(),
            },
        )
        .context("attach the classifier at lo ingress (TCX)")?;
    }
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a loopback UDP socket")?;
    rx.set_read_timeout(Some(TIMEOUT))
        .context("set a receive timeout")?;
    let to = rx.local_addr().context("UDP socket address")?;
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a loopback UDP socket")?;
    tx.send_to(b"cr check", to)
        .context("send a datagram over loopback")?;
    let mut buf = [0u8; 16];
    // Once received, it has passed lo's ingress hook.
    rx.recv_from(&mut buf)
        .context("receive the datagram sent over loopback")?;
    let n = count
        .get(&0, 0)
        .context("read the probe classifier's counter")?;
    if n == 0 {
        bail!("the datagram crossed lo but the classifier did not run");
    }
    Ok(n)
}

/// Removes a pin and the directory holding it, whatever happened.
struct PinDir {
    dir: std::path::PathBuf,
    mounted: bool,
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("probe"));
        if self.mounted {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// bpffs: create a directory, pin a map there, reopen it from the pin and read what was
/// written through the first handle, then remove both. If /sys/fs/bpf is not a bpffs, the
/// same is done on a bpffs mounted for the purpose on a temporary directory (cr mounts
/// /sys/fs/bpf when it needs it).
pub fn bpffs() -> Result<String> {
    use aya::maps::{Array, Map, MapData};
    let at_sys = crate::kernel::sys::mounts::is_mounted(crate::kernel::sys::mounts::BPFFS, "bpf")?;
    let guard = if at_sys {
        let dir = std::path::Path::new(crate::kernel::sys::mounts::BPFFS)
            .join(format!("cr-check-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        PinDir {
            dir,
            mounted: false,
        }
    } else {
        if !crate::kernel::sys::mounts::kernel_has_fs("bpf")? {
            bail!("this kernel has no bpf filesystem");
        }
        let dir = std::env::temp_dir().join(format!("cr-check-bpffs-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let mut g = PinDir {
            dir,
            mounted: false,
        };
        crate::kernel::sys::mounts::mount_fs("bpf", &g.dir)?;
        g.mounted = true;
        g
    };
    let pin = guard.dir.join("probe");
    let mut a: Array<MapData, u64> = Array::create(1, 0).context("create a BPF array map")?;
    a.set(0, &0xC0FFEE, 0).context("write the BPF array map")?;
    a.pin(&pin)
        .with_context(|| format!("pin a map at {}", pin.display()))?;
    let back =
        MapData::from_pin(&pin).with_context(|| format!("open the pin {}", pin.display()))?;
    let back: Array<MapData, u64> =
        Array::try_from(Map::Array(back)).context("the pinned map's type")?;
    if back.get(&0, 0).context("read the pinned map")? != 0xC0FFEE {
        bail!("the map reopened from its pin does not hold what was written");
    }
    std::fs::remove_file(&pin).with_context(|| format!("remove the pin {}", pin.display()))?;
    Ok(if at_sys {
        format!(
            "pinned and removed a map under {}",
            crate::kernel::sys::mounts::BPFFS
        )
    } else {
        "bpffs works (not mounted at /sys/fs/bpf; cr mounts it when needed)".into()
    })
}

/// nftables (optional): the `nft` tool answers.
pub fn nftables() -> Result<String> {
    let mut child = std::process::Command::new("nft")
        .arg("--version")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("run `nft --version` (nftables tools not installed?)")?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(st) = child.try_wait().context("wait for nft")? {
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                use std::io::Read;
                let _ = o.read_to_string(&mut out);
            }
            if !st.success() {
                bail!("`nft --version` failed ({st})");
            }
            return Ok(out.trim().to_string());
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`nft --version` did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mm_fields_of_stat() {
        // A real /proc/self/stat line (comm with a space and a parenthesis).
        let s = "1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 12345 10000000 200 \
                 18446744073709551615 94000000000000 94000000100000 140720000000000 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 \
                 94000000200000 94000000210000 94000001000000 140720000001000 140720000001100 140720000001100 140720000002000 0";
        let m = parse_stat_mm(s).unwrap();
        assert_eq!(m.start_code, 94000000000000);
        assert_eq!(m.end_code, 94000000100000);
        assert_eq!(m.start_stack, 140720000000000);
        assert_eq!(m.start_data, 94000000200000);
        assert_eq!(m.start_brk, 94000001000000);
        assert_eq!(m.env_end, 140720000002000);
        assert!(parse_stat_mm("1 (x) S 1").is_err());
    }
}
