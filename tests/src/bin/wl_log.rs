//! A service writing its log: appends `N` lines (its own counter) to LOGFILE through an
//! O_WRONLY|O_APPEND fd every 10 ms. Restored from an older checkpoint, it finds the log longer
//! than it was then (lines it wrote after that checkpoint): its next line must go to the end,
//! through the same append-only description.
//!
//! Usage: wl_log LOGFILE. Harness protocol: READY on fd 3 (after the first line), SIGUSR1 →
//! write one more line, then check that it is the file's last line, that the fd is still
//! write-only and appending, and that its offset is the file's end; report PASS/FAIL.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use cr_tests::workload::{check_requested, install_check_flag, ready, Checker};

fn main() {
    let path = std::env::args().nth(1).expect("usage: wl_log LOGFILE");
    install_check_flag();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .expect("open the log");
    let mut n: u64 = 0;
    let line = |log: &mut std::fs::File, n: &mut u64| {
        *n += 1;
        log.write_all(format!("{n}\n").as_bytes())
            .expect("write the log");
    };
    line(&mut log, &mut n);
    ready(&format!("log={path}"));
    while !check_requested() {
        line(&mut log, &mut n);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    line(&mut log, &mut n);
    let mut c = Checker::new();
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let last = text.lines().last().unwrap_or("");
    c.eq(
        last,
        n.to_string().as_str(),
        "the log's last line is the one just written",
    );
    let fd = log.as_raw_fd();
    // SAFETY: fcntl/lseek on our own fd.
    let (flags, pos) = unsafe {
        (
            libc::fcntl(fd, libc::F_GETFL),
            libc::lseek(fd, 0, libc::SEEK_CUR),
        )
    };
    c.eq(
        flags & libc::O_ACCMODE,
        libc::O_WRONLY,
        "the fd is write-only",
    );
    c.check(flags & libc::O_APPEND != 0, "the fd appends");
    c.eq(
        pos as usize,
        text.len(),
        "the fd's offset is the end of the log",
    );
    c.report();
}
