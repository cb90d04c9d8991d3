//! Arming write-protection in a frozen target from outside (DESIGN §5).
//!
//! A userfaultfd acts on the mm of the process that created it, so cr has the target create
//! one (a remote `userfaultfd()` through [`Remote`]), takes a copy with pidfd_getfd and closes
//! the target's fd again at once: the target's fd table is as it was (the number was the lowest
//! free one and is free again). From then on every ioctl cr makes on its copy (register,
//! write-protect, and PAGEMAP_SCAN's re-arm) acts on the target's memory.
//!
//! What is registered: private anonymous VMAs only. userfaultfd-wp on file-backed memory
//! (private file mappings, shmem) always keeps "pte markers" for unpopulated or zapped pages,
//! which PAGEMAP_SCAN reports like swapped pages; a zapped page of a private file mapping would
//! then look like an unchanged one. Those VMAs are copied whole at every dump instead (they are
//! usually small: libraries' data segments).

use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

use crate::kernel::proc::maps::{VmFlags, Vma, VmaName};
use crate::kernel::ptrace::Remote;
use crate::kernel::sys::uffd::{Userfaultfd, UFFD_FEATURE_WP_ASYNC};
use crate::kernel::sys::{pidfd_getfd, pidfd_open};
use crate::ranges::RangeSet;

/// `UFFD_USER_MODE_ONLY`: the fallback flag for a target without CAP_SYS_PTRACE when
/// vm.unprivileged_userfaultfd is 0. Write-protect faults are resolved by the kernel in async
/// mode either way, kernel-mode ones included.
const UFFD_USER_MODE_ONLY: u64 = 1;

/// The features cr asks for. WP_ASYNC implies WP_UNPOPULATED on current kernels (markers on
/// never-touched pages), which cr relies on only through PAGEMAP_SCAN's WRITTEN bit.
pub const FEATURES: u64 = UFFD_FEATURE_WP_ASYNC;

/// Whether cr write-protects this VMA (see the module docs).
pub fn trackable(v: &Vma) -> bool {
    !v.shared
        && v.path.is_none()
        && matches!(
            v.name,
            VmaName::Anonymous | VmaName::Anon(_) | VmaName::Heap | VmaName::Stack
        )
        && !v.vm_flags.contains(VmFlags::DROPPABLE)
        && !v.vm_flags.contains(VmFlags::IO)
        && !v.vm_flags.contains(VmFlags::PFNMAP)
}

/// Creates a userfaultfd in the frozen target and returns cr's copy of it, ready (handshake
/// done). The target's own fd is closed before returning, also on error.
pub fn take_userfaultfd(remote: &mut Remote, pid: i32) -> Result<Userfaultfd> {
    let base = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let mut fd = remote.raw_syscall(libc::SYS_userfaultfd, &[base])?;
    if fd == -(libc::EPERM as i64) {
        log::debug!("PID {pid}: userfaultfd() refused (EPERM); retrying with UFFD_USER_MODE_ONLY");
        fd = remote.raw_syscall(libc::SYS_userfaultfd, &[base | UFFD_USER_MODE_ONLY])?;
    }
    if fd < 0 {
        bail!(
            "remote userfaultfd() in PID {pid}: {} (kernel without CONFIG_USERFAULTFD?)",
            std::io::Error::from_raw_os_error(-fd as i32)
        );
    }
    let taken = pidfd_open(pid).and_then(|p| pidfd_getfd(&p, fd as i32));
    let closed = remote.syscall("close(userfaultfd)", libc::SYS_close, &[fd as u64]);
    let ours = taken.with_context(|| format!("take the userfaultfd (fd {fd}) of PID {pid}"))?;
    closed?;
    let uffd = Userfaultfd::from_fd(ours);
    uffd.handshake(FEATURES)
        .with_context(|| format!("userfaultfd of PID {pid}"))?;
    log::debug!(
        "PID {pid}: took its userfaultfd (fd {fd} there, {} here, closed there)",
        uffd_raw(&uffd)
    );
    Ok(uffd)
}

fn uffd_raw(u: &Userfaultfd) -> i32 {
    use std::os::fd::AsFd;
    u.as_fd().as_raw_fd()
}

/// Registers each range (a whole VMA) for async write-protection. Returns those that could be
/// registered; the others (e.g. VM_DROPPABLE memory) are logged and stay untracked: they are
/// copied whole at every dump.
pub fn register(uffd: &Userfaultfd, pid: i32, ranges: &[(u64, u64)]) -> RangeSet {
    let mut ok = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges {
        match uffd.register_wp(s, e - s) {
            Ok(()) => ok.push((s, e)),
            Err(err) => log::debug!("PID {pid}: {s:#x}-{e:#x} stays untracked: {err:#}"),
        }
    }
    RangeSet::from_ranges(ok)
}

/// Write-protects every range (pages written afterwards lose the protection and show as
/// PAGE_IS_WRITTEN; the first write to each also takes a fault cr-ebpf records).
pub fn protect(uffd: &Userfaultfd, ranges: &RangeSet) -> Result<()> {
    for &(s, e) in ranges.ranges() {
        uffd.write_protect(s, e - s, true)?;
    }
    Ok(())
}
