//! Values of `pb::Vma::kind` and `pb::Vma::madv` (part of the image format: never renumber).

/// Anonymous or file-backed memory restored by mapping it again.
pub const KIND_REGULAR: u32 = 0;
pub const KIND_VDSO: u32 = 1;
pub const KIND_VVAR: u32 = 2;
pub const KIND_VVAR_VCLOCK: u32 = 3;
pub const KIND_VSYSCALL: u32 = 4;
/// The brk area ([heap]).
pub const KIND_HEAP: u32 = 5;
/// The main thread's stack ([stack]).
pub const KIND_STACK: u32 = 6;
/// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS): its pages are in the image.
pub const KIND_SHMEM_ANON: u32 = 7;
pub const KIND_UPROBES: u32 = 8;
/// Something cr cannot restore (dump refuses it; never written).
pub const KIND_UNSUPPORTED: u32 = 99;

/// madvise() advice that the kernel remembers per VMA and restore re-applies.
pub const MADV_DONTFORK: u32 = 1 << 0;
pub const MADV_WIPEONFORK: u32 = 1 << 1;
pub const MADV_HUGEPAGE: u32 = 1 << 2;
pub const MADV_NOHUGEPAGE: u32 = 1 << 3;
pub const MADV_MERGEABLE: u32 = 1 << 4;
pub const MADV_DONTDUMP: u32 = 1 << 5;

/// The kernel-provided mappings: not restored from the image, moved into place instead.
pub fn is_special(kind: u32) -> bool {
    matches!(
        kind,
        KIND_VDSO | KIND_VVAR | KIND_VVAR_VCLOCK | KIND_VSYSCALL | KIND_UPROBES
    )
}
