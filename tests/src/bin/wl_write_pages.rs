//! Workload for tests/tests/track_faults.rs: touches pages of a fresh anonymous region in
//! exactly the ways it is told, so the test knows which pages were written, read, or written
//! by the kernel on its behalf.
//!
//! Usage: `wl_write_pages [NPAGES]` (default 64). On start it maps NPAGES fresh pages (THP
//! off, so each page faults on its own) and prints `ready ADDR_HEX NPAGES`. Then it reads
//! commands on stdin, one per line, and answers `ok` (or `err WHY`) on stdout after each:
//! - `w FIRST COUNT STEP`: write one byte to pages FIRST, FIRST+STEP, … (COUNT pages)
//! - `r FIRST COUNT STEP`: read one byte from each of those pages (never written)
//! - `k FIRST COUNT STEP`: read() one byte from a pipe into each page: the kernel writes it
//!   (a kernel-mode write fault, copy_to_user), the workload itself never touches the page
//! - `q`: exit
//!
//! No sleeps: the test drives every step and waits for each `ok`.

use std::io::{BufRead, Write};

use cr_tests::sys::mmap_anon;

const PAGE: usize = 4096;

fn main() {
    if let Err(e) = run() {
        eprintln!("wl_write_pages: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let npages: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("bad NPAGES {a:?}: {e}"))?,
        None => 64,
    };
    if npages == 0 {
        return Err("NPAGES must be > 0".into());
    }
    let len = npages * PAGE;
    let base = mmap_anon(len).map_err(|e| format!("mmap {len} bytes: {e}"))? as *mut libc::c_void;
    // SAFETY: advice on our own mapping. Without it a (multi-size) THP could map several pages
    // on one fault and the test's expectations of one fault per page would not hold.
    if unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) } != 0 {
        return Err(format!(
            "madvise(MADV_NOHUGEPAGE): {}",
            std::io::Error::last_os_error()
        ));
    }
    let base = base as *mut u8;
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let (pr, pw) = (fds[0], fds[1]);

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready {:#x} {npages}", base as usize).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;

    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| format!("read a command: {e}"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let answer = match f.as_slice() {
            ["q"] => return Ok(()),
            [op, a, b, c] => match (a.parse::<usize>(), b.parse::<usize>(), c.parse::<usize>()) {
                (Ok(first), Ok(count), Ok(step))
                    if first + count.saturating_sub(1) * step < npages =>
                {
                    let mut sum = 0u64;
                    let mut err = None;
                    for i in (0..count).map(|k| first + k * step) {
                        // SAFETY: page i lies inside the mapping (checked in the match guard).
                        let p = unsafe { base.add(i * PAGE) };
                        match *op {
                            // SAFETY: p is inside our RW mapping.
                            "w" => unsafe { std::ptr::write_volatile(p, 0x77) },
                            // SAFETY: p is inside our RW mapping.
                            "r" => sum += unsafe { std::ptr::read_volatile(p) } as u64,
                            "k" => {
                                // SAFETY: one byte through our own pipe, read into page i.
                                let ok = unsafe {
                                    libc::write(pw, b"k".as_ptr() as *const libc::c_void, 1) == 1
                                        && libc::read(pr, p as *mut libc::c_void, 1) == 1
                                };
                                if !ok {
                                    err = Some(format!(
                                        "pipe into page {i}: {}",
                                        std::io::Error::last_os_error()
                                    ));
                                    break;
                                }
                            }
                            other => {
                                err = Some(format!("unknown op {other:?}"));
                                break;
                            }
                        }
                    }
                    std::hint::black_box(sum);
                    match err {
                        Some(e) => format!("err {e}"),
                        None => "ok".to_string(),
                    }
                }
                _ => format!("err bad or out-of-range arguments in {line:?}"),
            },
            _ => format!("err cannot parse {line:?}"),
        };
        writeln!(out, "{answer}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}
