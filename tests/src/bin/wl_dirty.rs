//! Workload of the harvest agreement tests (tests/tests/incremental.rs): writes its memory in
//! every way the tracker must notice, one command at a time, and keeps a table of what each
//! page holds so that it can verify itself after a restore.
//!
//! Protocol: fd 3 gets `READY` (the usual harness protocol), then commands arrive on stdin, one
//! per line, each answered on stdout with `ok [value]` or `err why`. When stdin ends (after a
//! restore its writer is gone) the workload waits for SIGUSR1, verifies every page and reports
//! PASS/FAIL to $CR_RESULT.
//!
//! Regions have small numeric ids; a page's content is a pure function of (region id, page
//! index, generation) (see [`word`]), so content that moves with mremap stays checkable, and
//! the harness can write a page from outside (process_vm_writev, /proc/PID/mem) and `note` it.
//! Generation 0 is a page of zeros (never written, or dropped with MADV_DONTNEED).
//!
//! Commands (`I` a region id, `P` a comma-separated list of page indices):
//! - `region I N [thp]`: map N fresh pages (2 MiB aligned with MADV_HUGEPAGE for `thp`,
//!   MADV_NOHUGEPAGE otherwise) and write them all; answers the address (hex).
//! - `write I P`, `read I P`: user-mode writes / reads.
//! - `pipe I P`: the kernel writes: read() from a pipe into each page.
//! - `file I P`: the kernel writes: pread() from a file into each page.
//! - `selfvm I P`: process_vm_writev to itself. `selfmem I P`: pwrite to /proc/self/mem.
//! - `gen I p`: answers the generation of one page; `note I p G`: someone else wrote it.
//! - `dontneed I P`: MADV_DONTNEED each page (it becomes zeros). `populate I P`:
//!   MADV_POPULATE_WRITE each page (still zeros, now present).
//! - `munmap I first n`: unmaps n pages. `mremap I`: moves the region elsewhere; answers the
//!   new address.
//! - `fork I P`: a child writes the pages of its copy and exits. `cow I P`: the workload
//!   writes the pages while a forked child still shares them, then lets the child exit.
//! - `thread`: starts a second thread (once); answers its TID. `twrite I P`: that thread
//!   writes the pages (user-mode writes by another thread of the process).
//! - `check`: verifies now; answers ok or err.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};

// The page contents: the harness computes the same (tests/tests/incremental.rs).
use cr_tests::page_pattern::{content, word, PAGE, WORDS};
use cr_tests::sys::{mmap_anon, pipe_cloexec};
use cr_tests::workload::{block_check_signal, ready, Checker};

/// `gen` of an unmapped page.
const UNMAPPED: u64 = u64::MAX;

struct Region {
    id: u64,
    addr: usize,
    gen: Vec<u64>,
}

impl Region {
    fn page(&self, p: usize) -> *mut u8 {
        (self.addr + p * PAGE) as *mut u8
    }
    fn len(&self) -> usize {
        self.gen.len() * PAGE
    }
}

struct State {
    regions: Vec<Region>,
    pipe: (OwnedFd, OwnedFd),
    file: std::fs::File,
    /// The second thread: pages to write (address, id, index, generation) in, acks out.
    worker: Option<Worker>,
}

struct Worker {
    tid: i32,
    jobs: std::sync::mpsc::Sender<Vec<(usize, u64, u64, u64)>>,
    done: std::sync::mpsc::Receiver<()>,
}

fn start_worker() -> Worker {
    let (jobs, rx) = std::sync::mpsc::channel::<Vec<(usize, u64, u64, u64)>>();
    let (done_tx, done) = std::sync::mpsc::channel();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tid_tx.send(unsafe { libc::gettid() });
        for job in rx {
            for (addr, id, p, gen) in job {
                let dst = addr as *mut u64;
                for k in 0..WORDS {
                    // SAFETY: the main thread sent the address of a page of its own mapping
                    // and waits for our ack before touching it again.
                    unsafe { std::ptr::write_volatile(dst.add(k), word(id, p, gen, k as u64)) };
                }
            }
            if done_tx.send(()).is_err() {
                return;
            }
        }
    });
    let tid = tid_rx.recv().expect("the worker thread's TID");
    Worker { tid, jobs, done }
}

/// A fresh anonymous mapping of `len` bytes, or why not (the command's error answer).
fn map(len: usize) -> Result<usize, String> {
    mmap_anon(len).map_err(|e| format!("mmap: {e}"))
}

impl State {
    fn region(&mut self, id: u64) -> Result<&mut Region, String> {
        self.regions
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| format!("no region {id}"))
    }

    fn new_region(&mut self, id: u64, n: usize, thp: bool) -> Result<usize, String> {
        let len = n * PAGE;
        let addr = if thp {
            const HUGE: usize = 2 << 20;
            let raw = map(len + HUGE)?;
            let a = (raw + HUGE - 1) & !(HUGE - 1);
            // SAFETY: trimming our own fresh mapping to the aligned part.
            unsafe {
                if a > raw {
                    libc::munmap(raw as *mut libc::c_void, a - raw);
                }
                libc::munmap((a + len) as *mut libc::c_void, raw + HUGE - a);
                libc::madvise(a as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
            a
        } else {
            let a = map(len)?;
            // SAFETY: advice on our own mapping.
            unsafe { libc::madvise(a as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) };
            a
        };
        let mut r = Region {
            id,
            addr,
            gen: vec![0; n],
        };
        for p in 0..n {
            write_page(&mut r, p);
        }
        self.regions.push(r);
        Ok(addr)
    }
}

/// A user-mode write of page p's next generation.
fn write_page(r: &mut Region, p: usize) {
    let gen = r.gen[p] + 1;
    let dst = r.page(p) as *mut u64;
    for k in 0..WORDS {
        // SAFETY: the page lies inside the region's read/write mapping.
        unsafe { std::ptr::write_volatile(dst.add(k), word(r.id, p as u64, gen, k as u64)) };
    }
    r.gen[p] = gen;
}

fn pages(list: &str, r: &Region) -> Result<Vec<usize>, String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let p: usize = s.parse().map_err(|_| format!("bad page {s:?}"))?;
            if p >= r.gen.len() || r.gen[p] == UNMAPPED {
                return Err(format!("page {p} is not mapped"));
            }
            Ok(p)
        })
        .collect()
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn run(st: &mut State, line: &str) -> Result<String, String> {
    let a: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<u64, String> {
        a.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("argument {i} missing or bad"))
    };
    let list = |i: usize| a.get(i).copied().unwrap_or("");
    match a.first().copied() {
        Some("region") => {
            let addr = st.new_region(num(1)?, num(2)? as usize, a.get(3) == Some(&"thp"))?;
            Ok(format!("{addr:x}"))
        }
        Some("write") => {
            let r = st.region(num(1)?)?;
            for p in pages(list(2), r)? {
                write_page(r, p);
            }
            Ok(String::new())
        }
        Some("read") => {
            let r = st.region(num(1)?)?;
            let mut sum = 0u64;
            for p in pages(list(2), r)? {
                // SAFETY: inside the mapping.
                sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(r.page(p) as *const u64) });
            }
            Ok(format!("{sum:x}"))
        }
        Some(k @ ("pipe" | "file" | "selfvm" | "selfmem")) => {
            let id = num(1)?;
            let (pw, pr) = (st.pipe.1.as_raw_fd(), st.pipe.0.as_raw_fd());
            let file = st.file.as_raw_fd();
            let r = st.region(id)?;
            for p in pages(list(2), r)? {
                let gen = r.gen[p] + 1;
                let data = content(id, p as u64, gen);
                let dst = r.page(p);
                // SAFETY (all four): `data` is a live 4 KiB buffer and `dst` a page of our own
                // read/write mapping; the calls only copy between them.
                let n = unsafe {
                    match k {
                        "pipe" => {
                            if libc::write(pw, data.as_ptr().cast(), PAGE) != PAGE as isize {
                                return Err(errno("write(pipe)"));
                            }
                            libc::read(pr, dst.cast(), PAGE)
                        }
                        "file" => {
                            if libc::pwrite(file, data.as_ptr().cast(), PAGE, 0) != PAGE as isize {
                                return Err(errno("pwrite(file)"));
                            }
                            libc::pread(file, dst.cast(), PAGE, 0)
                        }
                        "selfvm" => {
                            let l = libc::iovec {
                                iov_base: data.as_ptr() as *mut _,
                                iov_len: PAGE,
                            };
                            let rv = libc::iovec {
                                iov_base: dst.cast(),
                                iov_len: PAGE,
                            };
                            libc::process_vm_writev(libc::getpid(), &l, 1, &rv, 1, 0)
                        }
                        _ => {
                            let f = libc::open(
                                c"/proc/self/mem".as_ptr(),
                                libc::O_RDWR | libc::O_CLOEXEC,
                            );
                            if f < 0 {
                                return Err(errno("open /proc/self/mem"));
                            }
                            let n = libc::pwrite(f, data.as_ptr().cast(), PAGE, dst as i64);
                            libc::close(f);
                            n
                        }
                    }
                };
                if n != PAGE as isize {
                    return Err(errno(k));
                }
                r.gen[p] = gen;
            }
            Ok(String::new())
        }
        Some("gen") => {
            let r = st.region(num(1)?)?;
            let p = num(2)? as usize;
            r.gen
                .get(p)
                .map(|g| g.to_string())
                .ok_or_else(|| "no such page".into())
        }
        Some("note") => {
            let r = st.region(num(1)?)?;
            let (p, g) = (num(2)? as usize, num(3)?);
            *r.gen.get_mut(p).ok_or("no such page")? = g;
            Ok(String::new())
        }
        Some(k @ ("dontneed" | "populate")) => {
            let r = st.region(num(1)?)?;
            let advice = if k == "dontneed" {
                libc::MADV_DONTNEED
            } else {
                libc::MADV_POPULATE_WRITE
            };
            for p in pages(list(2), r)? {
                // SAFETY: advice on one page of our own mapping.
                if unsafe { libc::madvise(r.page(p).cast(), PAGE, advice) } != 0 {
                    return Err(errno("madvise"));
                }
                if k == "dontneed" {
                    r.gen[p] = 0;
                }
            }
            Ok(String::new())
        }
        Some("munmap") => {
            let r = st.region(num(1)?)?;
            let (first, n) = (num(2)? as usize, num(3)? as usize);
            if first + n > r.gen.len() {
                return Err("range outside the region".into());
            }
            // SAFETY: unmapping pages of our own mapping that nothing references.
            if unsafe { libc::munmap(r.page(first).cast(), n * PAGE) } != 0 {
                return Err(errno("munmap"));
            }
            r.gen[first..first + n].fill(UNMAPPED);
            Ok(String::new())
        }
        Some("mremap") => {
            let r = st.region(num(1)?)?;
            let len = r.len();
            // A new place: reserve it, then move the region over the reservation.
            let to = map(len)?;
            // SAFETY: moving our own mapping onto our own reservation.
            let p = unsafe {
                libc::mremap(
                    r.addr as *mut libc::c_void,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    to as *mut libc::c_void,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(errno("mremap"));
            }
            r.addr = p as usize;
            Ok(format!("{:x}", r.addr))
        }
        Some(k @ ("fork" | "cow")) => {
            let id = num(1)?;
            let r = st.region(id)?;
            let list = pages(list(2), r)?;
            let (go_r, go_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
            // SAFETY: the child only writes memory and makes raw syscalls before _exit.
            let child = unsafe { libc::fork() };
            if child < 0 {
                return Err(errno("fork"));
            }
            if child == 0 {
                // SAFETY: child side: raw writes to its copy of the region, then _exit.
                unsafe {
                    if k == "fork" {
                        for &p in &list {
                            let dst = r.page(p) as *mut u64;
                            for w in 0..WORDS {
                                std::ptr::write_volatile(dst.add(w), 0xdead_beef);
                            }
                        }
                    } else {
                        // Our copy of the write end would keep the read below from ever ending.
                        libc::close(go_w.as_raw_fd());
                        let mut b = [0u8; 1];
                        libc::read(go_r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
                    }
                    libc::_exit(0);
                }
            }
            drop(go_r);
            if k == "cow" {
                for p in list {
                    write_page(r, p);
                }
            }
            drop(go_w);
            let mut status = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            Ok(String::new())
        }
        Some("thread") => {
            let w = st.worker.get_or_insert_with(start_worker);
            Ok(w.tid.to_string())
        }
        Some("twrite") => {
            let id = num(1)?;
            if st.worker.is_none() {
                st.worker = Some(start_worker());
            }
            let r = st
                .regions
                .iter_mut()
                .find(|r| r.id == id)
                .ok_or_else(|| format!("no region {id}"))?;
            let list = pages(list(2), r)?;
            let job: Vec<(usize, u64, u64, u64)> = list
                .iter()
                .map(|&p| (r.page(p) as usize, id, p as u64, r.gen[p] + 1))
                .collect();
            let w = st.worker.as_ref().expect("just started");
            w.jobs
                .send(job)
                .map_err(|_| "the worker thread is gone".to_string())?;
            w.done
                .recv()
                .map_err(|_| "the worker thread is gone".to_string())?;
            for p in list {
                r.gen[p] += 1;
            }
            Ok(String::new())
        }
        Some("check") => {
            let c = verify(st);
            if c.is_empty() {
                Ok(String::new())
            } else {
                Err(c.join("; "))
            }
        }
        _ => Err(format!("unknown command {line:?}")),
    }
}

/// Every mapped page against its generation; a list of failures (at most 10).
fn verify(st: &State) -> Vec<String> {
    let mut bad = Vec::new();
    for r in &st.regions {
        for (p, &gen) in r.gen.iter().enumerate() {
            if gen == UNMAPPED {
                continue;
            }
            let src = r.page(p) as *const u64;
            for k in 0..WORDS {
                // SAFETY: a mapped page of the region.
                let got = unsafe { std::ptr::read_volatile(src.add(k)) };
                if got != word(r.id, p as u64, gen, k as u64) {
                    if bad.len() < 10 {
                        bad.push(format!(
                            "region {} page {p} word {k}: {got:#x}, expected generation {gen}",
                            r.id
                        ));
                    }
                    break;
                }
            }
        }
    }
    bad
}

fn main() {
    // SIGUSR1 stays blocked: after a restore it is taken with sigwaitinfo, whenever it comes.
    block_check_signal();
    let pipe = pipe_cloexec();
    let path = std::env::temp_dir().join(format!("wl_dirty-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("scratch file");
    let _ = std::fs::remove_file(&path);
    let mut st = State {
        regions: Vec::new(),
        pipe,
        file,
        worker: None,
    };
    ready(&std::process::id().to_string());
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let reply = match run(&mut st, &line) {
            Ok(v) if v.is_empty() => "ok".to_string(),
            Ok(v) => format!("ok {v}"),
            Err(e) => format!("err {e}"),
        };
        if writeln!(out, "{reply}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    cr_tests::workload::wait_for_check();
    let mut c = Checker::new();
    for f in verify(&st) {
        c.check(false, f);
    }
    c.report();
}
