//! Kernel ABI structs that several layers pass to raw syscalls (one definition each).

/// `struct clone_args` (include/uapi/linux/sched.h), for clone3.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `struct clone_args` as bytes, for a clone3 that cr makes another task run (the task reads
/// it from its own memory): `flags`, `exit_signal`, and the address of a one-element set_tid
/// array in the task.
pub fn clone_args_bytes(flags: u64, exit_signal: u64, set_tid_addr: u64) -> Vec<u8> {
    let args = CloneArgs {
        flags,
        exit_signal,
        set_tid: set_tid_addr,
        set_tid_size: 1,
        ..Default::default()
    };
    [
        args.flags,
        args.pidfd,
        args.child_tid,
        args.parent_tid,
        args.exit_signal,
        args.stack,
        args.stack_size,
        args.tls,
        args.set_tid,
        args.set_tid_size,
        args.cgroup,
    ]
    .iter()
    .flat_map(|w| w.to_ne_bytes())
    .collect()
}

/// `struct prctl_mm_map` (include/uapi/linux/prctl.h), for prctl(PR_SET_MM, PR_SET_MM_MAP).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

impl PrctlMmMap {
    /// The struct as the kernel reads it.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: PrctlMmMap is repr(C) plain data; viewing it as bytes is sound.
        unsafe {
            std::slice::from_raw_parts(
                self as *const PrctlMmMap as *const u8,
                std::mem::size_of::<PrctlMmMap>(),
            )
        }
    }
}

/// `struct flock` as the kernel reads it (x86_64: 32 bytes): a read or write lock of `len`
/// bytes (0: to the end) from `start`, l_pid 0 (F_OFD_SETLK requires it).
pub fn flock_bytes(write: bool, start: u64, len: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    let ty = if write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
    b[0..2].copy_from_slice(&ty.to_ne_bytes());
    b[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
    b[8..16].copy_from_slice(&start.to_ne_bytes());
    b[16..24].copy_from_slice(&len.to_ne_bytes());
    // l_pid (24..28) stays 0: F_OFD_SETLK requires it.
    b
}

#[cfg(test)]
mod tests {
    /// The byte layout matches libc's struct flock.
    #[test]
    fn flock_layout() {
        let b = super::flock_bytes(true, 100, 50);
        // SAFETY: struct flock is plain data of 32 bytes; any bit pattern is valid.
        let f: libc::flock = unsafe { std::ptr::read_unaligned(b.as_ptr() as *const libc::flock) };
        assert_eq!(std::mem::size_of::<libc::flock>(), 32);
        assert_eq!(
            (f.l_type, f.l_whence, f.l_start, f.l_len, f.l_pid),
            (libc::F_WRLCK as i16, libc::SEEK_SET as i16, 100, 50, 0)
        );
    }

    #[test]
    fn sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<super::CloneArgs>(), 88); // CLONE_ARGS_SIZE_VER2
        assert_eq!(std::mem::size_of::<super::PrctlMmMap>(), 104);
    }
}
