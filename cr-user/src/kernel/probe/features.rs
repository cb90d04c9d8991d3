//! One function per kernel feature cr relies on. Each really uses the feature (on a child
//! process or on memory of its own), checks the result, and leaves nothing behind: children
//! are killed and reaped ([`Child`]), mappings unmapped, pins and directories removed, and the
//! tc probe runs in a private network namespace that vanishes with its thread.
//!
//! A probe returns a short note on success (logged at debug level) and an error saying what
//! failed otherwise.

use std::os::fd::AsRawFd;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::ptrace;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::child::{raw, read_byte, write_byte_raw, Child, TIMEOUT};
use crate::kernel::sys::abi::CloneArgs;
use crate::kernel::sys::abi::PrctlMmMap;
use crate::kernel::sys::mman::AnonMap as Mapping;
use crate::kernel::sys::pagemap::{PagemapScanner, ScanQuery, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::kernel::sys::pidfd::{pidfd_getfd, pidfd_open};
use crate::kernel::sys::sock;
use crate::kernel::sys::uffd::{Userfaultfd, CR_FEATURES};

const PAGE: usize = cr_common::PAGE_SIZE as usize;

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
    let m = crate::kernel::proc::stat::read_stat(std::process::id() as i32)?;
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
    let m = Mapping::new(pages)?;
    uffd.register_wp(m.addr(), m.len() as u64)?;
    uffd.write_protect(m.addr(), m.len() as u64, true)?;
    Ok((uffd, m))
}

/// userfaultfd with WP_ASYNC + WP_UNPOPULATED: handshake, register, write-protect, and a write
/// to a protected page that the kernel resolves on its own.
pub fn userfaultfd_wp_async() -> Result<String> {
    let (_uffd, m) = armed_region(4)?;
    // With WP_ASYNC the kernel unprotects the page itself; without it this would block forever
    // (the probe's thread timeout reports that).
    m.write(1, 1);
    Ok(format!("armed {} pages at {:#x}", m.len() / PAGE, m.addr()))
}

/// Region-relative indices of the pages of `m` that match `q`.
fn scan_pages(scanner: &mut PagemapScanner, m: &Mapping, q: &ScanQuery) -> Result<Vec<u64>> {
    let regions = scanner.scan(m.addr(), m.addr() + m.len() as u64, q)?;
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
    let m = Mapping::new(6)?;
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
    sock::setsockopt_int(&c, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1, "TCP_REPAIR=1")
        .context("TCP_REPAIR needs CAP_NET_ADMIN")?;
    let seq = sock::setsockopt_int(
        &c,
        libc::IPPROTO_TCP,
        TCP_REPAIR_QUEUE,
        TCP_SEND_QUEUE,
        "TCP_REPAIR_QUEUE",
    )
    .and_then(|_| sock::getsockopt_int(&c, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ"))
    .map(|v| v as u32);
    sock::setsockopt_int(&c, libc::IPPROTO_TCP, libc::TCP_REPAIR, 0, "TCP_REPAIR=0")?;
    Ok(format!("send queue seq {}", seq?))
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
