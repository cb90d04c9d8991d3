//! `/proc/PID/maps` and `/proc/PID/smaps`: the VMA list a dump records and a restore must
//! reproduce exactly.
//!
//! `smaps` is preferred: besides the header line it carries `VmFlags` (which tells the dump about
//! MADV_DONTFORK, MADV_WIPEONFORK, MADV_HUGEPAGE, mlock, VM_IO/PFNMAP areas that must not be
//! read, …) and the per-VMA counters that let a dump skip VMAs with nothing resident. `maps` is
//! kept for the cheap post-restore comparison.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};

use anyhow::{anyhow, bail, Context, Result};

use super::{parse_dec, parse_hex, pid_path, read_text};

/// VMA flags as printed in the `VmFlags:` line of smaps (two-letter codes, see proc(5) and
/// `show_smap_vma_flags()` in fs/proc/task_mmu.c).
///
/// The bit values are cr's own numbering, not the kernel's `VM_*` bits (those differ between
/// architectures and kernel versions); only the two-letter codes are the interface.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VmFlags(u64);

macro_rules! vm_flags {
    ($($(#[$doc:meta])* $name:ident = $bit:expr, $code:literal;)*) => {
        impl VmFlags {
            $($(#[$doc])* pub const $name: VmFlags = VmFlags(1u64 << $bit);)*
        }
        /// Code ↔ flag table, in the order the kernel prints them.
        const CODES: &[(&str, VmFlags)] = &[$(($code, VmFlags::$name)),*];
    };
}

vm_flags! {
    /// `rd` readable.
    READ = 0, "rd";
    /// `wr` writable.
    WRITE = 1, "wr";
    /// `ex` executable.
    EXEC = 2, "ex";
    /// `sh` shared.
    SHARED = 3, "sh";
    /// `mr` may read.
    MAYREAD = 4, "mr";
    /// `mw` may write.
    MAYWRITE = 5, "mw";
    /// `me` may execute.
    MAYEXEC = 6, "me";
    /// `ms` may share.
    MAYSHARE = 7, "ms";
    /// `gd` stack segment grows down.
    GROWSDOWN = 8, "gd";
    /// `pf` pure PFN range (device memory): never read its pages.
    PFNMAP = 9, "pf";
    /// `dw` disabled write to the mapped file (old kernels).
    DENYWRITE = 10, "dw";
    /// `lo` pages are locked in memory (mlock).
    LOCKED = 11, "lo";
    /// `io` memory-mapped I/O area: never read its pages.
    IO = 12, "io";
    /// `sr` sequential read advise (MADV_SEQUENTIAL).
    SEQ_READ = 13, "sr";
    /// `rr` random read advise (MADV_RANDOM).
    RAND_READ = 14, "rr";
    /// `dc` do not copy on fork (MADV_DONTFORK).
    DONTCOPY = 15, "dc";
    /// `de` do not expand on remap.
    DONTEXPAND = 16, "de";
    /// `lf` lock on fault (mlock2 MLOCK_ONFAULT).
    LOCKONFAULT = 17, "lf";
    /// `ac` accountable area.
    ACCOUNT = 18, "ac";
    /// `nr` swap space not reserved (MAP_NORESERVE).
    NORESERVE = 19, "nr";
    /// `ht` hugetlb area.
    HUGETLB = 20, "ht";
    /// `sf` synchronous page fault (MAP_SYNC).
    SYNC = 21, "sf";
    /// `nl` non-linear mapping (old kernels).
    NONLINEAR = 22, "nl";
    /// `ar` architecture specific flag (PAT on x86).
    ARCH_1 = 23, "ar";
    /// `wf` wipe on fork (MADV_WIPEONFORK).
    WIPEONFORK = 24, "wf";
    /// `dd` do not include in core dumps (MADV_DONTDUMP).
    DONTDUMP = 25, "dd";
    /// `sd` soft-dirty.
    SOFTDIRTY = 26, "sd";
    /// `mm` mixed map area.
    MIXEDMAP = 27, "mm";
    /// `hg` huge page advise (MADV_HUGEPAGE).
    HUGEPAGE = 28, "hg";
    /// `nh` no-huge page advise (MADV_NOHUGEPAGE).
    NOHUGEPAGE = 29, "nh";
    /// `mg` mergeable advise (MADV_MERGEABLE, KSM).
    MERGEABLE = 30, "mg";
    /// `um` userfaultfd missing tracking.
    UFFD_MISSING = 31, "um";
    /// `uw` userfaultfd write-protect tracking.
    UFFD_WP = 32, "uw";
    /// `ui` userfaultfd minor-fault tracking.
    UFFD_MINOR = 33, "ui";
    /// `ss` shadow stack page.
    SHADOW_STACK = 34, "ss";
    /// `bt` arm64 BTI guarded page.
    ARM64_BTI = 35, "bt";
    /// `mt` arm64 MTE allocation tags enabled.
    MTE = 36, "mt";
    /// `dp` droppable (contents may be freed under pressure; vgetrandom state).
    DROPPABLE = 37, "dp";
    /// `sl` sealed (mseal).
    SEALED = 38, "sl";
}

impl VmFlags {
    /// No flags.
    pub const fn empty() -> Self {
        VmFlags(0)
    }

    /// cr's bit representation (see the type's note: not the kernel's).
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Rebuilds flags from [`VmFlags::bits`]; bits that name no flag are dropped.
    pub fn from_bits_truncate(bits: u64) -> Self {
        let all = CODES.iter().fold(0, |a, (_, f)| a | f.0);
        VmFlags(bits & all)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True when every flag of `other` is set.
    pub const fn contains(self, other: VmFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when any flag of `other` is set.
    pub const fn intersects(self, other: VmFlags) -> bool {
        self.0 & other.0 != 0
    }

    pub fn insert(&mut self, other: VmFlags) {
        self.0 |= other.0;
    }

    pub fn remove(&mut self, other: VmFlags) {
        self.0 &= !other.0;
    }

    /// The flag a two-letter code stands for.
    pub fn from_code(code: &str) -> Option<VmFlags> {
        CODES.iter().find(|(c, _)| *c == code).map(|(_, f)| *f)
    }

    /// Parses the value of a `VmFlags:` line. Unknown codes (a newer kernel) are returned
    /// separately so that callers can decide whether they matter.
    pub fn parse(codes: &str) -> (VmFlags, Vec<String>) {
        let mut flags = VmFlags::empty();
        let mut unknown = Vec::new();
        for code in codes.split_whitespace() {
            match VmFlags::from_code(code) {
                Some(f) => flags.insert(f),
                None => unknown.push(code.to_string()),
            }
        }
        (flags, unknown)
    }

    /// The two-letter codes of the set flags, in kernel order.
    pub fn codes(self) -> Vec<&'static str> {
        CODES
            .iter()
            .filter(|(_, f)| self.contains(*f))
            .map(|(c, _)| *c)
            .collect()
    }
}

impl BitOr for VmFlags {
    type Output = VmFlags;
    fn bitor(self, rhs: VmFlags) -> VmFlags {
        VmFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for VmFlags {
    fn bitor_assign(&mut self, rhs: VmFlags) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for VmFlags {
    type Output = VmFlags;
    fn bitand(self, rhs: VmFlags) -> VmFlags {
        VmFlags(self.0 & rhs.0)
    }
}

impl fmt::Display for VmFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.codes().join(" "))
    }
}

impl fmt::Debug for VmFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmFlags({})", self.codes().join(" "))
    }
}

/// What the last column of a maps line says the VMA is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VmaName {
    /// `[heap]`: the brk area.
    Heap,
    /// `[stack]`: the main thread's stack.
    Stack,
    /// `[vdso]`.
    Vdso,
    /// `[vvar]`.
    Vvar,
    /// `[vvar_vclock]` (6.12+: the vclock pages split out of vvar).
    VvarVclock,
    /// `[vsyscall]`: the legacy fixed page above the user address space.
    Vsyscall,
    /// `[uprobes]`: the uprobes XOL area.
    Uprobes,
    /// `[anon:NAME]`: private anonymous memory named with PR_SET_VMA_ANON_NAME.
    Anon(String),
    /// `[anon_shmem:NAME]`: shared anonymous memory named with PR_SET_VMA_ANON_NAME.
    AnonShmem(String),
    /// A file path (see [`Vma::path`]); includes memfd and `/dev/zero (deleted)` shmem.
    File,
    /// No name: anonymous memory.
    Anonymous,
    /// Anything else, verbatim: another `[...]` name, or a non-path name such as
    /// `anon_inode:[perf_event]`.
    Other(String),
}

/// One VMA, from a maps header line plus (for smaps) its counters and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` in the permissions column (MAP_SHARED); `p` otherwise.
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The mapped file's path without the " (deleted)" suffix; `None` for anonymous and
    /// `[...]` areas. Paths may contain spaces; a newline (shown as `\012`) is decoded.
    pub path: Option<String>,
    /// The path ended in " (deleted)": the file was unlinked (also true for memfd and for
    /// shared anonymous memory, which shows as `/dev/zero (deleted)`).
    pub deleted: bool,
    pub name: VmaName,
    /// From smaps; empty when parsed from maps.
    pub vm_flags: VmFlags,
    /// VmFlags codes this parser does not know (a newer kernel).
    pub unknown_vm_flags: Vec<String>,
    /// smaps counters, in bytes; 0 when parsed from maps.
    pub rss: u64,
    pub pss: u64,
    pub shared_dirty: u64,
    pub private_dirty: u64,
    pub anonymous: u64,
    pub anon_huge_pages: u64,
    pub swap: u64,
    pub locked: u64,
    /// smaps `THPeligible:`.
    pub thp_eligible: Option<bool>,
    /// smaps `ProtectionKey:` (only on kernels/CPUs with memory protection keys).
    pub protection_key: Option<u32>,
}

impl Vma {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// `PROT_*` bits for mmap/mprotect.
    pub fn prot(&self) -> i32 {
        let mut p = libc::PROT_NONE;
        if self.read {
            p |= libc::PROT_READ;
        }
        if self.write {
            p |= libc::PROT_WRITE;
        }
        if self.exec {
            p |= libc::PROT_EXEC;
        }
        p
    }

    /// The permissions column as the kernel prints it ("rw-p").
    pub fn perms(&self) -> String {
        let mut s = String::with_capacity(4);
        s.push(if self.read { 'r' } else { '-' });
        s.push(if self.write { 'w' } else { '-' });
        s.push(if self.exec { 'x' } else { '-' });
        s.push(if self.shared { 's' } else { 'p' });
        s
    }

    /// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, SysV shm): backed by an unlinked
    /// shmem inode, shown as `/dev/zero (deleted)`, `/SYSV…` or `[anon_shmem:…]`.
    pub fn is_shmem_anon(&self) -> bool {
        matches!(self.name, VmaName::AnonShmem(_))
            || (self.deleted && self.path.as_deref() == Some("/dev/zero"))
            || self.path.as_deref().is_some_and(|p| p.starts_with("/SYSV"))
    }
}

/// Returns the first whitespace-separated token and the rest after it.
fn next_token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches([' ', '\t']);
    if s.is_empty() {
        return None;
    }
    let end = s.find([' ', '\t']).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// seq_path() escapes '\n' in paths as `\012`; undo that.
fn unescape_path(s: &str) -> String {
    s.replace("\\012", "\n")
}

const DELETED: &str = " (deleted)";

fn classify(name: &str) -> (VmaName, Option<String>, bool) {
    if name.is_empty() {
        return (VmaName::Anonymous, None, false);
    }
    if name.starts_with('[') && name.ends_with(']') {
        let n = match name {
            "[heap]" => VmaName::Heap,
            "[stack]" => VmaName::Stack,
            "[vdso]" => VmaName::Vdso,
            "[vvar]" => VmaName::Vvar,
            "[vvar_vclock]" => VmaName::VvarVclock,
            "[vsyscall]" => VmaName::Vsyscall,
            "[uprobes]" => VmaName::Uprobes,
            _ => {
                let inner = &name[1..name.len() - 1];
                if let Some(n) = inner.strip_prefix("anon:") {
                    VmaName::Anon(n.to_string())
                } else if let Some(n) = inner.strip_prefix("anon_shmem:") {
                    VmaName::AnonShmem(n.to_string())
                } else {
                    VmaName::Other(name.to_string())
                }
            }
        };
        return (n, None, false);
    }
    let (bare, deleted) = match name.strip_suffix(DELETED) {
        Some(b) => (b, true),
        None => (name, false),
    };
    let path = unescape_path(bare);
    let kind = if path.starts_with('/') {
        VmaName::File
    } else {
        VmaName::Other(path.clone())
    };
    (kind, Some(path), deleted)
}

/// Parses one maps line (also the header line of each smaps entry):
/// `start-end perms offset major:minor inode [name]`.
pub fn parse_maps_line(line: &str) -> Result<Vma> {
    let bad = || format!("bad maps line {line:?}");
    let (range, rest) = next_token(line).with_context(bad)?;
    let (perms, rest) = next_token(rest).with_context(bad)?;
    let (offset, rest) = next_token(rest).with_context(bad)?;
    let (dev, rest) = next_token(rest).with_context(bad)?;
    let (inode, rest) = next_token(rest).with_context(bad)?;
    let name = rest.trim_start_matches([' ', '\t']);

    let (start, end) = range.split_once('-').with_context(bad)?;
    let start = parse_hex(start, "vma start").with_context(bad)?;
    let end = parse_hex(end, "vma end").with_context(bad)?;
    if end < start {
        bail!("{}: end below start", bad());
    }
    let p = perms.as_bytes();
    if p.len() != 4 {
        bail!("{}: permissions {perms:?}", bad());
    }
    let (major, minor) = dev.split_once(':').with_context(bad)?;
    let (name, path, deleted) = classify(name);
    Ok(Vma {
        start,
        end,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: parse_hex(offset, "offset").with_context(bad)?,
        dev_major: parse_hex(major, "device major")
            .and_then(|v| u32::try_from(v).map_err(|e| anyhow!("{e}")))
            .with_context(bad)?,
        dev_minor: parse_hex(minor, "device minor")
            .and_then(|v| u32::try_from(v).map_err(|e| anyhow!("{e}")))
            .with_context(bad)?,
        inode: parse_dec(inode, "inode").with_context(bad)?,
        path,
        deleted,
        name,
        vm_flags: VmFlags::empty(),
        unknown_vm_flags: Vec::new(),
        rss: 0,
        pss: 0,
        shared_dirty: 0,
        private_dirty: 0,
        anonymous: 0,
        anon_huge_pages: 0,
        swap: 0,
        locked: 0,
        thp_eligible: None,
        protection_key: None,
    })
}

/// Parses `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<Vma>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_maps_line)
        .collect()
}

/// Parses a "NNN kB" smaps value into bytes.
fn kb(value: &str, line: &str) -> Result<u64> {
    let n = value.trim().strip_suffix("kB").unwrap_or(value);
    let n: u64 = parse_dec(n, "size").with_context(|| format!("bad smaps line {line:?}"))?;
    Ok(n * 1024)
}

/// Parses `/proc/PID/smaps`: a maps header line per VMA followed by `Key: value` lines.
/// Keys this parser does not use are skipped, so new kernel fields do not break it.
pub fn parse_smaps(text: &str) -> Result<Vec<Vma>> {
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        let Some((first, rest)) = next_token(line) else {
            continue;
        };
        let Some(key) = first.strip_suffix(':') else {
            out.push(parse_maps_line(line)?);
            continue;
        };
        let vma = out
            .last_mut()
            .with_context(|| format!("smaps field before any VMA header: {line:?}"))?;
        let value = rest.trim();
        match key {
            "VmFlags" => {
                let (flags, unknown) = VmFlags::parse(value);
                vma.vm_flags = flags;
                vma.unknown_vm_flags = unknown;
            }
            "Rss" => vma.rss = kb(value, line)?,
            "Pss" => vma.pss = kb(value, line)?,
            "Shared_Dirty" => vma.shared_dirty = kb(value, line)?,
            "Private_Dirty" => vma.private_dirty = kb(value, line)?,
            "Anonymous" => vma.anonymous = kb(value, line)?,
            "AnonHugePages" => vma.anon_huge_pages = kb(value, line)?,
            "Swap" => vma.swap = kb(value, line)?,
            "Locked" => vma.locked = kb(value, line)?,
            "THPeligible" => vma.thp_eligible = Some(parse_dec::<u32>(value, "THPeligible")? != 0),
            "ProtectionKey" => vma.protection_key = Some(parse_dec(value, "ProtectionKey")?),
            _ => {}
        }
    }
    Ok(out)
}

/// Reads and parses `/proc/PID/smaps`.
pub fn read_smaps(pid: i32) -> Result<Vec<Vma>> {
    let path = pid_path(pid, "smaps");
    parse_smaps(&read_text(&path)?).with_context(|| format!("parse {}", path.display()))
}

/// Reads and parses `/proc/PID/maps`.
pub fn read_maps(pid: i32) -> Result<Vec<Vma>> {
    let path = pid_path(pid, "maps");
    parse_maps(&read_text(&path)?).with_context(|| format!("parse {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d1c0a00000-55d1c0a02000 r--p 00000000 fe:00 247030                     /usr/bin/cat
Size:                  8 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                   8 kB
Pss:                   8 kB
Pss_Dirty:             0 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         8 kB
Private_Dirty:         0 kB
Referenced:            8 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
VmFlags: rd mr mw me dw 
55d1c1c3e000-55d1c1c5f000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  12 kB
Pss:                  12 kB
Shared_Dirty:          0 kB
Private_Dirty:        12 kB
Anonymous:            12 kB
AnonHugePages:         0 kB
Swap:                  4 kB
Locked:                0 kB
THPeligible:           0
ProtectionKey:         0
VmFlags: rd wr mr mw me ac 
7f0000000000-7f0000200000 rw-p 00000000 00:00 0                          [anon:jit cache]
Size:               2048 kB
Rss:                2048 kB
Anonymous:          2048 kB
AnonHugePages:      2048 kB
THPeligible:           1
VmFlags: rd wr mr mw me ac hg dc wf lo zz 
7f0000200000-7f0000201000 rw-s 00001000 00:2a 1234                       /tmp/my dir/data file (deleted)
Size:                  4 kB
Rss:                   4 kB
Shared_Dirty:          4 kB
VmFlags: rd wr sh mr mw me ms 
7f0000201000-7f0000202000 rw-s 00000000 00:01 77                         /memfd:ring buf (deleted)
VmFlags: rd wr sh mr mw me ms 
7f0000202000-7f0000203000 rw-s 00000000 00:01 78                         /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms 
7f0000203000-7f0000204000 rw-s 00000000 00:01 79                         [anon_shmem:shared ring]
VmFlags: rd wr sh mr mw me ms 
7f0000204000-7f0000205000 ---p 00000000 00:00 0 
VmFlags: mr mw me ac 
7f0000205000-7f0000206000 r--p 00000000 00:0f 9                          anon_inode:[perf_event]
VmFlags: rd mr mw me 
7ffd6b7d2000-7ffd6b7f3000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac 
7ffd6b7f6000-7ffd6b7fa000 r--p 00000000 00:00 0                          [vvar]
VmFlags: rd mr pf io de dd 
7ffd6b7fa000-7ffd6b7fc000 r--p 00000000 00:00 0                          [vvar_vclock]
VmFlags: rd mr pf io de dd 
7ffd6b7fc000-7ffd6b7fe000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de sd sl 
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
VmFlags: ex 
";

    #[test]
    fn smaps_sample() {
        let v = parse_smaps(SMAPS).unwrap();
        assert_eq!(v.len(), 14);

        let cat = &v[0];
        assert_eq!((cat.start, cat.end), (0x55d1c0a00000, 0x55d1c0a02000));
        assert!(cat.read && !cat.write && !cat.exec && !cat.shared);
        assert_eq!((cat.dev_major, cat.dev_minor, cat.inode), (0xfe, 0, 247030));
        assert_eq!(cat.path.as_deref(), Some("/usr/bin/cat"));
        assert_eq!(cat.name, VmaName::File);
        assert!(!cat.deleted);
        assert_eq!(cat.rss, 8192);
        assert_eq!(cat.thp_eligible, Some(false));
        assert_eq!(
            cat.vm_flags,
            VmFlags::READ
                | VmFlags::MAYREAD
                | VmFlags::MAYWRITE
                | VmFlags::MAYEXEC
                | VmFlags::DENYWRITE
        );

        let heap = &v[1];
        assert_eq!(heap.name, VmaName::Heap);
        assert_eq!(heap.path, None);
        assert_eq!(
            (heap.rss, heap.anonymous, heap.swap),
            (12 << 10, 12 << 10, 4 << 10)
        );
        assert_eq!(heap.private_dirty, 12 << 10);
        assert_eq!(heap.protection_key, Some(0));
        assert_eq!(heap.perms(), "rw-p");

        let jit = &v[2];
        assert_eq!(jit.name, VmaName::Anon("jit cache".into()));
        assert_eq!(jit.anon_huge_pages, 2 << 20);
        assert!(jit.vm_flags.contains(
            VmFlags::HUGEPAGE | VmFlags::DONTCOPY | VmFlags::WIPEONFORK | VmFlags::LOCKED
        ));
        assert!(!jit.vm_flags.contains(VmFlags::SHARED));
        assert_eq!(jit.unknown_vm_flags, vec!["zz".to_string()]);
        assert_eq!(jit.thp_eligible, Some(true));

        let data = &v[3];
        assert_eq!(data.path.as_deref(), Some("/tmp/my dir/data file"));
        assert!(data.deleted && data.shared);
        assert_eq!(data.offset, 0x1000);
        assert_eq!(data.dev_minor, 0x2a);
        assert_eq!(data.shared_dirty, 4096);
        assert!(!data.is_shmem_anon());

        let memfd = &v[4];
        assert_eq!(memfd.path.as_deref(), Some("/memfd:ring buf"));
        assert!(memfd.deleted);
        assert_eq!(memfd.name, VmaName::File);

        assert!(v[5].is_shmem_anon());
        assert_eq!(v[6].name, VmaName::AnonShmem("shared ring".into()));
        assert!(v[6].is_shmem_anon());

        let guard = &v[7];
        assert_eq!(guard.name, VmaName::Anonymous);
        assert_eq!(guard.prot(), libc::PROT_NONE);
        assert_eq!(guard.perms(), "---p");

        assert_eq!(v[8].name, VmaName::Other("anon_inode:[perf_event]".into()));
        assert_eq!(v[8].path.as_deref(), Some("anon_inode:[perf_event]"));

        assert_eq!(v[9].name, VmaName::Stack);
        assert!(v[9].vm_flags.contains(VmFlags::GROWSDOWN));
        assert_eq!(v[10].name, VmaName::Vvar);
        assert!(v[10]
            .vm_flags
            .contains(VmFlags::PFNMAP | VmFlags::IO | VmFlags::DONTDUMP));
        assert_eq!(v[11].name, VmaName::VvarVclock);
        assert_eq!(v[12].name, VmaName::Vdso);
        assert!(v[12]
            .vm_flags
            .contains(VmFlags::SEALED | VmFlags::SOFTDIRTY | VmFlags::DONTEXPAND));
        assert_eq!(v[12].prot(), libc::PROT_READ | libc::PROT_EXEC);
        assert_eq!(v[13].name, VmaName::Vsyscall);
        assert_eq!(v[13].start, 0xffffffffff600000);
    }

    #[test]
    fn maps_sample_matches_smaps_headers() {
        let maps: String = SMAPS
            .lines()
            .filter(|l| !l.split_whitespace().next().unwrap_or("").ends_with(':'))
            .map(|l| format!("{l}\n"))
            .collect();
        let m = parse_maps(&maps).unwrap();
        let s = parse_smaps(SMAPS).unwrap();
        assert_eq!(m.len(), s.len());
        for (a, b) in m.iter().zip(&s) {
            assert_eq!(
                (a.start, a.end, &a.path, &a.name, a.deleted),
                (b.start, b.end, &b.path, &b.name, b.deleted)
            );
            assert!(a.vm_flags.is_empty());
        }
    }

    #[test]
    fn path_edge_cases() {
        let v = parse_maps_line("7f00-8f00 r--p 00000000 08:01 5   /a/b\\012c (deleted) (deleted)")
            .unwrap();
        assert_eq!(v.path.as_deref(), Some("/a/b\nc (deleted)"));
        assert!(v.deleted);
        let v = parse_maps_line("7f00-8f00 r--p 00000000 08:01 5   /trailing space ").unwrap();
        assert_eq!(v.path.as_deref(), Some("/trailing space "));
        let v = parse_maps_line("7f00-8f00 rw-p 00000000 103:02 5 /x").unwrap();
        assert_eq!((v.dev_major, v.dev_minor), (0x103, 2));
        let v = parse_maps_line("7f00-8f00 rw-p 00000000 00:00 0 [stack:1234]").unwrap();
        assert_eq!(v.name, VmaName::Other("[stack:1234]".into()));
        let v = parse_maps_line("7f00-8f00 rw-p 00000000 00:00 0 [uprobes]").unwrap();
        assert_eq!(v.name, VmaName::Uprobes);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for l in [
            "",
            "7f00 r--p 0 00:00 0",
            "7f00-zz r--p 0 00:00 0",
            "8f00-7f00 r--p 0 00:00 0",
            "7f00-8f00 r--pp 0 00:00 0",
            "7f00-8f00 r--p 0 0000 0",
            "7f00-8f00 r--p 0 00:00",
            "7f00-8f00 r--p 0 00:00 x",
        ] {
            assert!(parse_maps_line(l).is_err(), "{l:?}");
        }
        assert!(parse_smaps("Rss: 4 kB\n").is_err());
        assert!(parse_smaps("7f00-8f00 r--p 0 00:00 0\nRss: x kB\n").is_err());
    }

    #[test]
    fn vm_flags_roundtrip() {
        let (f, unk) = VmFlags::parse("rd wr mr mw me ac dd uw ");
        assert!(unk.is_empty());
        assert_eq!(f.to_string(), "rd wr mr mw me ac dd uw");
        assert_eq!(VmFlags::from_bits_truncate(f.bits()), f);
        assert!(f.intersects(VmFlags::UFFD_WP | VmFlags::IO));
        assert!(!f.contains(VmFlags::UFFD_WP | VmFlags::IO));
        assert_eq!(VmFlags::from_code("mg"), Some(VmFlags::MERGEABLE));
        assert_eq!(VmFlags::from_code("??"), None);
        // Every code is distinct and maps to a distinct bit.
        for (i, (c, fl)) in CODES.iter().enumerate() {
            for (c2, fl2) in &CODES[i + 1..] {
                assert_ne!(c, c2);
                assert_ne!(fl, fl2);
            }
        }
    }

    /// Our own mapping shows up in /proc/self/smaps with the permissions and flags we set.
    #[test]
    fn live_self_smaps() {
        let len = 4 * 4096;
        // SAFETY: fresh anonymous mapping, unmapped below; no Rust references into it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the range is our own fresh mapping.
        assert_eq!(unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) }, 0);
        let addr = p as u64;
        let vmas = read_smaps(std::process::id() as i32).unwrap();
        let maps = read_maps(std::process::id() as i32).unwrap();
        // SAFETY: unmapping the mapping created above.
        unsafe { libc::munmap(p, len) };

        let v = vmas
            .iter()
            .find(|v| v.start == addr)
            .expect("mapping in smaps");
        assert_eq!(v.end, addr + len as u64);
        assert!(v.read && !v.write && v.exec && !v.shared);
        assert_eq!(v.name, VmaName::Anonymous);
        assert!(v
            .vm_flags
            .contains(VmFlags::READ | VmFlags::EXEC | VmFlags::DONTCOPY));
        assert!(maps
            .iter()
            .any(|m| m.start == addr && m.end == addr + len as u64));
        assert!(vmas.iter().any(|v| v.name == VmaName::Stack));
        assert!(vmas.iter().any(|v| v.name == VmaName::Vdso));
    }

    #[test]
    fn read_error_names_file() {
        let e = read_smaps(i32::MAX).unwrap_err();
        assert!(format!("{e:#}").contains(&format!("/proc/{}/smaps", i32::MAX)));
    }
}
