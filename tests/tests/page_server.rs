//! `cr page-server` with `cr dump|pre-dump --page-server` (issue 14): pages sent over TCP on
//! loopback, the rest of the image written locally (CRIU's way) or the whole image sent
//! (`--whole-image`); a chain built across it restores with every page right; a connection cut
//! mid-transfer fails the dump and leaves the target running as before.
//!
//! Must run as root (ptrace, eBPF): `cargo xtask test` does.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use cr::image::wire::{read_frame, write_frame, Type};
use cr::image::ImageDir;
use cr_tests::cr_cmd::CrCmd;
use cr_tests::{become_subreaper, require_root, sys, TempDir, Workload};

/// A `cr page-server` receiving into `dir`, listening on a free loopback port.
struct PageServer {
    child: Child,
    port: u16,
}

impl PageServer {
    fn start(dir: &Path, extra: &[&str]) -> PageServer {
        let (r, w) = sys::pipe_cloexec();
        let wfd = w.as_raw_fd();
        let mut cmd = CrCmd::new(&["page-server", "-D"])
            .arg(dir)
            .args(&["--address", "127.0.0.1", "--port", "0", "--status-fd", "3"])
            .args(&["-o", "page-server.log", "-v4"])
            .args(extra)
            .command();
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if wfd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(wfd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start cr page-server");
        drop(w);
        let mut line = String::new();
        BufReader::new(std::fs::File::from(r))
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("page server status {line:?}"));
        eprintln!("$ cr page-server -D {} (port {port})", dir.display());
        PageServer { child, port }
    }

    fn port(&self) -> String {
        self.port.to_string()
    }

    /// Waits for it; returns whether it exited 0, and its stderr.
    fn finish(mut self, dir: &Path) -> (bool, String) {
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = self.child.wait().unwrap();
        let log = std::fs::read_to_string(dir.join("page-server.log")).unwrap_or_default();
        eprintln!("page server: {st}\n{err}--- its log ---\n{log}");
        (st.success(), err)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".img"))
        .collect();
    v.sort();
    v
}

/// Copies the local part of an image (every `*.img` the destination lacks) next to the pages.
fn copy_local_part(from: &Path, to: &Path) {
    for n in names(from) {
        if !to.join(&n).exists() {
            std::fs::copy(from.join(&n), to.join(&n)).unwrap();
        }
    }
}

fn start_chainer(d: &TempDir, mib: u64) -> Workload {
    become_subreaper();
    Workload::start("wl_dirty_chain", &[&mib.to_string()], d)
}

fn dump_to(server: &PageServer, sub: &str, pid: i32, img: &Path, extra: &[&str]) {
    CrCmd::checkpoint(sub, pid, img)
        .args(&["--page-server", "--address", "127.0.0.1", "--port"])
        .arg(server.port())
        .args(extra)
        .ok();
}

/// CRIU's way: a pre-dump and a dump on top of it send their pages to page servers, the rest
/// stays local; the local parts copied beside the pages, the chain restores and every page of
/// the continuously dirtied workload is right.
#[test]
fn chain_through_page_server_restores_every_page() {
    require_root();
    let d = TempDir::new("ps-chain");
    let (src, dst) = (d.join("src"), d.join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let mut c = start_chainer(&d, 64);
    let pid = c.pid;

    let s1 = PageServer::start(&dst.join("p1"), &[]);
    dump_to(&s1, "pre-dump", pid, &src.join("p1"), &[]);
    assert!(s1.finish(&dst.join("p1")).0, "page server 1 failed");
    let pages = format!("pages-{pid}.img");
    let pagemap = format!("pagemap-{pid}.img");
    assert_eq!(names(&dst.join("p1")), [pagemap.clone(), pages.clone()]);
    assert!(
        !src.join("p1").join(&pages).exists(),
        "pages written locally too"
    );
    assert!(src.join("p1").join(&pagemap).exists());
    std::thread::sleep(Duration::from_millis(300));

    let s2 = PageServer::start(&dst.join("final"), &["--prev-images-dir", "../p1"]);
    dump_to(
        &s2,
        "dump",
        pid,
        &src.join("final"),
        &["--track-mem", "--prev-images-dir", "../p1"],
    );
    assert!(s2.finish(&dst.join("final")).0, "page server 2 failed");
    c.reap_killed();
    let stats = ImageDir::open(&src.join("final"))
        .unwrap()
        .inventory()
        .stats
        .clone()
        .unwrap();
    assert!(stats.pages_in_parent > 0, "nothing taken from the parent");
    // The local part alone is not restorable: the pages are elsewhere.
    let e = CrCmd::restore(src.join("final")).fails("its pages are on the page server");
    assert!(e.contains(&pages), "{e}");
    copy_local_part(&src.join("p1"), &dst.join("p1"));
    copy_local_part(&src.join("final"), &dst.join("final"));
    CrCmd::restore(dst.join("final"))
        .pidfile(d.join("final.pid"))
        .ok();
    let _ = std::fs::remove_file(&c.result);
    c.assert_pass();
}

/// `--whole-image`: the page server's directory is a complete image, restorable as it is.
#[test]
fn whole_image_through_page_server_restores() {
    require_root();
    let d = TempDir::new("ps-whole");
    let dst = d.join("dst");
    let mut c = start_chainer(&d, 16);
    let s = PageServer::start(&dst, &[]);
    dump_to(&s, "dump", c.pid, &d.join("src"), &["--whole-image"]);
    assert!(s.finish(&dst).0, "page server failed");
    c.reap_killed();
    let img = ImageDir::open(&dst).expect("a complete image on the page server");
    assert_eq!(img.inventory().root_pid, c.pid);
    CrCmd::restore(&dst).pidfile(d.join("r.pid")).ok();
    let _ = std::fs::remove_file(&c.result);
    c.assert_pass();
}

/// A peer that speaks the protocol, then cuts the connection after `cut_after` bytes of
/// pages: the dump fails saying so, the target runs on and passes its own check, the local
/// directory holds no inventory.
#[test]
fn connection_cut_mid_transfer_fails_the_dump_and_the_target_runs_on() {
    require_root();
    let d = TempDir::new("ps-cut");
    let mut c = start_chainer(&d, 64);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let peer = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let (mut r, mut w) = (&s, &s);
        let mut buf = Vec::new();
        let hello = read_frame(&mut r, &mut buf).unwrap().unwrap();
        assert_eq!(hello.ty, Type::Hello);
        write_frame(&mut w, Type::Hello, 1, 0, &[]).unwrap();
        let mut pages = 0u64;
        while pages < 1 << 20 {
            let f = read_frame(&mut r, &mut buf).unwrap().unwrap();
            match f.ty {
                Type::Write => pages += u64::from(f.len),
                Type::Sync => break,
                _ => {}
            }
        }
        // Gone, as a destination that dies would be.
        drop(s);
        pages
    });
    let img = d.join("src");
    let e = CrCmd::dump(c.pid, &img)
        .args(&["--page-server", "--address", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .fails("the page server went away mid-transfer");
    assert!(peer.join().unwrap() > 0, "no pages came before the cut");
    assert!(e.contains("page server"), "{e}");
    assert!(
        !img.join("inventory.img").exists(),
        "a failed dump left an inventory"
    );
    // Running as before: it passes its own check (every page as it wrote it).
    assert!(cr_tests::pid_exists(c.pid));
    c.assert_pass();
}

/// No page server: the dump refuses before touching the target (exit 2, naming the address).
#[test]
fn no_page_server_is_bad_input_and_the_target_is_untouched() {
    require_root();
    let d = TempDir::new("ps-none");
    let mut c = start_chainer(&d, 16);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    drop(l);
    let out = CrCmd::dump(c.pid, d.join("src"))
        .args(&["--page-server", "--address", "127.0.0.1", "--port", &port])
        .run();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let e = cr_tests::cr_cmd::stderr_of(&out);
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    c.assert_pass();
}
