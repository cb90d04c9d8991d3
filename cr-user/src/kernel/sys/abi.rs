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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<super::CloneArgs>(), 88); // CLONE_ARGS_SIZE_VER2
        assert_eq!(std::mem::size_of::<super::PrctlMmMap>(), 104);
    }
}
