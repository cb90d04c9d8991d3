//! userfaultfd in asynchronous write-protect mode: how cr makes every first write to a page
//! after a harvest take a fault (which cr-ebpf sees) and leave a mark that PAGEMAP_SCAN
//! ([`super::pagemap`]) reports (PAGE_IS_WRITTEN), without ever stopping the writer.
//!
//! With UFFD_FEATURE_WP_ASYNC the kernel resolves write-protect faults itself (no handler
//! thread); with UFFD_FEATURE_WP_UNPOPULATED even never-touched pages are protected, so a
//! fresh page's first write counts too. The ioctls act on the mm the uffd was created in: a
//! uffd taken from a target with pidfd_getfd arms the target's memory from inside cr.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

/// `UFFD_API` (the only API version).
pub const UFFD_API: u64 = 0xAA;
/// Write-protect unpopulated (never faulted) pages too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The kernel resolves write-protect faults itself; userspace only scans.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// The features cr's write tracking needs.
pub const CR_FEATURES: u64 = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;

const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `_UFFDIO_WRITEPROTECT` in the ioctls a registration allows.
const UFFDIO_WRITEPROTECT_NR: u64 = 0x06;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO: u8 = 0xAA;
const UFFDIO_API: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(UFFDIO, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(UFFDIO, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WRITEPROTECT: nix::sys::ioctl::ioctl_num_type = nix::request_code_readwrite!(
    UFFDIO,
    UFFDIO_WRITEPROTECT_NR,
    std::mem::size_of::<UffdioWriteprotect>()
);

/// One userfaultfd.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

/// `ioctl(fd, req, arg)` on a userfaultfd.
///
/// SAFETY (of the callers' use): every request passed here is paired with the `#[repr(C)]`
/// struct of the size encoded in the request number, and `arg` points to a live instance.
fn uffd_ioctl<T>(
    fd: &OwnedFd,
    req: nix::sys::ioctl::ioctl_num_type,
    arg: &mut T,
) -> nix::Result<()> {
    // SAFETY: see above; the kernel reads and writes at most size_of::<T>() bytes at `arg`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    nix::errno::Errno::result(r).map(drop)
}

impl Userfaultfd {
    /// Creates a userfaultfd for this process's own memory (close-on-exec, non-blocking).
    pub fn new_local() -> Result<Userfaultfd> {
        // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            bail!("userfaultfd(): {e} (kernel without CONFIG_USERFAULTFD, or vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE)");
        }
        // SAFETY: the syscall just returned this fd and nothing else owns it.
        Ok(Userfaultfd {
            fd: unsafe { OwnedFd::from_raw_fd(r as i32) },
        })
    }

    /// Wraps a userfaultfd obtained elsewhere (e.g. with pidfd_getfd from a target).
    pub fn from_fd(fd: OwnedFd) -> Userfaultfd {
        Userfaultfd { fd }
    }

    /// The UFFDIO_API handshake, enabling `features`. Returns every feature the kernel
    /// supports. Fails if one of `features` is not supported.
    pub fn handshake(&self, features: u64) -> Result<u64> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        uffd_ioctl(&self.fd, UFFDIO_API, &mut api).with_context(|| {
            format!("UFFDIO_API with features {features:#x} (this kernel lacks one of them)")
        })?;
        if api.features & features != features {
            bail!(
                "UFFDIO_API: kernel accepted but reports features {:#x}, missing {:#x}",
                api.features,
                features & !api.features
            );
        }
        Ok(api.features)
    }

    /// Registers `[start, start+len)` for write-protect tracking.
    pub fn register_wp(&self, start: u64, len: u64) -> Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        uffd_ioctl(&self.fd, UFFDIO_REGISTER, &mut reg)
            .with_context(|| format!("UFFDIO_REGISTER (write-protect) of {start:#x}+{len:#x}"))?;
        if reg.ioctls & (1 << UFFDIO_WRITEPROTECT_NR) == 0 {
            bail!("UFFDIO_REGISTER of {start:#x}+{len:#x}: the kernel does not allow UFFDIO_WRITEPROTECT there");
        }
        Ok(())
    }

    /// Write-protects (`protect`) or unprotects `[start, start+len)`.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<()> {
        let mode = if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        uffd_ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut wp)
            .with_context(|| format!("UFFDIO_WRITEPROTECT({protect}) of {start:#x}+{len:#x}"))
    }
}

/// Missing-page mode: restore fills fresh memory with UFFDIO_COPY (allocate and copy in one
/// step, with no zeroing and no per-page fault).
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const UFFDIO_UNREGISTER: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_read!(UFFDIO, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(UFFDIO, 0x03, std::mem::size_of::<UffdioCopy>());

impl Userfaultfd {
    /// Registers `[start, start+len)` in missing-page mode (anonymous and shmem memory only).
    pub fn register_missing(&self, start: u64, len: u64) -> Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        uffd_ioctl(&self.fd, UFFDIO_REGISTER, &mut reg)
            .with_context(|| format!("UFFDIO_REGISTER (missing) of {start:#x}+{len:#x}"))
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        let mut r = UffdioRange { start, len };
        uffd_ioctl(&self.fd, UFFDIO_UNREGISTER, &mut r)
            .with_context(|| format!("UFFDIO_UNREGISTER of {start:#x}+{len:#x}"))
    }

    /// Fills the missing pages at `dst` (in the uffd's process) with `data` (in ours).
    pub fn copy(&self, dst: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let mut c = UffdioCopy {
                dst: dst + done as u64,
                src: data[done..].as_ptr() as u64,
                len: (data.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            let r = uffd_ioctl(&self.fd, UFFDIO_COPY, &mut c);
            if c.copy > 0 {
                done += c.copy as usize;
            }
            match r {
                Ok(()) if c.copy > 0 => {}
                Ok(()) => bail!("UFFDIO_COPY to {:#x} made no progress", dst + done as u64),
                Err(nix::errno::Errno::EAGAIN) if c.copy > 0 => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "UFFDIO_COPY of {} bytes to {:#x}",
                            data.len() - done,
                            dst + done as u64
                        )
                    });
                }
            }
        }
        Ok(())
    }
}

impl std::os::fd::AsFd for Userfaultfd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From <linux/userfaultfd.h> on x86_64.
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010aa01);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
    }
}
