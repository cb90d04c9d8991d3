//! Files of cr's own: the filesystem under one, block reservation, O_DIRECT on and off,
//! vectored positional writes and writeback hints (the page writer's needs).

use std::fs::File;
use std::os::fd::AsRawFd;

/// The filesystem type (statfs f_type) of the filesystem holding `f`, if it can be read.
pub fn fs_type(f: &File) -> Option<i64> {
    // SAFETY: fstatfs on an fd we own, into a zeroed struct it fills.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(f.as_raw_fd(), &mut st) != 0 {
            return None;
        }
        Some(st.f_type as i64)
    }
}

/// fallocate(f, 0, 0, len): allocates the first `len` bytes' blocks.
pub fn fallocate(f: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an fd we own; integer arguments only.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets or clears O_DIRECT on `f` (F_GETFL + F_SETFL).
pub fn set_direct(f: &File, on: bool) -> std::io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own; only integer arguments.
    let ok = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0
            && libc::fcntl(
                fd,
                libc::F_SETFL,
                if on {
                    fl | libc::O_DIRECT
                } else {
                    fl & !libc::O_DIRECT
                },
            ) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes all of `data`, back to back, at `off`: pwritev of up to IOV_MAX slices per call,
/// resuming after short writes.
pub fn pwritev_all(f: &File, data: &[&[u8]], mut off: u64) -> std::io::Result<()> {
    let mut iov: Vec<libc::iovec> = data
        .iter()
        .filter(|d| !d.is_empty())
        .map(|d| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let n = (iov.len() - first).min(super::IOV_MAX);
        // SAFETY: the iovecs point into slices borrowed for this call (`data`), which the
        // kernel only reads; `n` entries starting at `first` are initialised.
        let r = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov[first..].as_ptr(),
                n as libc::c_int,
                off as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        let mut left = r as usize;
        off += left as u64;
        while left > 0 {
            let v = &mut iov[first];
            if left >= v.iov_len {
                left -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same slice (left < its remaining length).
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(left) }.cast();
                v.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(())
}

/// sync_file_range(SYNC_FILE_RANGE_WRITE): asks the kernel to start writing `len` bytes at
/// `off` back to disk. Only a hint; failure changes nothing but when fsync does the work.
pub fn start_writeback(f: &File, off: u64, len: u64) {
    // SAFETY: sync_file_range only reads its integer arguments; the fd is owned by `f`.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// The data ranges `[start, end)` of `f` (SEEK_DATA/SEEK_HOLE from 0 up to `size`): what a
/// sparse file holds besides holes. Moves `f`'s offset (pass a description of cr's own).
pub fn data_ranges(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let Some(d) = seek(off, libc::SEEK_DATA)? else {
            break;
        };
        let h = seek(d, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if h <= d {
            break;
        }
        out.push((d, h));
        off = h;
    }
    Ok(out)
}

/// memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING): a memfd of cr's own.
pub fn memfd_create(name: &str) -> std::io::Result<File> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid C string; the new fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh fd nothing else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}
