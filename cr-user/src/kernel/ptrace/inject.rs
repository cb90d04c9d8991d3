//! Remote syscalls: make a stopped tracee execute one syscall on our behalf.
//!
//! Instead of writing code into the target (CRIU's parasite), cr points the tracee's instruction
//! pointer at a `syscall` instruction that already exists in its vDSO and single-steps it. The
//! target's memory is never modified, so a failed dump has nothing to undo but the registers,
//! which [`Remote`] saves on creation and puts back on [`Remote::finish`] (or on drop).
//!
//! `orig_rax` is set to -1 in the injected registers: the kernel then sees no interrupted
//! syscall and does not apply its restart logic (-ERESTARTSYS & co.) to our call. The original
//! registers, restored afterwards, carry the real restart state back.
//!
//! Scratch memory for syscalls that take pointers is an anonymous mapping created in the target
//! with a remote mmap and removed again by [`Remote::finish`].
//!
//! A dump's calls ([`Remote::parked`]) leave the task, after each call, as cr found it: its
//! registers and signal mask put back and the task moved from the step's SIGTRAP stop into an
//! interrupt stop ([`Tracee::park`]), so that cr's death at any moment between two calls lets
//! the task run on unharmed. Only while one call is in flight (the step, the syscall itself,
//! cr's handling of its trap: microseconds, longer for an mmap or munmap of scratch memory) does
//! the task hold the injected registers with every signal blocked; cr's death then costs the
//! task a SIGTRAP. Restore's tasks die with cr anyway (PTRACE_O_EXITKILL): [`Remote::new`].

use std::ffi::CString;

use anyhow::{anyhow, bail, Context, Result};

use super::tracee::Tracee;

/// Bytes of the x86_64 `syscall` instruction.
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// Finds a `syscall` instruction inside `code` (the bytes of an executable mapping at `base`).
pub fn find_syscall_insn(code: &[u8], base: u64) -> Option<u64> {
    code.windows(2)
        .position(|w| w == SYSCALL_INSN)
        .map(|off| base + off as u64)
}

/// Scratch memory in the target.
#[derive(Debug, Clone, Copy)]
pub struct Scratch {
    pub addr: u64,
    pub len: u64,
}

pub struct Remote<'t> {
    pub t: &'t mut Tracee,
    syscall_ip: u64,
    saved: libc::user_regs_struct,
    scratch: Option<Scratch>,
    restored: bool,
    /// [`Remote::parked`]: the task's own signal mask, put back after every call.
    park_mask: Option<u64>,
    /// Parked calls made, and how long the task spent exposed (from its mask blocked to its
    /// park), logged by [`Remote::finish`]: the window docs/architecture.md describes.
    calls: u32,
    exposed: std::time::Duration,
}

impl<'t> Remote<'t> {
    /// Prepares remote calls through the `syscall` instruction at `syscall_ip` (in the target).
    pub fn new(t: &'t mut Tracee, syscall_ip: u64) -> Result<Remote<'t>> {
        let saved = t.regs()?;
        Ok(Remote {
            t,
            syscall_ip,
            saved,
            scratch: None,
            restored: false,
            park_mask: None,
            calls: 0,
            exposed: std::time::Duration::ZERO,
        })
    }

    /// [`Remote::new`] for a dump: every call runs with all signals blocked (a signal sent
    /// meanwhile stays queued with its siginfo, and is dumped as pending) and ends with the
    /// task's registers and mask put back and the task parked in an interrupt stop.
    pub fn parked(t: &'t mut Tracee, syscall_ip: u64) -> Result<Remote<'t>> {
        let mask = t.sigmask()?;
        let mut r = Remote::new(t, syscall_ip)?;
        r.park_mask = Some(mask);
        Ok(r)
    }

    pub fn saved_regs(&self) -> &libc::user_regs_struct {
        &self.saved
    }

    /// Moves the syscall instruction (after the vDSO was moved by restore).
    pub fn set_syscall_ip(&mut self, ip: u64) {
        self.syscall_ip = ip;
    }

    pub fn syscall_ip(&self) -> u64 {
        self.syscall_ip
    }

    /// Runs syscall `nr` with `args` in the target; returns its raw result (-errno on failure).
    pub fn raw_syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        let Some(mask) = self.park_mask else {
            return self.step_syscall(nr, args);
        };
        let t0 = std::time::Instant::now();
        self.t.set_sigmask(!0)?;
        let r = self.step_syscall(nr, args);
        if !self.t.is_attached() {
            return r;
        }
        let back = self
            .t
            .set_regs(&self.saved)
            .and_then(|_| self.t.set_sigmask(mask))
            .and_then(|_| self.t.park());
        self.calls += 1;
        self.exposed += t0.elapsed();
        match (r, back) {
            (Ok(v), Ok(())) => Ok(v),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e.context(format!(
                "task {}: parking it after remote syscall {nr}",
                self.t.tid
            ))),
        }
    }

    fn step_syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        let mut r = self.saved;
        r.rip = self.syscall_ip;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        r.rdi = a(0);
        r.rsi = a(1);
        r.rdx = a(2);
        r.r10 = a(3);
        r.r8 = a(4);
        r.r9 = a(5);
        // Clear the trap flag and direction flag the tracee may have had.
        r.eflags &= !(0x100 | 0x400);
        self.t.set_regs(&r)?;
        let mut last_sig = 0;
        for _ in 0..16 {
            match self.t.step()? {
                None => {
                    let after = self.t.regs()?;
                    if after.rip != self.syscall_ip + 2 {
                        bail!(
                            "remote syscall {nr} in task {}: stopped at {:#x}, expected {:#x}",
                            self.t.tid,
                            after.rip,
                            self.syscall_ip + 2
                        );
                    }
                    return Ok(after.rax as i64);
                }
                Some(sig) => {
                    last_sig = sig;
                    log::debug!(
                        "task {}: signal {sig} arrived during remote syscall {nr} (rip {:#x})",
                        self.t.tid,
                        self.t.regs().map(|r| r.rip).unwrap_or(0)
                    );
                    // A signal arrived before the instruction ran: hold it back (it is sent
                    // again on detach) and retry from the same registers.
                    self.t.stashed.push(sig);
                    self.t.set_regs(&r)?;
                }
            }
        }
        bail!(
            "remote syscall {nr} in task {}: signal {last_sig} kept arriving",
            self.t.tid
        )
    }

    /// Like [`Remote::raw_syscall`], but a negative result is an error naming the call.
    pub fn syscall(&mut self, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.raw_syscall(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(anyhow!(std::io::Error::from_raw_os_error(-r as i32)))
                .with_context(|| format!("remote {what} in task {}", self.t.tid));
        }
        Ok(r as u64)
    }

    /// Maps `len` bytes of scratch memory in the target (once; reused afterwards).
    pub fn scratch(&mut self, len: u64) -> Result<Scratch> {
        if let Some(s) = self.scratch {
            if s.len >= len {
                return Ok(s);
            }
            self.release_scratch()?;
        }
        let len = (len + 4095) & !4095;
        let addr = self.syscall(
            "mmap(scratch)",
            libc::SYS_mmap,
            &[
                0,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        let s = Scratch { addr, len };
        self.scratch = Some(s);
        Ok(s)
    }

    /// Maps scratch memory at a fixed address chosen by the caller (restore: a gap in the
    /// image's layout).
    pub fn scratch_at(&mut self, addr: u64, len: u64) -> Result<Scratch> {
        self.release_scratch()?;
        let len = (len + 4095) & !4095;
        let got = self.syscall(
            "mmap(scratch)",
            libc::SYS_mmap,
            &[
                addr,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
                u64::MAX,
                0,
            ],
        )?;
        if got != addr {
            bail!("scratch mapping landed at {got:#x}, not {addr:#x}");
        }
        let s = Scratch { addr, len };
        self.scratch = Some(s);
        Ok(s)
    }

    pub fn release_scratch(&mut self) -> Result<()> {
        if let Some(s) = self.scratch.take() {
            self.syscall("munmap(scratch)", libc::SYS_munmap, &[s.addr, s.len])?;
        }
        Ok(())
    }

    /// Forgets the scratch mapping without unmapping it (restore unmaps every leftover itself).
    pub fn forget_scratch(&mut self) {
        self.scratch = None;
    }

    /// Writes `data` at `addr` in the target.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        write_mem(self.t.tgid, addr, data)
    }

    /// Reads `buf.len()` bytes at `addr` in the target.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        read_mem(self.t.tgid, addr, buf)
    }

    /// Removes the scratch mapping and puts the original registers back.
    pub fn finish(mut self) -> Result<()> {
        self.release_scratch()?;
        self.t.set_regs(&self.saved)?;
        self.restored = true;
        if self.park_mask.is_some() {
            log::debug!(
                "task {}: {} remote calls, the task exposed for {} us in all",
                self.t.tid,
                self.calls,
                self.exposed.as_micros()
            );
        }
        Ok(())
    }

    /// Ends remote calls without restoring registers (restore sets the final registers itself).
    pub fn done_without_restoring_regs(mut self) {
        self.restored = true;
    }
}

impl Drop for Remote<'_> {
    fn drop(&mut self) {
        if self.restored || !self.t.is_attached() {
            return;
        }
        // An error path: leave the target as it was.
        if let Err(e) = self.release_scratch() {
            log::warn!("task {}: removing scratch memory: {e:#}", self.t.tid);
        }
        if let Err(e) = self.t.set_regs(&self.saved) {
            log::warn!("task {}: restoring registers: {e:#}", self.t.tid);
        }
    }
}

/// Size of the scratch mapping restore maps in a task for syscall arguments.
pub const SCRATCH_LEN: u64 = 64 * 1024;

/// Writes a NUL-terminated string into scratch memory at `off`; returns its address.
pub fn put_str(r: &Remote<'_>, scratch: u64, off: u64, s: &str) -> Result<u64> {
    let c = CString::new(s).with_context(|| format!("path {s:?} contains a NUL byte"))?;
    let bytes = c.as_bytes_with_nul();
    if off + bytes.len() as u64 > SCRATCH_LEN {
        bail!(
            "string of {} bytes does not fit the scratch area",
            bytes.len()
        );
    }
    r.write_mem(scratch + off, bytes)?;
    Ok(scratch + off)
}

/// Runs a clone3 in `t` (a stopped task cr drives) that makes a task with id `tid`; returns
/// the raw result. The new task is in `t.new_tasks`.
pub fn clone3(
    r: &mut Remote<'_>,
    scratch: u64,
    flags: u64,
    exit_signal: u64,
    tid: i32,
) -> Result<i64> {
    let set_tid = scratch + 512;
    r.write_mem(set_tid, &tid.to_ne_bytes())?;
    let args = crate::kernel::sys::abi::clone_args_bytes(flags, exit_signal, set_tid);
    r.write_mem(scratch, &args)?;
    r.raw_syscall(libc::SYS_clone3, &[scratch, args.len() as u64])
}

/// /proc/PID/mem works on any mapping, also read-only ones, and needs no iovec bookkeeping:
/// right for the small transfers of remote calls.
pub fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("open /proc/{pid}/mem"))?;
    f.write_all_at(data, addr)
        .with_context(|| format!("write {} bytes at {addr:#x} of task {pid}", data.len()))
}

pub fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("open /proc/{pid}/mem"))?;
    f.read_exact_at(buf, addr)
        .with_context(|| format!("read {} bytes at {addr:#x} of task {pid}", buf.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_syscall_instruction() {
        let code = [0x90, 0x90, 0x0f, 0x05, 0xc3];
        assert_eq!(find_syscall_insn(&code, 0x1000), Some(0x1002));
        assert_eq!(find_syscall_insn(&[0x0f, 0x90, 0x05], 0), None);
    }
}
