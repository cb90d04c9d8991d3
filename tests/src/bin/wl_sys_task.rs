//! Workload: per-task attributes across a checkpoint.
//!
//! Usage: wl_sys_task [seccomp]
//!
//! With `seccomp` it also installs an allow-everything seccomp filter (which cr refuses to dump:
//! the harness checks the refusal and that the task runs on unharmed).
//!
//! Set before the dump, checked after it: lowered soft and hard resource limits (every one of
//! the 16 must read back the same), comm (PR_SET_NAME), personality (ADDR_NO_RANDOMIZE), timer
//! slack, dumpable 0, the parent-death signal, no_new_privs, child subreaper, umask, the
//! clear_child_tid address glibc set (PR_GET_TID_ADDRESS); and the
//! rseq registration glibc made at startup: the kernel must still know the area (registering it
//! again fails with EBUSY, which it does only for the very same area, length and signature) and
//! keep its cpu_id current (overwritten with garbage, it is fixed on the next signal delivery),
//! and sched_getcpu must work.
//!
//! After a restore with -d the parent-death signal (SIGUSR2, handled) is delivered when
//! `cr restore` exits, as with CRIU: the workload reports how often it saw it, not a failure.

use std::sync::atomic::{AtomicU32, Ordering};

use cr_tests::workload::{block_check_signal, ready, wait_for_check, Checker};

/// glibc's rseq signature on x86 (RSEQ_SIG).
const RSEQ_SIG: u32 = 0x5305_3053;

extern "C" {
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

static PDEATH_SEEN: AtomicU32 = AtomicU32::new(0);
static WINCH_SEEN: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_usr2(_: libc::c_int) {
    PDEATH_SEEN.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_winch(_: libc::c_int) {
    WINCH_SEEN.fetch_add(1, Ordering::SeqCst);
}

fn install(sig: i32, handler: usize) {
    // SAFETY: the handlers only touch atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

fn prctl(op: i32, a: u64) -> i64 {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(op, a, 0u64, 0u64, 0u64) as i64 }
}

fn prctl_get_int(op: i32) -> i32 {
    let mut v: i32 = 0;
    // SAFETY: the *_GET ops given here write one int to the pointer.
    unsafe { libc::prctl(op, &mut v as *mut i32, 0u64, 0u64, 0u64) };
    v
}

fn rlimits() -> Vec<(u64, u64)> {
    (0..16)
        .map(|r| {
            let mut l = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: prlimit64 on ourselves into a valid struct.
            unsafe { libc::prlimit64(0, r as _, std::ptr::null(), &mut l) };
            (l.rlim_cur, l.rlim_max)
        })
        .collect()
}

fn set_rlimit(res: libc::__rlimit_resource_t, cur: u64, max: u64) {
    let l = libc::rlimit64 {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: prlimit64 on ourselves from a valid struct.
    let r = unsafe { libc::prlimit64(0, res, &l, std::ptr::null_mut()) };
    assert_eq!(
        r,
        0,
        "prlimit64({res}, {cur}, {max}): {}",
        std::io::Error::last_os_error()
    );
}

fn comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: fs:0 holds the thread pointer itself on x86_64 (TCB self-pointer).
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly)) };
    tp
}

fn tid_address() -> u64 {
    let mut a: u64 = 0;
    // SAFETY: PR_GET_TID_ADDRESS (40) writes one pointer.
    unsafe { libc::prctl(40, &mut a as *mut u64, 0u64, 0u64, 0u64) };
    a
}

fn umask_now() -> u32 {
    // SAFETY: umask twice puts the value back.
    unsafe {
        let m = libc::umask(0);
        libc::umask(m);
        m
    }
}

fn main() {
    let mut c = Checker::new();
    // SIGUSR1 blocked before READY (the check request may come at once).
    block_check_signal();
    install(libc::SIGUSR2, on_usr2 as *const () as usize);
    install(libc::SIGWINCH, on_winch as *const () as usize);

    let before = rlimits();
    let lower = |r: libc::__rlimit_resource_t, cur: u64, max: u64| {
        let (_, hard) = before[r as usize];
        set_rlimit(r, cur.min(hard), max.min(hard));
    };
    lower(libc::RLIMIT_NOFILE, 500, 800);
    lower(libc::RLIMIT_CORE, 0, 1 << 20);
    lower(libc::RLIMIT_CPU, 1000, 2000);
    lower(libc::RLIMIT_FSIZE, 1 << 30, 1 << 31);
    lower(libc::RLIMIT_MSGQUEUE, 4096, 8192);
    lower(libc::RLIMIT_SIGPENDING, 1000, 2000);
    lower(
        libc::RLIMIT_STACK,
        4 << 20,
        before[libc::RLIMIT_STACK as usize].1,
    );
    lower(libc::RLIMIT_AS, 1 << 40, u64::MAX);
    lower(libc::RLIMIT_NPROC, 5000, 6000);
    let limits = rlimits();

    c.eq(
        prctl(libc::PR_SET_NAME, c"wl-renamed-42".as_ptr() as u64),
        0,
        "PR_SET_NAME",
    );
    // SAFETY: personality(2) query and set.
    let pers = unsafe { libc::personality(0xffff_ffff) } as u32 | libc::ADDR_NO_RANDOMIZE as u32;
    // SAFETY: as above.
    unsafe { libc::personality(pers as libc::c_ulong) };
    c.eq(
        prctl(libc::PR_SET_TIMERSLACK, 123_457),
        0,
        "PR_SET_TIMERSLACK",
    );
    c.eq(
        prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR2 as u64),
        0,
        "PR_SET_PDEATHSIG",
    );
    c.eq(
        prctl(libc::PR_SET_CHILD_SUBREAPER, 1),
        0,
        "PR_SET_CHILD_SUBREAPER",
    );
    c.eq(
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1),
        0,
        "PR_SET_NO_NEW_PRIVS",
    );
    c.eq(prctl(libc::PR_SET_DUMPABLE, 0), 0, "PR_SET_DUMPABLE");
    // SAFETY: plain umask.
    unsafe { libc::umask(0o027) };

    let tid_addr = tid_address();
    c.check(tid_addr != 0, "glibc set no clear_child_tid address");
    if std::env::args().nth(1).as_deref() == Some("seccomp") {
        // BPF: return SECCOMP_RET_ALLOW.
        let filter = [libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        }];
        let prog = libc::sock_fprog {
            len: 1,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: a valid one-instruction program; no_new_privs is set.
        let r = unsafe { libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const libc::sock_fprog) };
        c.eq(r, 0, "seccomp(SECCOMP_SET_MODE_FILTER)");
    }

    // SAFETY: glibc's exported rseq constants.
    let (rseq_off, rseq_size) = unsafe { (__rseq_offset, __rseq_size) };
    let area = (thread_pointer() as isize + rseq_off) as *mut u32;

    ready("");
    wait_for_check();

    c.eq(rlimits(), limits, "resource limits (cur, max) 0..16");
    c.eq(comm(), "wl-renamed-42".to_string(), "comm");
    // SAFETY: personality query.
    c.eq(
        unsafe { libc::personality(0xffff_ffff) } as u32,
        pers,
        "personality",
    );
    c.eq(prctl(libc::PR_GET_TIMERSLACK, 0), 123_457, "timer slack");
    c.eq(
        prctl_get_int(libc::PR_GET_PDEATHSIG),
        libc::SIGUSR2,
        "parent-death signal",
    );
    c.eq(
        prctl_get_int(libc::PR_GET_CHILD_SUBREAPER),
        1,
        "child subreaper",
    );
    c.eq(prctl(libc::PR_GET_NO_NEW_PRIVS, 0), 1, "no_new_privs");
    c.eq(prctl(libc::PR_GET_DUMPABLE, 0), 0, "dumpable");
    c.eq(umask_now(), 0o027, "umask");
    c.eq(tid_address(), tid_addr, "clear_child_tid address");

    if rseq_size == 0 {
        c.check(false, "glibc did not register rseq");
    } else {
        // SAFETY: registering the already registered area again: the kernel compares and refuses.
        let r = unsafe { libc::syscall(libc::SYS_rseq, area, 32u32, 0, RSEQ_SIG) };
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        c.eq(
            (r, e),
            (-1, libc::EBUSY),
            "rseq(same area) says it is registered (EBUSY)",
        );
        // SAFETY: cpu_id (offset 4) of our own rseq area; the kernel rewrites it.
        unsafe { std::ptr::write_volatile(area.add(1), 0xdead_beef) };
        // SAFETY: raise of a handled signal: signal delivery refreshes the rseq fields.
        unsafe { libc::raise(libc::SIGWINCH) };
        // SAFETY: as above.
        let cpu_id = unsafe { std::ptr::read_volatile(area.add(1)) };
        // SAFETY: plain sched_getcpu.
        let cpu = unsafe { libc::sched_getcpu() };
        c.check(
            cpu_id != 0xdead_beef && (cpu_id as i32) >= 0,
            format!("rseq cpu_id not updated by the kernel: {cpu_id:#x}"),
        );
        c.check(cpu >= 0, format!("sched_getcpu: {cpu}"));
        c.eq(WINCH_SEEN.load(Ordering::SeqCst), 1, "SIGWINCH handler");
    }
    let _ = PDEATH_SEEN.load(Ordering::SeqCst);
    c.report();
}
