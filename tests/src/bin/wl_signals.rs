//! Workload: signal state across a checkpoint.
//!
//! Usage: wl_signals [in-handler]
//!
//! `in-handler`: the task is checkpointed while it runs a signal handler on the alternate stack
//! (spinning until SIGUSR1 arrives, nested). Afterwards the handler must still see itself on the
//! alternate stack, and returning from it (rt_sigreturn through the frame the old kernel built)
//! must bring back the interrupted code with its registers and signal mask.
//!
//! Set up before the dump, checked after it:
//! - dispositions: SIGUSR2 (SA_SIGINFO|SA_RESTART, sa_mask {HUP}), SIGHUP (SA_ONSTACK|
//!   SA_NODEFER), SIGALRM (SA_RESETHAND), SIGPIPE and SIGQUIT ignored, SIGTERM default; the raw
//!   kernel sigaction of every signal (handler, flags, restorer, mask) must read back the same;
//! - an alternate signal stack, on which the SA_ONSTACK handler must run;
//! - the blocked mask {INT, WINCH, RTMIN+1, RTMIN+2} (+ USR1 while waiting for the check);
//! - pending while blocked: SIGINT sent with kill (process queue), SIGWINCH with tgkill (thread
//!   queue), five SIGRTMIN+1 queued with sigqueue and values 100..104 (process queue), three
//!   SIGRTMIN+2 queued with rt_tgsigqueueinfo and values 200..202 (thread queue).
//!
//! After the check request: the mask and pending set read back the same; unblocking delivers
//! each standard signal once and every real-time signal in queue order with its value and
//! sender; then each handler is exercised with raise() to check its flags in action.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use cr_tests::sys::{blocked_mask, mmap_anon, set_blocked_mask, sig_bit};
use cr_tests::workload::{ready, wait_for_check, Checker};

const LOG_LEN: usize = 64;
/// (signo, si_code, si_pid, si_value) of every SA_SIGINFO delivery, in delivery order.
static LOG_SIG: [AtomicI64; LOG_LEN] = [const { AtomicI64::new(0) }; LOG_LEN];
static LOG_CODE: [AtomicI64; LOG_LEN] = [const { AtomicI64::new(0) }; LOG_LEN];
static LOG_PID: [AtomicI64; LOG_LEN] = [const { AtomicI64::new(0) }; LOG_LEN];
static LOG_VALUE: [AtomicI64; LOG_LEN] = [const { AtomicI64::new(0) }; LOG_LEN];
static LOG_N: AtomicUsize = AtomicUsize::new(0);
/// Blocked mask inside the last SIGUSR2 / SIGHUP handler; address of a local in the SIGHUP one.
static USR2_MASK: AtomicU64 = AtomicU64::new(0);
static HUP_MASK: AtomicU64 = AtomicU64::new(0);
static HUP_STACK: AtomicU64 = AtomicU64::new(0);
static ALRM_COUNT: AtomicU64 = AtomicU64::new(0);

fn rtmin() -> i32 {
    libc::SIGRTMIN()
}

fn pending_mask() -> u64 {
    let mut m: u64 = 0;
    // SAFETY: rt_sigpending(&m, 8).
    unsafe { libc::syscall(libc::SYS_rt_sigpending, &mut m as *mut u64, 8) };
    m
}

/// The kernel's own view of a signal's action: {handler, flags, restorer, mask}.
fn raw_action(sig: i32) -> [u64; 4] {
    let mut a = [0u64; 4];
    // SAFETY: rt_sigaction(sig, NULL, &a, 8) writes struct kernel_sigaction (4 words).
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::null::<u64>(),
            a.as_mut_ptr(),
            8,
        )
    };
    a
}

extern "C" fn on_info(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let i = LOG_N.fetch_add(1, Ordering::SeqCst);
    if i < LOG_LEN {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let (code, pid, value) = unsafe {
            (
                (*info).si_code,
                (*info).si_pid(),
                (*info).si_value().sival_ptr as i64,
            )
        };
        LOG_SIG[i].store(sig as i64, Ordering::SeqCst);
        LOG_CODE[i].store(code as i64, Ordering::SeqCst);
        LOG_PID[i].store(pid as i64, Ordering::SeqCst);
        LOG_VALUE[i].store(value, Ordering::SeqCst);
    }
    if sig == libc::SIGUSR2 {
        USR2_MASK.store(blocked_mask(), Ordering::SeqCst);
    }
}

extern "C" fn on_hup(_: libc::c_int) {
    let local = 0u8;
    HUP_STACK.store(std::ptr::addr_of!(local) as u64, Ordering::SeqCst);
    HUP_MASK.store(blocked_mask(), Ordering::SeqCst);
}

extern "C" fn on_alrm(_: libc::c_int) {
    ALRM_COUNT.fetch_add(1, Ordering::SeqCst);
}

fn install(sig: i32, handler: usize, flags: i32, mask: &[i32]) {
    // SAFETY: sigaction with a zeroed struct filled in; the handlers only use atomics and
    // async-signal-safe syscalls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = flags;
        libc::sigemptyset(&mut sa.sa_mask);
        for &m in mask {
            libc::sigaddset(&mut sa.sa_mask, m);
        }
        assert_eq!(
            libc::sigaction(sig, &sa, std::ptr::null_mut()),
            0,
            "sigaction({sig})"
        );
    }
}

/// rt_tgsigqueueinfo to this thread with SI_QUEUE and a value.
fn tg_queue(sig: i32, value: i64) {
    let mut si = [0u8; 128];
    si[0..4].copy_from_slice(&sig.to_ne_bytes());
    si[8..12].copy_from_slice(&(-1i32).to_ne_bytes()); // SI_QUEUE
                                                       // SAFETY: getpid/getuid/gettid have no preconditions.
    let (pid, uid, tid) = unsafe { (libc::getpid(), libc::getuid(), libc::gettid()) };
    si[16..20].copy_from_slice(&pid.to_ne_bytes());
    si[20..24].copy_from_slice(&uid.to_ne_bytes());
    si[24..32].copy_from_slice(&value.to_ne_bytes());
    // SAFETY: a 128-byte siginfo buffer.
    let r = unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, si.as_ptr()) };
    assert_eq!(r, 0, "rt_tgsigqueueinfo");
}

static GO: AtomicU64 = AtomicU64::new(0);
static IN_HANDLER_ALT: AtomicU64 = AtomicU64::new(0);
static IN_HANDLER_SP: AtomicU64 = AtomicU64::new(0);
static IN_HANDLER_DONE: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_go(_: libc::c_int) {
    GO.store(1, Ordering::SeqCst);
}

/// Runs on the alternate stack: says READY, then spins (the checkpoint happens here).
extern "C" fn on_spin(_: libc::c_int) {
    let local = 0u8;
    IN_HANDLER_SP.store(std::ptr::addr_of!(local) as u64, Ordering::SeqCst);
    ready("");
    while GO.load(Ordering::SeqCst) == 0 {
        std::hint::spin_loop();
    }
    IN_HANDLER_ALT.store(current_altstack().2 as u64, Ordering::SeqCst);
    IN_HANDLER_DONE.store(1, Ordering::SeqCst);
}

/// Maps `size` bytes and makes them this thread's alternate signal stack; returns its address.
fn set_up_altstack(size: usize) -> usize {
    let alt = mmap_anon(size).expect("mmap the alternate signal stack");
    let ss = libc::stack_t {
        ss_sp: alt as *mut libc::c_void,
        ss_flags: 0,
        ss_size: size,
    };
    // SAFETY: a valid stack_t describing our mapping.
    assert_eq!(unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) }, 0);
    alt
}

/// The alternate signal stack as the kernel reports it now: (address, size, flags).
/// Async-signal-safe: the handler on that stack calls it too.
fn current_altstack() -> (u64, usize, i32) {
    let mut cur = libc::stack_t {
        ss_sp: std::ptr::null_mut(),
        ss_flags: 0,
        ss_size: 0,
    };
    // SAFETY: query into a valid stack_t.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut cur) };
    (cur.ss_sp as u64, cur.ss_size, cur.ss_flags)
}

/// `in-handler` mode.
fn in_handler(c: &mut Checker) {
    let alt_size = 64 * 1024usize;
    let alt = set_up_altstack(alt_size);
    install(libc::SIGUSR1, on_go as *const () as usize, 0, &[]);
    install(
        libc::SIGUSR2,
        on_spin as *const () as usize,
        libc::SA_ONSTACK,
        &[libc::SIGWINCH],
    );
    let mask = sig_bit(libc::SIGINT);
    set_blocked_mask(mask);
    let witness = std::hint::black_box(0x5EED_F00D_u64);
    // SAFETY: raise of a handled signal; the handler returns once SIGUSR1 came.
    unsafe { libc::raise(libc::SIGUSR2) };
    c.eq(
        std::hint::black_box(witness),
        0x5EED_F00D,
        "a value of the interrupted code",
    );
    c.eq(
        IN_HANDLER_DONE.load(Ordering::SeqCst),
        1,
        "the handler ran to its end",
    );
    let sp = IN_HANDLER_SP.load(Ordering::SeqCst);
    c.check(
        sp >= alt as u64 && sp < alt as u64 + alt_size as u64,
        format!("handler ran at {sp:#x}, off the alternate stack"),
    );
    c.eq(
        IN_HANDLER_ALT.load(Ordering::SeqCst) as i32,
        libc::SS_ONSTACK,
        "sigaltstack inside the handler says SS_ONSTACK",
    );
    c.eq(
        current_altstack(),
        (alt as u64, alt_size, 0),
        "sigaltstack after the handler returned",
    );
    c.eq(blocked_mask(), mask, "mask after the handler returned");
}

fn main() {
    let mut c = Checker::new();
    if std::env::args().nth(1).as_deref() == Some("in-handler") {
        in_handler(&mut c);
        c.report();
    }
    let (rt1, rt2) = (rtmin() + 1, rtmin() + 2);
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };

    // Alternate signal stack.
    let alt_size = 64 * 1024usize;
    let alt = set_up_altstack(alt_size);

    install(
        libc::SIGUSR2,
        on_info as *const () as usize,
        libc::SA_SIGINFO | libc::SA_RESTART,
        &[libc::SIGHUP],
    );
    install(
        libc::SIGHUP,
        on_hup as *const () as usize,
        libc::SA_ONSTACK | libc::SA_NODEFER,
        &[],
    );
    install(
        libc::SIGALRM,
        on_alrm as *const () as usize,
        libc::SA_RESETHAND,
        &[],
    );
    install(libc::SIGPIPE, libc::SIG_IGN, 0, &[]);
    install(libc::SIGQUIT, libc::SIG_IGN, 0, &[]);
    // SIGRTMIN+3: handled and never blocked (the harness may queue it while the task is dumped).
    for sig in [libc::SIGINT, libc::SIGWINCH, rt1, rt2, rtmin() + 3] {
        install(sig, on_info as *const () as usize, libc::SA_SIGINFO, &[]);
    }
    let blocked = sig_bit(libc::SIGINT) | sig_bit(libc::SIGWINCH) | sig_bit(rt1) | sig_bit(rt2);
    // SIGUSR1 (the check request) too, before READY: the harness may send it at once.
    set_blocked_mask(blocked | sig_bit(libc::SIGUSR1));
    // SAFETY: kill/tgkill/sigqueue to ourselves, all blocked.
    unsafe {
        libc::kill(me, libc::SIGINT);
        libc::syscall(libc::SYS_tgkill, me, libc::gettid(), libc::SIGWINCH);
        for v in 100..105usize {
            assert_eq!(
                libc::sigqueue(
                    me,
                    rt1,
                    libc::sigval {
                        sival_ptr: v as *mut libc::c_void
                    }
                ),
                0,
                "sigqueue"
            );
        }
    }
    for v in 200..203 {
        tg_queue(rt2, v);
    }
    let actions: Vec<[u64; 4]> = (1..=64).map(raw_action).collect();
    let pending_before = pending_mask();
    c.eq(pending_before, blocked, "pending before the dump (setup)");
    let blocked = blocked | sig_bit(libc::SIGUSR1);

    ready("");
    wait_for_check();

    // Dispositions, exactly.
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let now = raw_action(sig);
        let was = actions[(sig - 1) as usize];
        c.check(
            now == was,
            format!("signal {sig}: action {now:x?}, was {was:x?} (handler, flags, restorer, mask)"),
        );
    }
    // Alternate stack.
    c.eq(current_altstack(), (alt as u64, alt_size, 0), "sigaltstack");
    // Mask and pending set.
    c.eq(blocked_mask(), blocked, "blocked mask");
    c.eq(pending_mask(), pending_before, "pending signals");

    // Deliver everything pending.
    set_blocked_mask(sig_bit(libc::SIGUSR1));
    let n = LOG_N.load(Ordering::SeqCst).min(LOG_LEN);
    let log: Vec<(i32, i32, i32, i64)> = (0..n)
        .map(|i| {
            (
                LOG_SIG[i].load(Ordering::SeqCst) as i32,
                LOG_CODE[i].load(Ordering::SeqCst) as i32,
                LOG_PID[i].load(Ordering::SeqCst) as i32,
                LOG_VALUE[i].load(Ordering::SeqCst),
            )
        })
        .collect();
    let of = |sig: i32| -> Vec<(i32, i32, i64)> {
        log.iter()
            .filter(|e| e.0 == sig)
            .map(|e| (e.1, e.2, e.3))
            .collect()
    };
    // A standard signal carries no value: its deliveries as (si_code, si_pid).
    let senders = |sig: i32| -> Vec<(i32, i32)> { of(sig).iter().map(|e| (e.0, e.1)).collect() };
    c.eq(
        senders(libc::SIGINT),
        vec![(libc::SI_USER, me)],
        "SIGINT (kill): delivered once, from us",
    );
    c.eq(
        senders(libc::SIGWINCH),
        vec![(libc::SI_TKILL, me)],
        "SIGWINCH (tgkill): delivered once",
    );
    c.eq(
        of(rt1),
        (100..105)
            .map(|v| (libc::SI_QUEUE, me, v))
            .collect::<Vec<_>>(),
        "SIGRTMIN+1 values in order",
    );
    c.eq(
        of(rt2),
        (200..203)
            .map(|v| (libc::SI_QUEUE, me, v))
            .collect::<Vec<_>>(),
        "SIGRTMIN+2 values in order",
    );
    c.eq(n, 10, "signals delivered");
    c.eq(pending_mask(), 0, "nothing left pending");

    // Each disposition in action.
    // SAFETY: raise(3) of handled or ignored signals.
    unsafe { libc::raise(libc::SIGUSR2) };
    let last = LOG_N.load(Ordering::SeqCst) - 1;
    c.eq(
        (
            LOG_SIG[last].load(Ordering::SeqCst) as i32,
            LOG_CODE[last].load(Ordering::SeqCst) as i32,
        ),
        (libc::SIGUSR2, libc::SI_TKILL),
        "SIGUSR2 SA_SIGINFO handler",
    );
    let m = USR2_MASK.load(Ordering::SeqCst);
    c.eq(
        m & (sig_bit(libc::SIGUSR2) | sig_bit(libc::SIGHUP)),
        sig_bit(libc::SIGUSR2) | sig_bit(libc::SIGHUP),
        "SIGUSR2 handler blocks USR2 and its sa_mask HUP",
    );
    // SAFETY: as above.
    unsafe { libc::raise(libc::SIGHUP) };
    let sp = HUP_STACK.load(Ordering::SeqCst);
    c.check(
        sp >= alt as u64 && sp < alt as u64 + alt_size as u64,
        format!(
            "SA_ONSTACK handler ran at {sp:#x}, not on the alternate stack {:#x}",
            alt as u64
        ),
    );
    c.eq(
        HUP_MASK.load(Ordering::SeqCst) & sig_bit(libc::SIGHUP),
        0,
        "SA_NODEFER: SIGHUP not blocked in its handler",
    );
    // SAFETY: as above.
    unsafe { libc::raise(libc::SIGALRM) };
    c.eq(ALRM_COUNT.load(Ordering::SeqCst), 1, "SIGALRM handler");
    c.eq(
        raw_action(libc::SIGALRM)[0],
        libc::SIG_DFL as u64,
        "SA_RESETHAND: SIGALRM back to default",
    );
    // SAFETY: as above; both are ignored (the process would die otherwise).
    unsafe {
        libc::raise(libc::SIGPIPE);
        libc::raise(libc::SIGQUIT);
    }
    c.eq(
        raw_action(libc::SIGTERM)[0],
        libc::SIG_DFL as u64,
        "SIGTERM default",
    );
    c.report();
}
