//! Workload: an fd table with every kind of file cr restores, each checked by the process itself
//! after restore: regular files (offsets, access modes, O_APPEND, O_NONBLOCK, O_CLOEXEC, a
//! position past 4 GiB), fd numbers (a high fd, dups sharing one offset), an open-but-unlinked
//! file opened twice, /dev/null, /dev/zero, /dev/urandom, pipes and a FIFO with unread data (one
//! pipe and the FIFO grown past 64 KiB), an empty pipe, a directory fd, an O_PATH fd, cwd and
//! umask. It also compares its whole fd table (targets, flags, positions from fdinfo) before
//! and after.
//!
//! Usage: wl_files DIR MODE
//!   DIR   an existing, empty scratch directory (its sibling DIR.stderr gets stderr)
//!   MODE  all | eventfd | socket | tty | io_uring | userfaultfd | perf | bpf | nofollow —
//!         all but `all` and `nofollow` add an fd cr refuses at fd 50 (and 51), for the
//!         failed-dump tests; nofollow adds DIR/nofollow.txt
//!         opened O_NOFOLLOW at fd 50. READY carries "fd=50" in every mode but `all`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use cr_tests::workload::{block_check_signal, ready, wait_for_check, Checker};

const DATA_LEN: usize = 64 * 1024;
const GONE_LEN: usize = 10_000;
const LOG_TEXT: &[u8] = b"hello\n";
/// Past 2^32: a position that needs all 64 bits.
const BIG_POS: u64 = (4 << 30) + (1 << 29) + 77;
const SPARSE_LEN: u64 = 5 << 30;
const MARK: &[u8] = b"MARK-5G";
const SMALL_PIPE_LEN: usize = 1000;
const BIG_PIPE_CAP: i32 = 1 << 20;
const BIG_PIPE_LEN: usize = 300 * 1024;
const FIFO_CAP: i32 = 256 * 1024;
const FIFO_LEN: usize = 100 * 1024;
const UMASK: libc::mode_t = 0o027;
const GONE_MODE: u32 = 0o604;

// The fd layout (fixed numbers, so the harness and the checks agree).
const FD_RD: i32 = 10; // data.bin O_RDONLY, pos 1000
const FD_RD_DUP: i32 = 11; // dup of FD_RD
const FD_WR: i32 = 12; // data.bin O_WRONLY, pos 2000
const FD_APPEND: i32 = 13; // log.txt O_RDWR|O_APPEND, pos 3
const FD_NONBLOCK: i32 = 14; // data.bin O_RDONLY|O_NONBLOCK, pos 5
const FD_HIGH: i32 = 900; // data.bin O_RDONLY, close-on-exec, pos 7
const FD_BIG: i32 = 15; // sparse.bin O_RDWR, pos BIG_POS
const FD_GONE: i32 = 16; // gone.txt (unlinked) O_RDWR, pos 123
const FD_GONE2: i32 = 17; // gone.txt, a second description, O_RDONLY, pos 50
const FD_GONE_DUP: i32 = 40; // dup of FD_GONE
const FD_NULL: i32 = 18;
const FD_ZERO: i32 = 19;
const FD_URANDOM: i32 = 20;
const FD_PIPE_R: i32 = 21; // small pipe with data
const FD_PIPE_W: i32 = 22;
const FD_BIGPIPE_R: i32 = 23; // 1 MiB pipe with 300 KiB, read end O_NONBLOCK, both cloexec
const FD_BIGPIPE_W: i32 = 24;
const FD_FIFO_R: i32 = 25; // FIFO O_RDONLY|O_NONBLOCK, 256 KiB with 100 KiB
const FD_FIFO_W: i32 = 26; // FIFO O_WRONLY
const FD_DIR: i32 = 27; // DIR/sub O_DIRECTORY
const FD_OPATH: i32 = 28; // data.bin O_PATH
const FD_EMPTY_R: i32 = 30; // empty pipe, read end O_NONBLOCK
const FD_EMPTY_W: i32 = 31;
const FD_EXTRA: i32 = 50; // the refused fd of the failure modes
const FD_EXTRA2: i32 = 51;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(7)
                .wrapping_add(i as u32 / 251)
                .wrapping_add(seed as u32) as u8
        })
        .collect()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check_ret(r: libc::c_long, what: &str) -> i64 {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    r
}

/// open(2), then moved to fd `at`.
fn open_at(path: &Path, flags: i32, at: i32) {
    let c = cpath(path);
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644) };
    check_ret(fd as _, &format!("open {}", path.display()));
    move_fd(fd, at, flags & libc::O_CLOEXEC != 0);
}

fn move_fd(fd: i32, at: i32, cloexec: bool) {
    if fd == at {
        return;
    }
    // SAFETY: plain fd syscalls.
    unsafe {
        check_ret(
            libc::dup3(fd, at, if cloexec { libc::O_CLOEXEC } else { 0 }) as _,
            "dup3",
        );
        libc::close(fd);
    }
}

fn seek(fd: i32, pos: u64) {
    // SAFETY: plain lseek.
    check_ret(
        unsafe { libc::lseek(fd, pos as i64, libc::SEEK_SET) },
        "lseek",
    );
}

fn pos(fd: i32) -> i64 {
    // SAFETY: plain lseek.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn write_all(fd: i32, data: &[u8]) {
    if let Err(e) = try_write_all(fd, data) {
        panic!("write to fd {fd}: {e}");
    }
}

/// Writes all of `data`; Err names how far it got (EAGAIN on a full non-blocking pipe).
fn try_write_all(fd: i32, data: &[u8]) -> Result<(), String> {
    let mut off = 0;
    while off < data.len() {
        // SAFETY: valid buffer.
        let n = unsafe { libc::write(fd, data[off..].as_ptr().cast(), data.len() - off) };
        if n < 0 {
            return Err(format!(
                "errno {} after {off} of {} bytes",
                errno(),
                data.len()
            ));
        }
        off += n as usize;
    }
    Ok(())
}

/// read(2) of up to `len` bytes; Err(errno).
fn read(fd: i32, len: usize) -> Result<Vec<u8>, i32> {
    let mut b = vec![0u8; len];
    // SAFETY: valid buffer of `len` bytes.
    let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), len) };
    if n < 0 {
        return Err(errno());
    }
    b.truncate(n as usize);
    Ok(b)
}

/// Reads exactly `len` bytes (a non-blocking fd must already hold them).
fn read_exact(fd: i32, len: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        match read(fd, len - out.len()) {
            Ok(b) if b.is_empty() => return Err(format!("EOF after {} of {len} bytes", out.len())),
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => return Err(format!("errno {e} after {} of {len} bytes", out.len())),
        }
    }
    Ok(out)
}

fn pread(fd: i32, len: usize, off: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    // SAFETY: valid buffer.
    let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), len, off as i64) };
    b.truncate(n.max(0) as usize);
    b
}

fn fstat(fd: i32) -> libc::stat {
    // SAFETY: valid out-pointer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check_ret(libc::fstat(fd, &mut st) as _, "fstat");
        st
    }
}

fn getfl(fd: i32) -> i32 {
    // SAFETY: plain fcntl.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

/// The access mode of `fd`'s description: O_RDONLY, O_WRONLY or O_RDWR.
fn access_mode(fd: i32) -> i32 {
    getfl(fd) & libc::O_ACCMODE
}

fn getfd(fd: i32) -> i32 {
    // SAFETY: plain fcntl.
    unsafe { libc::fcntl(fd, libc::F_GETFD) }
}

fn fionread(fd: i32) -> i32 {
    let mut n = -1;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    n
}

fn pipe_pair(flags: i32) -> (i32, i32) {
    let mut p = [0; 2];
    // SAFETY: valid out-array.
    check_ret(unsafe { libc::pipe2(p.as_mut_ptr(), flags) } as _, "pipe2");
    (p[0], p[1])
}

/// The fd table as /proc shows it: fd → (target with pipe numbers blanked, fdinfo pos, flags).
fn fd_table(skip: &[i32]) -> BTreeMap<i32, (String, String, String)> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut out = BTreeMap::new();
    for fd in fds {
        if skip.contains(&fd) {
            continue;
        }
        let Ok(t) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        let mut t = t.to_string_lossy().into_owned();
        if t.starts_with("pipe:[") {
            t = "pipe:[*]".into();
        }
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("?")
                .trim()
                .to_string()
        };
        out.insert(fd, (t, field("pos:"), field("flags:")));
    }
    out
}

struct Setup {
    dir: PathBuf,
    data: Vec<u8>,
    gone: Vec<u8>,
    small: Vec<u8>,
    big: Vec<u8>,
    fifo: Vec<u8>,
}

fn setup(dir: &Path) -> Setup {
    let s = Setup {
        dir: dir.to_path_buf(),
        data: pattern(1, DATA_LEN),
        gone: pattern(2, GONE_LEN),
        small: pattern(3, SMALL_PIPE_LEN),
        big: pattern(4, BIG_PIPE_LEN),
        fifo: pattern(5, FIFO_LEN),
    };
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("data.bin"), &s.data).unwrap();
    std::fs::write(dir.join("log.txt"), LOG_TEXT).unwrap();
    std::fs::write(dir.join("sub/inner.txt"), b"inner\n").unwrap();
    std::fs::write(dir.join("gone.txt"), &s.gone).unwrap();
    {
        let f = std::fs::File::create(dir.join("sparse.bin")).unwrap();
        f.set_len(SPARSE_LEN).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, MARK, BIG_POS).unwrap();
    }
    let fifo = cpath(&dir.join("fifo"));
    // SAFETY: valid C string.
    check_ret(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } as _, "mkfifo");

    let data = dir.join("data.bin");
    open_at(&data, libc::O_RDONLY, FD_RD);
    seek(FD_RD, 1000);
    // SAFETY: plain dup2.
    check_ret(unsafe { libc::dup2(FD_RD, FD_RD_DUP) } as _, "dup2");
    open_at(&data, libc::O_WRONLY, FD_WR);
    seek(FD_WR, 2000);
    open_at(
        &dir.join("log.txt"),
        libc::O_RDWR | libc::O_APPEND,
        FD_APPEND,
    );
    seek(FD_APPEND, 3);
    open_at(&data, libc::O_RDONLY | libc::O_NONBLOCK, FD_NONBLOCK);
    seek(FD_NONBLOCK, 5);
    open_at(&data, libc::O_RDONLY | libc::O_CLOEXEC, FD_HIGH);
    seek(FD_HIGH, 7);
    open_at(&dir.join("sparse.bin"), libc::O_RDWR, FD_BIG);
    seek(FD_BIG, BIG_POS);

    let gone = dir.join("gone.txt");
    open_at(&gone, libc::O_RDWR, FD_GONE);
    seek(FD_GONE, 123);
    // SAFETY: plain fchmod/dup2.
    unsafe {
        check_ret(libc::fchmod(FD_GONE, GONE_MODE) as _, "fchmod");
        check_ret(libc::dup2(FD_GONE, FD_GONE_DUP) as _, "dup2");
    }
    open_at(&gone, libc::O_RDONLY, FD_GONE2);
    seek(FD_GONE2, 50);
    std::fs::remove_file(&gone).unwrap();

    open_at(Path::new("/dev/null"), libc::O_WRONLY, FD_NULL);
    open_at(Path::new("/dev/zero"), libc::O_RDONLY, FD_ZERO);
    open_at(Path::new("/dev/urandom"), libc::O_RDONLY, FD_URANDOM);

    let (r, w) = pipe_pair(0);
    move_fd(r, FD_PIPE_R, false);
    move_fd(w, FD_PIPE_W, false);
    write_all(FD_PIPE_W, &s.small);

    let (r, w) = pipe_pair(libc::O_CLOEXEC);
    move_fd(r, FD_BIGPIPE_R, true);
    move_fd(w, FD_BIGPIPE_W, true);
    // SAFETY: plain fcntl.
    unsafe {
        check_ret(
            libc::fcntl(FD_BIGPIPE_W, libc::F_SETPIPE_SZ, BIG_PIPE_CAP) as _,
            "F_SETPIPE_SZ",
        );
        check_ret(
            libc::fcntl(FD_BIGPIPE_R, libc::F_SETFL, libc::O_NONBLOCK) as _,
            "F_SETFL",
        );
    }
    write_all(FD_BIGPIPE_W, &s.big);

    let fifo = dir.join("fifo");
    open_at(&fifo, libc::O_RDONLY | libc::O_NONBLOCK, FD_FIFO_R);
    open_at(&fifo, libc::O_WRONLY, FD_FIFO_W);
    // SAFETY: plain fcntl.
    check_ret(
        unsafe { libc::fcntl(FD_FIFO_W, libc::F_SETPIPE_SZ, FIFO_CAP) } as _,
        "F_SETPIPE_SZ fifo",
    );
    write_all(FD_FIFO_W, &s.fifo);

    open_at(&dir.join("sub"), libc::O_RDONLY | libc::O_DIRECTORY, FD_DIR);
    open_at(&data, libc::O_PATH, FD_OPATH);

    let (r, w) = pipe_pair(libc::O_NONBLOCK);
    move_fd(r, FD_EMPTY_R, false);
    move_fd(w, FD_EMPTY_W, false);

    // SAFETY: umask always succeeds.
    unsafe { libc::umask(UMASK) };
    std::env::set_current_dir(dir.join("sub")).unwrap();
    s
}

/// The extra fd of a failure mode; returns what to check about it.
fn setup_extra(mode: &str) {
    // SAFETY: plain syscalls creating fds we keep.
    unsafe {
        match mode {
            "eventfd" => move_fd(
                check_ret(libc::eventfd(5, 0) as _, "eventfd") as i32,
                FD_EXTRA,
                false,
            ),
            "socket" => {
                let mut sv = [0; 2];
                check_ret(
                    libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) as _,
                    "socketpair",
                );
                move_fd(sv[0], FD_EXTRA, false);
                move_fd(sv[1], FD_EXTRA2, false);
                write_all(FD_EXTRA2, b"abc");
            }
            "tty" => {
                let m = check_ret(
                    libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) as _,
                    "posix_openpt",
                ) as i32;
                check_ret(libc::grantpt(m) as _, "grantpt");
                check_ret(libc::unlockpt(m) as _, "unlockpt");
                let name = std::ffi::CStr::from_ptr(libc::ptsname(m)).to_owned();
                let s = check_ret(
                    libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) as _,
                    "open the pty slave",
                ) as i32;
                move_fd(m, FD_EXTRA, false);
                move_fd(s, FD_EXTRA2, false);
            }
            "nofollow" => {
                // Restorable; the test swaps the file for a symlink so that restore fails late.
                let dir = std::env::current_dir().unwrap();
                let nf = dir.parent().unwrap().join("nofollow.txt");
                std::fs::write(&nf, b"no symlinks\n").unwrap();
                open_at(&nf, libc::O_RDONLY | libc::O_NOFOLLOW, FD_EXTRA);
            }
            "io_uring" => {
                let mut params = [0u8; 120];
                let fd = libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr());
                move_fd(check_ret(fd, "io_uring_setup") as i32, FD_EXTRA, false);
            }
            "userfaultfd" => {
                let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC);
                move_fd(check_ret(fd, "userfaultfd") as i32, FD_EXTRA, false);
            }
            "perf" => {
                // A software clock counting this task's CPU time: no PMU needed.
                let mut attr = [0u8; 128];
                attr[0..4].copy_from_slice(&1u32.to_ne_bytes()); // PERF_TYPE_SOFTWARE
                attr[4..8].copy_from_slice(&128u32.to_ne_bytes()); // size
                attr[8..16].copy_from_slice(&1u64.to_ne_bytes()); // PERF_COUNT_SW_TASK_CLOCK
                let fd = libc::syscall(
                    libc::SYS_perf_event_open,
                    attr.as_ptr(),
                    0,
                    -1,
                    -1,
                    8, // PERF_FLAG_FD_CLOEXEC
                );
                move_fd(check_ret(fd, "perf_event_open") as i32, FD_EXTRA, false);
            }
            "bpf" => {
                // BPF_MAP_CREATE of a one-entry array (type 2).
                let mut attr = [0u32; 30];
                attr[..4].copy_from_slice(&[2, 4, 8, 1]);
                let fd = libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), 120);
                move_fd(check_ret(fd, "bpf(BPF_MAP_CREATE)") as i32, FD_EXTRA, false);
            }
            "all" => {}
            m => panic!("unknown mode {m}"),
        }
    }
}

fn check_extra(c: &mut Checker, mode: &str) {
    match mode {
        "eventfd" => c.eq(
            read(FD_EXTRA, 8).map(|b| b.try_into().map(u64::from_ne_bytes).unwrap_or(0)),
            Ok(5),
            "eventfd counter",
        ),
        "socket" => c.eq(read(FD_EXTRA, 16), Ok(b"abc".to_vec()), "socket data"),
        "io_uring" | "userfaultfd" | "perf" | "bpf" => {
            // SAFETY: F_GETFD on our fd.
            let r = unsafe { libc::fcntl(FD_EXTRA, libc::F_GETFD) };
            c.check(r >= 0, format!("fd {FD_EXTRA} ({mode}) is gone"));
        }
        "nofollow" => c.eq(
            read(FD_EXTRA, 100),
            Ok(b"no symlinks\n".to_vec()),
            "nofollow.txt",
        ),
        "tty" => {
            write_all(FD_EXTRA, b"x\n");
            c.eq(
                read(FD_EXTRA2, 16),
                Ok(b"x\n".to_vec()),
                "line through the pty",
            );
        }
        _ => {}
    }
}

/// Writes `data` (a few bytes) into `w` and expects exactly them back from `r`, without
/// blocking: the pipe or FIFO still joins its two ends, and held nothing more.
fn check_round_trip(c: &mut Checker, w: i32, r: i32, data: &[u8], what: &str) {
    c.eq(try_write_all(w, data), Ok(()), &format!("{what}: write"));
    c.eq(
        read(r, 100),
        Ok(data.to_vec()),
        &format!("{what}: read back"),
    );
}

fn check(s: &Setup, mode: &str, before: &BTreeMap<i32, (String, String, String)>) -> Checker {
    let mut c = Checker::new();
    let after = fd_table(&[]);
    for (fd, b) in before {
        match after.get(fd) {
            None => c.check(false, format!("fd {fd} ({}) is gone", b.0)),
            Some(a) => c.eq(a, b, &format!("fd {fd} (target, pos, flags)")),
        }
    }
    for fd in after.keys().filter(|fd| !before.contains_key(fd)) {
        c.check(false, format!("unexpected fd {fd} ({})", after[fd].0));
    }
    check_extra(&mut c, mode);
    // From here on no read or write may block: a pipe restored empty or too small must give a
    // FAIL, not a hang.
    // (Their O_NONBLOCK flags were compared above.)
    for fd in [
        FD_PIPE_R,
        FD_PIPE_W,
        FD_BIGPIPE_R,
        FD_BIGPIPE_W,
        FD_FIFO_R,
        FD_FIFO_W,
        FD_EMPTY_R,
        FD_EMPTY_W,
    ] {
        // SAFETY: plain fcntl.
        unsafe { libc::fcntl(fd, libc::F_SETFL, getfl(fd) | libc::O_NONBLOCK) };
    }

    // Regular files: access modes, flags, shared offsets, positions.
    c.eq(access_mode(FD_RD), libc::O_RDONLY, "fd 10 access mode");
    c.eq(pos(FD_RD), 1000, "fd 10 position");
    c.eq(
        read(FD_RD, 100),
        Ok(s.data[1000..1100].to_vec()),
        "fd 10 data at 1000",
    );
    c.eq(
        pos(FD_RD_DUP),
        1100,
        "fd 11 (dup of 10) position after reading fd 10",
    );
    c.eq(
        read(FD_RD_DUP, 10),
        Ok(s.data[1100..1110].to_vec()),
        "fd 11 data",
    );
    c.eq(pos(FD_RD), 1110, "fd 10 position after reading fd 11");
    c.eq(getfd(FD_RD), 0, "fd 10 close-on-exec");

    c.eq(access_mode(FD_WR), libc::O_WRONLY, "fd 12 access mode");
    c.eq(pos(FD_WR), 2000, "fd 12 position");
    c.eq(
        read(FD_WR, 1),
        Err(libc::EBADF),
        "read from the O_WRONLY fd 12",
    );
    // Writes the bytes that are already there: the file is unchanged, the write must work.
    c.eq(
        try_write_all(FD_WR, &s.data[2000..2100]),
        Ok(()),
        "write to fd FD_WR",
    );
    c.eq(pos(FD_WR), 2100, "fd 12 position after a write");

    c.check(
        getfl(FD_APPEND) & libc::O_APPEND != 0,
        "fd 13 lost O_APPEND",
    );
    c.eq(access_mode(FD_APPEND), libc::O_RDWR, "fd 13 access mode");
    c.eq(pos(FD_APPEND), 3, "fd 13 position");
    c.eq(
        read(FD_APPEND, 100),
        Ok(b"lo\n".to_vec()),
        "fd 13 data at 3",
    );
    c.eq(
        try_write_all(FD_APPEND, b"more\n"),
        Ok(()),
        "write to fd FD_APPEND",
    );
    c.eq(
        pread(FD_APPEND, 100, 0),
        b"hello\nmore\n".to_vec(),
        "log.txt after an O_APPEND write",
    );

    c.check(
        getfl(FD_NONBLOCK) & libc::O_NONBLOCK != 0,
        "fd 14 lost O_NONBLOCK",
    );
    c.eq(pos(FD_NONBLOCK), 5, "fd 14 position");
    c.check(
        getfl(FD_RD) & libc::O_NONBLOCK == 0,
        "fd 10 gained O_NONBLOCK",
    );

    c.eq(getfd(FD_HIGH), libc::FD_CLOEXEC, "fd 900 close-on-exec");
    c.eq(pos(FD_HIGH), 7, "fd 900 position");
    c.eq(read(FD_HIGH, 3), Ok(s.data[7..10].to_vec()), "fd 900 data");

    c.eq(pos(FD_BIG), BIG_POS as i64, "fd 15 position past 4 GiB");
    c.eq(
        read(FD_BIG, MARK.len()),
        Ok(MARK.to_vec()),
        "fd 15 data past 4 GiB",
    );
    c.eq(fstat(FD_BIG).st_size as u64, SPARSE_LEN, "sparse.bin size");

    // The unlinked file: content, mode, one inode for both descriptions, writes work.
    let g = fstat(FD_GONE);
    c.eq(g.st_nlink, 0, "gone.txt link count");
    c.eq(g.st_mode & 0o7777, GONE_MODE, "gone.txt mode");
    c.eq(g.st_size, GONE_LEN as i64, "gone.txt size");
    c.eq(
        fstat(FD_GONE2).st_ino,
        g.st_ino,
        "gone.txt: both descriptions on one inode",
    );
    c.eq(
        pread(FD_GONE, GONE_LEN + 10, 0) == s.gone,
        true,
        "gone.txt content",
    );
    c.eq(pos(FD_GONE), 123, "fd 16 position");
    c.eq(pos(FD_GONE2), 50, "fd 17 position");
    c.eq(access_mode(FD_GONE2), libc::O_RDONLY, "fd 17 access mode");
    c.eq(
        try_write_all(FD_GONE, b"written after restore"),
        Ok(()),
        "write to fd FD_GONE",
    );
    c.eq(
        pos(FD_GONE_DUP),
        123 + 21,
        "fd 40 (dup of 16) position after a write on 16",
    );
    c.eq(
        pread(FD_GONE2, 21, 123),
        b"written after restore".to_vec(),
        "a write on fd 16 seen through fd 17",
    );
    let link = std::fs::read_link("/proc/self/fd/16")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    c.eq(
        link,
        format!("{} (deleted)", s.dir.join("gone.txt").display()),
        "fd 16 link",
    );
    c.check(
        !s.dir.join("gone.txt").exists(),
        "gone.txt exists on disk again",
    );

    // Devices.
    let dev = |fd: i32| {
        let r = fstat(fd).st_rdev;
        (libc::major(r), libc::minor(r))
    };
    c.eq(dev(FD_NULL), (1, 3), "/dev/null device");
    c.eq(dev(FD_ZERO), (1, 5), "/dev/zero device");
    c.eq(dev(FD_URANDOM), (1, 9), "/dev/urandom device");
    // SAFETY: valid buffer.
    c.eq(
        unsafe { libc::write(FD_NULL, b"0123456789".as_ptr().cast(), 10) },
        10,
        "write to /dev/null",
    );
    c.eq(
        access_mode(FD_NULL),
        libc::O_WRONLY,
        "/dev/null access mode",
    );
    c.eq(read(FD_ZERO, 64), Ok(vec![0u8; 64]), "/dev/zero");
    let rnd = read(FD_URANDOM, 32).unwrap_or_default();
    c.check(
        rnd.len() == 32 && rnd.iter().any(|&b| b != 0),
        "/dev/urandom gave no random bytes",
    );

    // Pipes: unread data in order, capacity, flags, and they still work.
    c.eq(
        fionread(FD_PIPE_R),
        SMALL_PIPE_LEN as i32,
        "small pipe: bytes queued",
    );
    c.eq(
        read_exact(FD_PIPE_R, SMALL_PIPE_LEN).map(|d| d == s.small),
        Ok(true),
        "small pipe data",
    );
    check_round_trip(
        &mut c,
        FD_PIPE_W,
        FD_PIPE_R,
        b"again",
        "small pipe after restore",
    );
    c.eq(access_mode(FD_PIPE_R), libc::O_RDONLY, "pipe read end mode");
    c.eq(
        access_mode(FD_PIPE_W),
        libc::O_WRONLY,
        "pipe write end mode",
    );

    // SAFETY: plain fcntl.
    c.eq(
        unsafe { libc::fcntl(FD_BIGPIPE_R, libc::F_GETPIPE_SZ) },
        BIG_PIPE_CAP,
        "big pipe capacity",
    );
    c.eq(
        fionread(FD_BIGPIPE_R),
        BIG_PIPE_LEN as i32,
        "big pipe: bytes queued",
    );
    c.eq(
        read_exact(FD_BIGPIPE_R, BIG_PIPE_LEN).map(|d| d == s.big),
        Ok(true),
        "big pipe data",
    );
    c.eq(
        read(FD_BIGPIPE_R, 1),
        Err(libc::EAGAIN),
        "big pipe drained (non-blocking read end)",
    );
    c.eq(
        getfd(FD_BIGPIPE_R),
        libc::FD_CLOEXEC,
        "big pipe read end close-on-exec",
    );
    let more = pattern(9, 200 * 1024);
    c.eq(
        try_write_all(FD_BIGPIPE_W, &more),
        Ok(()),
        "write to fd FD_BIGPIPE_W",
    );
    c.eq(
        read_exact(FD_BIGPIPE_R, more.len()).map(|d| d == more),
        Ok(true),
        "big pipe after restore",
    );

    // SAFETY: plain fcntl.
    c.eq(
        unsafe { libc::fcntl(FD_FIFO_R, libc::F_GETPIPE_SZ) },
        FIFO_CAP,
        "FIFO capacity",
    );
    c.eq(fionread(FD_FIFO_R), FIFO_LEN as i32, "FIFO: bytes queued");
    c.eq(
        read_exact(FD_FIFO_R, FIFO_LEN).map(|d| d == s.fifo),
        Ok(true),
        "FIFO data",
    );
    c.eq(read(FD_FIFO_R, 1), Err(libc::EAGAIN), "FIFO drained");
    check_round_trip(
        &mut c,
        FD_FIFO_W,
        FD_FIFO_R,
        b"fifo again",
        "FIFO after restore",
    );
    let on_disk = std::fs::metadata(s.dir.join("fifo"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    c.eq(
        fstat(FD_FIFO_R).st_ino,
        on_disk,
        "FIFO fd is the FIFO on disk",
    );

    c.eq(fionread(FD_EMPTY_R), 0, "empty pipe: bytes queued");
    c.eq(read(FD_EMPTY_R, 1), Err(libc::EAGAIN), "empty pipe read");
    check_round_trip(
        &mut c,
        FD_EMPTY_W,
        FD_EMPTY_R,
        b"x",
        "empty pipe after restore",
    );

    // Directory fd and O_PATH fd.
    c.check(
        getfl(FD_DIR) & libc::O_DIRECTORY != 0,
        "fd 27 lost O_DIRECTORY",
    );
    let inner = CString::new("inner.txt").unwrap();
    // SAFETY: valid C string.
    let ifd = unsafe { libc::openat(FD_DIR, inner.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    c.check(
        ifd >= 0,
        format!("openat(fd 27, inner.txt): errno {}", errno()),
    );
    if ifd >= 0 {
        c.eq(
            read(ifd, 100),
            Ok(b"inner\n".to_vec()),
            "inner.txt through the directory fd",
        );
        // SAFETY: our own fd.
        unsafe { libc::close(ifd) };
    }
    c.check(getfl(FD_OPATH) & libc::O_PATH != 0, "fd 28 lost O_PATH");
    let data_ino = std::fs::metadata(s.dir.join("data.bin"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    c.eq(fstat(FD_OPATH).st_ino, data_ino, "fd 28 is data.bin");

    // cwd, umask, the file contents on disk.
    c.eq(std::env::current_dir().ok(), Some(s.dir.join("sub")), "cwd");
    // SAFETY: umask always succeeds.
    let m = unsafe { libc::umask(0o022) };
    c.eq(m, UMASK, "umask");
    c.eq(
        std::fs::read(s.dir.join("data.bin"))
            .map(|d| d == s.data)
            .unwrap_or(false),
        true,
        "data.bin content unchanged",
    );
    c
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).expect("usage: wl_files DIR MODE"));
    let mode = args.get(2).map(String::as_str).unwrap_or("all");
    // stderr into a file of our own: a pipe or file shared with the test runner would be
    // restored as a dead pipe or fail the size check.
    let err = dir.with_extension("stderr");
    open_at(&err, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, 2);
    let s = setup(&dir);
    setup_extra(mode);
    let before = fd_table(&[3]);
    // Block SIGUSR1 before saying ready: the harness may send it at once, before
    // wait_for_check() blocks it (default action: die without a verdict).
    block_check_signal();
    ready(if mode == "all" { "" } else { "fd=50" });
    wait_for_check();
    check(&s, mode, &before).report();
}
