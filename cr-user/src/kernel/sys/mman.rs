//! Memory mappings of cr's own: page buffers for the dump's copy ([`PageBuf`]), read-only
//! views of image files ([`FileMap`]), and anonymous regions for probes and tests
//! ([`AnonMap`]). Each owns its mapping and unmaps it on drop.

use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};

/// A page-aligned anonymous buffer of fixed capacity, with small pages, populated when made
/// (so its cost is paid, and measured, there rather than inside the first read into it). The
/// length in use is set with [`PageBuf::set_len`]; it derefs to that many bytes.
pub struct PageBuf {
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

// SAFETY: a PageBuf exclusively owns its mapping; moving it to another thread moves that
// ownership.
unsafe impl Send for PageBuf {}

impl PageBuf {
    /// A new buffer of `cap` bytes, every page populated (best effort), THP off.
    pub fn new(cap: usize) -> Result<PageBuf> {
        // SAFETY: a fresh anonymous mapping, owned by the PageBuf from here; the advice only
        // concerns it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error()).context("mmap a page buffer");
            }
            libc::madvise(p, cap, libc::MADV_NOHUGEPAGE);
            // Best effort: unpopulated pages are faulted in by the first read instead.
            libc::madvise(p, cap, libc::MADV_POPULATE_WRITE);
            Ok(PageBuf {
                ptr: p.cast(),
                len: cap,
                cap,
            })
        }
    }

    /// Sets the length in use (at most the capacity); the content is whatever was there.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }

    /// False for the empty placeholder left behind by `std::mem::take`.
    pub fn is_mapped(&self) -> bool {
        self.ptr != std::ptr::NonNull::<u8>::dangling().as_ptr()
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies in our live mapping (or is empty for the placeholder).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold it exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if !self.is_mapped() {
            return;
        }
        // SAFETY: unmapping the mapping this value owns.
        unsafe { libc::munmap(self.ptr.cast(), self.cap) };
    }
}

impl Default for PageBuf {
    /// An empty placeholder (no mapping); only `std::mem::take` uses it.
    fn default() -> PageBuf {
        PageBuf {
            ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(),
            len: 0,
            cap: 0,
        }
    }
}

/// A read-only, shared mapping of a whole file.
pub struct FileMap {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned; sharing &[u8] views across threads is sound.
unsafe impl Send for FileMap {}
// SAFETY: as above, nothing mutates through the mapping.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps the first `len` (> 0) bytes of `f`, advised for sequential reading.
    pub fn map_readonly(f: &File, len: usize) -> std::io::Result<FileMap> {
        // SAFETY: a fresh PROT_READ mapping chosen by the kernel (addr NULL) of an fd we hold;
        // it aliases no Rust memory. len > 0 is checked by the caller.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: advice on our own mapping; failure is harmless.
        unsafe { libc::madvise(ptr, len, libc::MADV_SEQUENTIAL) };
        Ok(FileMap { ptr, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live PROT_READ mapping until Drop. (If someone truncates
        // the file meanwhile, access raises SIGBUS: image files must not change under cr.)
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mmap returned; no slice of it outlives self.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// An anonymous private read-write mapping of whole pages (THP off, so every page faults on
/// its own), for probes and tests: its address is what a child or a remote call sees.
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

impl AnonMap {
    /// `pages` fresh pages.
    pub fn new(pages: usize) -> Result<AnonMap> {
        let len = pages * crate::kernel::sys::page_size() as usize;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap an anonymous region");
        }
        let m = AnonMap { ptr: p.cast(), len };
        // SAFETY: advice on our own fresh mapping.
        if unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context("madvise(MADV_NOHUGEPAGE) on an anonymous region");
        }
        Ok(m)
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn page_addr(&self, i: usize) -> u64 {
        self.addr() + (i * crate::kernel::sys::page_size() as usize) as u64
    }

    /// Writes one byte at the start of page `i` (volatile: the write really happens).
    pub fn write(&self, i: usize, v: u8) {
        let off = i * crate::kernel::sys::page_size() as usize;
        assert!(off < self.len);
        // SAFETY: inside our own RW mapping (checked above).
        unsafe { std::ptr::write_volatile(self.ptr.add(off), v) }
    }

    /// Reads the first byte of page `i` (volatile).
    pub fn read(&self, i: usize) -> u8 {
        let off = i * crate::kernel::sys::page_size() as usize;
        assert!(off < self.len);
        // SAFETY: inside our own RW mapping (checked above).
        unsafe { std::ptr::read_volatile(self.ptr.add(off)) }
    }

    /// The whole region (while it is readable and writable).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: our own RW mapping, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// mprotect of `[off, off+len)` of the region to `prot` (PROT_*).
    pub fn protect(&mut self, off: usize, len: usize, prot: i32) -> Result<()> {
        assert!(off + len <= self.len);
        // SAFETY: changing the protection of pages of our own mapping; `&mut self` means no
        // slice of it is alive.
        if unsafe { libc::mprotect(self.ptr.add(off).cast(), len, prot) } != 0 {
            return Err(std::io::Error::last_os_error()).context("mprotect");
        }
        Ok(())
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
