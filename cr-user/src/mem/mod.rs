//! Memory: the VMA list and page plan ([`dump`]), the page copy ([`pages`]), incremental
//! dumps ([`incremental`], [`harvest`], [`arm`]) and the rebuilt address space ([`restore`]).

pub mod arm;
pub mod dump;
pub mod harvest;
pub mod incremental;
pub mod pages;
pub mod restore;
pub mod shmem;

use crate::image::vma;
use crate::kernel::proc::maps::VmFlags;

/// The madvise() advice the kernel remembers per VMA: the smaps flag that shows it, the bit
/// the image keeps it in, and the advice restore gives again.
pub const MADVISE: [(VmFlags, u32, i32); 6] = [
    (VmFlags::DONTCOPY, vma::MADV_DONTFORK, libc::MADV_DONTFORK),
    (
        VmFlags::WIPEONFORK,
        vma::MADV_WIPEONFORK,
        libc::MADV_WIPEONFORK,
    ),
    (VmFlags::HUGEPAGE, vma::MADV_HUGEPAGE, libc::MADV_HUGEPAGE),
    (
        VmFlags::NOHUGEPAGE,
        vma::MADV_NOHUGEPAGE,
        libc::MADV_NOHUGEPAGE,
    ),
    (
        VmFlags::MERGEABLE,
        vma::MADV_MERGEABLE,
        libc::MADV_MERGEABLE,
    ),
    (VmFlags::DONTDUMP, vma::MADV_DONTDUMP, libc::MADV_DONTDUMP),
];
