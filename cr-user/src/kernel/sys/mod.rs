//! Thin safe wrappers over raw syscalls, one per call (or small family), each `unsafe` block
//! with a `// SAFETY:` note; errors name the call and the pid/fd it was about. With the rest of
//! `kernel/` and `bpf/`, the only place `unsafe` may appear (`cargo xtask lint`).

pub mod abi;
pub mod events;
pub mod fd;
pub mod fs;
pub mod kcmp;
pub mod mman;
pub mod mounts;
pub mod pagemap;
pub mod pidfd;
pub mod process;
pub mod sock;
pub mod sock_diag;
pub mod time;
pub mod uffd;
pub mod unix;
pub mod vm;

pub use pagemap::{PageRegion, PagemapEntry, PagemapScanner, ScanQuery};
pub use pidfd::{pidfd_getfd, pidfd_open, pidfd_send_signal};
pub use vm::{
    process_vm_readv, process_vm_readv_ranges, process_vm_writev, process_vm_writev_ranges,
    process_vm_writev_slices, read_mem_file, write_mem_file, MemFile, RemoteFault, IOV_MAX,
};

/// The system page size (sysconf(_SC_PAGESIZE)), cached.
pub fn page_size() -> u64 {
    static PS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v > 0 {
            v as u64
        } else {
            4096
        }
    })
}
