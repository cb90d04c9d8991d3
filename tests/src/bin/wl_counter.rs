//! Workload for the demo: a tiny "service" that appends `count N` to a log file every 200 ms.
//! Usage: wl_counter LOGFILE

use std::io::Write;

fn main() {
    let path = std::env::args().nth(1).expect("usage: wl_counter LOGFILE");
    // SAFETY: setsid has no preconditions; detaches from the caller's terminal and session.
    unsafe { libc::setsid() };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open log");
    let mut n: u64 = 0;
    loop {
        n += 1;
        writeln!(log, "count {n}").expect("write log");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
