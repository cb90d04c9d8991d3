//! Workload: credentials across a checkpoint. Started as root, it becomes
//! uid 1000/1001/1002 (real/effective/saved, fsuid 1002), gid 1000/1001/1002 (fsgid 1000),
//! supplementary groups [1000, 2000, 3000], drops CAP_SYS_BOOT and CAP_SYS_MODULE from its
//! bounding set, keeps CAP_NET_BIND_SERVICE (effective, permitted, inheritable, ambient) and
//! CAP_NET_RAW (permitted only), and ends with securebits KEEP_CAPS | NO_CAP_AMBIENT_RAISE.
//!
//! Usage: wl_creds
//!
//! After the check request every id, set and bit must read back the same, and binding a TCP
//! port below 1024 must work (the capability is really effective).

use std::os::unix::fs::PermissionsExt;

use cr_tests::workload::{block_check_signal, ready, wait_for_check, Checker};

const CAP_SETPCAP: u32 = 8;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_BOOT: u32 = 22;
const SECBIT_KEEP_CAPS: u64 = 1 << 4;
const SECBIT_NO_CAP_AMBIENT_RAISE: u64 = 1 << 6;

#[derive(Debug, PartialEq, Eq, Clone)]
struct Creds {
    uid: (u32, u32, u32),
    gid: (u32, u32, u32),
    fsuid: u32,
    fsgid: u32,
    groups: Vec<u32>,
    /// effective, permitted, inheritable
    caps: (u64, u64, u64),
    bounding: u64,
    ambient: u64,
    securebits: i32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> (u64, u64, u64) {
    let mut h = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: capget(v3) with a header and two data structs.
    unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut CapHeader, d.as_mut_ptr()) };
    let w = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
    (
        w(d[0].effective, d[1].effective),
        w(d[0].permitted, d[1].permitted),
        w(d[0].inheritable, d[1].inheritable),
    )
}

fn capset(eff: u64, prm: u64, inh: u64) -> i64 {
    let mut h = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let d = [
        CapData {
            effective: eff as u32,
            permitted: prm as u32,
            inheritable: inh as u32,
        },
        CapData {
            effective: (eff >> 32) as u32,
            permitted: (prm >> 32) as u32,
            inheritable: (inh >> 32) as u32,
        },
    ];
    // SAFETY: capset(v3) with a header and two data structs.
    unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut CapHeader, d.as_ptr()) }
}

fn bit(cap: u32) -> u64 {
    1 << cap
}

fn prctl(op: i32, a: u64, b: u64) -> i64 {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(op, a, b, 0u64, 0u64) as i64 }
}

fn current() -> Creds {
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut gr, mut ge, mut gs) = (0, 0, 0);
    // SAFETY: valid out-pointers; setfs[ug]id(-1) only reports the current value.
    let (fsuid, fsgid) = unsafe {
        libc::getresuid(&mut r, &mut e, &mut s);
        libc::getresgid(&mut gr, &mut ge, &mut gs);
        (
            libc::setfsuid(u32::MAX) as u32,
            libc::setfsgid(u32::MAX) as u32,
        )
    };
    let mut groups = vec![0u32; 64];
    // SAFETY: a buffer of 64 gids.
    let n = unsafe { libc::getgroups(64, groups.as_mut_ptr()) };
    groups.truncate(n.max(0) as usize);
    let mut bounding = 0;
    let mut ambient = 0;
    for cap in 0..64 {
        if prctl(libc::PR_CAPBSET_READ, cap, 0) == 1 {
            bounding |= 1 << cap;
        }
        if prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as u64,
            cap,
        ) == 1
        {
            ambient |= 1 << cap;
        }
    }
    Creds {
        uid: (r, e, s),
        gid: (gr, ge, gs),
        fsuid,
        fsgid,
        groups,
        caps: capget(),
        bounding,
        ambient,
        securebits: prctl(libc::PR_GET_SECUREBITS, 0, 0) as i32,
    }
}

/// Binds a TCP socket to some free port below 1024 on 127.0.0.1: Ok(port), or Err(errno) of the
/// first failure that is not "port in use".
fn bind_low_port() -> Result<u16, i32> {
    for port in 600u16..700 {
        // SAFETY: socket/bind/close with a valid sockaddr_in.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if s < 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            let mut a: libc::sockaddr_in = std::mem::zeroed();
            a.sin_family = libc::AF_INET as u16;
            a.sin_port = port.to_be();
            a.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let r = libc::bind(
                s,
                &a as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            libc::close(s);
            if r == 0 {
                return Ok(port);
            }
            if e != libc::EADDRINUSE {
                return Err(e);
            }
        }
    }
    Err(libc::EADDRINUSE)
}

fn main() {
    let mut c = Checker::new();
    // The verdict is written as uid 1000: make the result file writable for it now.
    let result = std::env::var_os("CR_RESULT").expect("CR_RESULT");
    std::fs::write(&result, "").expect("create the result file");
    std::fs::set_permissions(&result, std::fs::Permissions::from_mode(0o666))
        .expect("chmod the result file");
    // SIGUSR1 blocked before READY (the check request may come at once).
    block_check_signal();

    let groups = [1000u32, 2000, 3000];
    // SAFETY: credential syscalls with valid arguments, as root.
    unsafe {
        assert_eq!(
            libc::setgroups(groups.len(), groups.as_ptr()),
            0,
            "setgroups"
        );
    }
    assert_eq!(
        prctl(libc::PR_CAPBSET_DROP, CAP_SYS_BOOT as u64, 0),
        0,
        "drop CAP_SYS_BOOT"
    );
    assert_eq!(
        prctl(libc::PR_CAPBSET_DROP, CAP_SYS_MODULE as u64, 0),
        0,
        "drop CAP_SYS_MODULE"
    );
    assert_eq!(
        prctl(libc::PR_SET_SECUREBITS, SECBIT_KEEP_CAPS, 0),
        0,
        "KEEP_CAPS"
    );
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::setresgid(1000, 1001, 1002), 0, "setresgid");
        assert_eq!(libc::setresuid(1000, 1001, 1002), 0, "setresuid");
        libc::setfsuid(1002);
        libc::setfsgid(1000);
    }
    let keep = bit(CAP_NET_BIND_SERVICE);
    assert_eq!(
        capset(
            keep | bit(CAP_SETPCAP),
            keep | bit(CAP_NET_RAW) | bit(CAP_SETPCAP),
            keep
        ),
        0,
        "capset (interim)"
    );
    assert_eq!(
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as u64,
            CAP_NET_BIND_SERVICE as u64
        ),
        0,
        "ambient raise"
    );
    assert_eq!(
        prctl(
            libc::PR_SET_SECUREBITS,
            SECBIT_KEEP_CAPS | SECBIT_NO_CAP_AMBIENT_RAISE,
            0
        ),
        0,
        "securebits"
    );
    assert_eq!(
        capset(keep, keep | bit(CAP_NET_RAW), keep),
        0,
        "capset (final)"
    );
    let before = current();
    c.eq(before.uid, (1000, 1001, 1002), "setup: uids");
    c.eq(before.fsuid, 1002, "setup: fsuid");
    c.check(
        bind_low_port().is_ok(),
        format!(
            "setup: cannot bind a port below 1024: {:?}",
            bind_low_port()
        ),
    );

    ready("");
    wait_for_check();

    c.eq(current(), before, "credentials");
    c.check(
        bind_low_port().is_ok(),
        format!(
            "cannot bind a port below 1024 after restore: errno {:?}",
            bind_low_port()
        ),
    );
    c.report();
}
