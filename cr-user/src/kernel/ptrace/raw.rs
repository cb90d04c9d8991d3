//! Thin wrappers over ptrace(2) and waitpid(2). Every `unsafe` of the ptrace layer lives here.
//!
//! libc is used directly rather than nix because nix's `Signal` cannot represent real-time
//! signals, and a tracee may stop with any of them.

// libc's PTRACE_* constants are c_uint with glibc but c_int with musl: the `as u32` casts are
// needed there.
#![allow(clippy::unnecessary_cast)]

use std::io;

use anyhow::{bail, Result};

pub const PTRACE_GETSIGMASK: u32 = 0x420a;
pub const PTRACE_SETSIGMASK: u32 = 0x420b;
pub const PTRACE_PEEKSIGINFO: u32 = 0x4209;
pub const PTRACE_GET_RSEQ_CONFIGURATION: u32 = 0x420f;
pub const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
pub const PTRACE_EVENT_STOP: i32 = 128;
pub const PTRACE_EVENT_FORK: i32 = 1;
pub const PTRACE_EVENT_VFORK: i32 = 2;
pub const PTRACE_EVENT_CLONE: i32 = 3;
pub const NT_X86_XSTATE: u32 = 0x202;
pub const NT_PRSTATUS: u32 = 1;

/// ptrace(req, tid, addr, data) returning the raw result.
fn ptrace(req: u32, tid: i32, addr: usize, data: usize) -> io::Result<i64> {
    // SAFETY: every caller passes addr/data that are either integers or pointers to buffers
    // valid for the size the request implies (checked at each call site below).
    let r = unsafe {
        libc::ptrace(
            req as _,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(0) {
            return Err(e);
        }
    }
    Ok(r)
}

pub fn seize(tid: i32, options: u32) -> io::Result<()> {
    ptrace(libc::PTRACE_SEIZE as u32, tid, 0, options as usize).map(drop)
}

pub fn traceme() -> io::Result<()> {
    ptrace(libc::PTRACE_TRACEME as u32, 0, 0, 0).map(drop)
}

pub fn interrupt(tid: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_INTERRUPT as u32, tid, 0, 0).map(drop)
}

pub fn setoptions(tid: i32, options: u32) -> io::Result<()> {
    ptrace(libc::PTRACE_SETOPTIONS as u32, tid, 0, options as usize).map(drop)
}

/// PTRACE_GETEVENTMSG: after a fork/clone event, the new task's id.
pub fn geteventmsg(tid: i32) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    ptrace(
        libc::PTRACE_GETEVENTMSG as u32,
        tid,
        0,
        &mut msg as *mut libc::c_ulong as usize,
    )?;
    Ok(msg as u64)
}

pub fn cont(tid: i32, sig: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_CONT as u32, tid, 0, sig as usize).map(drop)
}

pub fn singlestep(tid: i32, sig: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_SINGLESTEP as u32, tid, 0, sig as usize).map(drop)
}

pub fn detach(tid: i32, sig: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_DETACH as u32, tid, 0, sig as usize).map(drop)
}

/// A register set of all zeroes.
pub fn zeroed_regs() -> libc::user_regs_struct {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

pub fn getregs(tid: i32) -> io::Result<libc::user_regs_struct> {
    let mut regs = zeroed_regs();
    ptrace(
        libc::PTRACE_GETREGS as u32,
        tid,
        0,
        &mut regs as *mut _ as usize,
    )?;
    Ok(regs)
}

pub fn setregs(tid: i32, regs: &libc::user_regs_struct) -> io::Result<()> {
    ptrace(
        libc::PTRACE_SETREGS as u32,
        tid,
        0,
        regs as *const _ as usize,
    )
    .map(drop)
}

/// PTRACE_GETREGSET into `buf`; returns the number of bytes the kernel filled.
pub fn getregset(tid: i32, note: u32, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    ptrace(
        libc::PTRACE_GETREGSET as u32,
        tid,
        note as usize,
        &mut iov as *mut _ as usize,
    )?;
    Ok(iov.iov_len)
}

pub fn setregset(tid: i32, note: u32, buf: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut _,
        iov_len: buf.len(),
    };
    ptrace(
        libc::PTRACE_SETREGSET as u32,
        tid,
        note as usize,
        &mut iov as *mut _ as usize,
    )
    .map(drop)
}

pub fn getsigmask(tid: i32) -> io::Result<u64> {
    let mut mask: u64 = 0;
    ptrace(PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as usize)?;
    Ok(mask)
}

pub fn setsigmask(tid: i32, mask: u64) -> io::Result<()> {
    ptrace(PTRACE_SETSIGMASK, tid, 8, &mask as *const u64 as usize).map(drop)
}

pub fn getsiginfo(tid: i32) -> io::Result<[u8; 128]> {
    let mut si = [0u8; 128];
    ptrace(
        libc::PTRACE_GETSIGINFO as u32,
        tid,
        0,
        si.as_mut_ptr() as usize,
    )?;
    Ok(si)
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// PTRACE_PEEKSIGINFO: copies queued siginfos (without dequeuing them), starting at `off`.
pub fn peeksiginfo(tid: i32, off: u64, shared: bool, out: &mut [[u8; 128]]) -> io::Result<usize> {
    let args = PeekSiginfoArgs {
        off,
        flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
        nr: out.len() as i32,
    };
    let n = ptrace(
        PTRACE_PEEKSIGINFO,
        tid,
        &args as *const _ as usize,
        out.as_mut_ptr() as usize,
    )?;
    Ok(n as usize)
}

/// Raw `struct ptrace_rseq_configuration`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

pub fn get_rseq_configuration(tid: i32) -> io::Result<RseqConfig> {
    let mut c = RseqConfig::default();
    ptrace(
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<RseqConfig>(),
        &mut c as *mut _ as usize,
    )?;
    Ok(c)
}

/// The outcome of waitpid for a tracee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Exited(i32),
    Signaled(i32),
    /// A stop: (stop signal, ptrace event or 0).
    Stopped(i32, i32),
}

/// waitpid(tid, __WALL), retrying on EINTR.
pub fn wait(tid: i32) -> Result<Wait> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            bail!("waitpid({tid}): {e}");
        }
        break;
    }
    Ok(decode(status))
}

/// waitpid(tid, __WALL|WNOHANG): None while nothing is to report.
pub fn try_wait(tid: i32) -> Result<Option<Wait>> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
    if r == -1 {
        bail!("waitpid({tid}): {}", io::Error::last_os_error());
    }
    Ok(if r == 0 { None } else { Some(decode(status)) })
}

pub fn decode(status: i32) -> Wait {
    if libc::WIFEXITED(status) {
        Wait::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Wait::Signaled(libc::WTERMSIG(status))
    } else {
        Wait::Stopped(libc::WSTOPSIG(status), (status >> 16) & 0xff)
    }
}

/// tgkill(tgid, tid, sig).
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
