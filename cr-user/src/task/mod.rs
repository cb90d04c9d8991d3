//! Per-task state: registers, signals, credentials and the rest, dumped ([`dump`]) and
//! restored ([`restore`], [`threads`]).

pub mod dump;
pub mod restore;
pub mod threads;

/// arch_prctl codes for dynamically enabled XSAVE features (asm/prctl.h).
pub const ARCH_GET_XCOMP_PERM: u64 = 0x1022;
pub const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;

/// The kernel's syscall-restart codes (include/linux/errno.h), as left in rax.
pub const ERESTARTSYS: i64 = 512;
pub const ERESTARTNOINTR: i64 = 513;
pub const ERESTARTNOHAND: i64 = 514;
pub const ERESTART_RESTARTBLOCK: i64 = 516;
