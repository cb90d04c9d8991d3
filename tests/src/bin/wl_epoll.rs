//! Workload: epoll (tests/tests/restore_events.rs). A parent and a forked child share epoll
//! E (fd 10); epoll E2 (fd 11) watches E. E's interest list, before READY:
//!
//! | data               | target                        | events                      | state at READY |
//! |--------------------|-------------------------------|-----------------------------|----------------|
//! | 0x0123456789abcdef | pipe A read end (fd 20)       | IN                          | ready (data)   |
//! | 0xfffffffffffffffe | pipe B read end (fd 22)       | IN, ET                      | data, edge reported |
//! | 3                  | pipe C read end (fd 24)       | IN, ONESHOT                 | fired: disarmed |
//! | 4                  | pipe D read end (fd 26)       | IN, ONESHOT                 | armed, empty   |
//! | 5                  | eventfd X (fd 34)             | IN, OUT, EXCLUSIVE          | writable       |
//! | 6                  | pipe W write end (fd 33)      | OUT, WAKEUP (dropped by kernels without PM_SLEEP) | writable |
//! | 200                | pipe G read end, as fd 200    | IN — fd 200 closed since, G lives on as fd 28 | empty |
//! | 0x201a             | pipe H read end, as fd 201    | IN — fd 201 closed, then reused by eventfd Y | empty |
//! | 0x201b             | eventfd Y (fd 201)            | IN                          | empty          |
//! | 0x4b               | pipe K read end (fd 35), registered by the child, which alone holds it | IN | empty |
//!
//! After the restore the parent checks: the interest lists of E and E2 as fdinfo shows them
//! (fd numbers, events, data), what epoll_wait reports at once (A, X, W — B's edge at most
//! once more — never C, D, G, H, Y, K), edge-triggered B reported once per write, C still
//! disarmed until EPOLL_CTL_MOD, D firing once, X still exclusive (EPOLL_CTL_MOD refused with
//! EINVAL), G reported under 200 and deletable as fd 200 once G is dup'ed there again, H and Y
//! told apart under the same fd number, K reported in the parent though only the child holds
//! it, E2 readable while E has events, and (kcmp) the child's fd 10 still E itself. The child
//! checks its own view of E, reads K and deletes K's entry, which the parent then no longer
//! sees.
//!
//! Usage: wl_epoll

use std::collections::BTreeSet;

use cr_tests::fdinfo::{self, EpollEntry};
use cr_tests::workload::{
    block_check_signal, check_child, child_report, ready, wait_for_check, Checker,
};

const E: i32 = 10;
const E2: i32 = 11;
const A: u64 = 0x0123_4567_89ab_cdef;
const B: u64 = 0xffff_ffff_ffff_fffe;
const C: u64 = 3;
const D: u64 = 4;
const X: u64 = 5;
const W: u64 = 6;
const G: u64 = 200;
const H: u64 = 0x201a;
const Y: u64 = 0x201b;
const K: u64 = 0x4b;
const E2_DATA: u64 = 0xe2;

fn sys(r: i32, what: &str) -> i32 {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

/// A pipe at fds (r, r + 1).
fn pipe_at(r: i32) {
    let mut fds = [0; 2];
    // SAFETY: valid out-array; dup2 to reserved numbers.
    unsafe {
        sys(libc::pipe(fds.as_mut_ptr()), "pipe");
        sys(libc::dup2(fds[0], r), "dup2");
        sys(libc::dup2(fds[1], r + 1), "dup2");
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

fn ctl(ep: i32, op: i32, fd: i32, events: u32, data: u64) -> Result<(), i32> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: a valid epoll_event.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn add(fd: i32, events: i32, data: u64) {
    ctl(E, libc::EPOLL_CTL_ADD, fd, events as u32, data)
        .unwrap_or_else(|e| panic!("EPOLL_CTL_ADD fd {fd}: errno {e}"));
}

/// The data of every event epoll `ep` reports now (no waiting).
fn wait_now(ep: i32) -> BTreeSet<u64> {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
    // SAFETY: a valid buffer of 64 events.
    let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 64, 0) };
    evs[..n.max(0) as usize].iter().map(|e| e.u64).collect()
}

fn write1(fd: i32, b: &[u8]) {
    // SAFETY: a write from a valid buffer.
    let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
    assert_eq!(n as usize, b.len(), "write fd {fd}");
}

fn set(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

fn child(sync_r: i32, sync_w: i32) -> ! {
    // SAFETY: closing the fds the child does not keep: the ready pipe (only the parent may
    // hold it), K's write end, the read end of the sync pipe.
    unsafe {
        libc::close(3);
        libc::close(36);
        libc::close(sync_r);
    }
    add(35, libc::EPOLLIN, K);
    write1(sync_w, b"r");
    // SAFETY: closing our end of the sync pipe.
    unsafe { libc::close(sync_w) };
    let mine = fdinfo::epoll_entries(E);
    wait_for_check();
    let mut c = Checker::new();
    c.eq(fdinfo::epoll_entries(E), mine, "child: E's interest list");
    let mut b = [0u8; 8];
    // SAFETY: a read into a valid buffer.
    let n = unsafe { libc::read(35, b.as_mut_ptr().cast(), 8) };
    c.eq(n, 1, "child: read K");
    c.eq(
        ctl(E, libc::EPOLL_CTL_DEL, 35, 0, 0),
        Ok(()),
        "child: EPOLL_CTL_DEL of K (fd 35)",
    );
    child_report("child", c)
}

fn main() {
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    block_check_signal();
    // SAFETY: creating the epolls and eventfds at reserved numbers.
    unsafe {
        let e = sys(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1");
        sys(libc::dup3(e, E, libc::O_CLOEXEC), "dup3");
        libc::close(e);
        let e2 = sys(libc::epoll_create1(0), "epoll_create1");
        sys(libc::dup2(e2, E2), "dup2");
        libc::close(e2);
        let x = sys(libc::eventfd(0, libc::EFD_NONBLOCK), "eventfd");
        sys(libc::dup2(x, 34), "dup2");
        libc::close(x);
    }
    for r in [20, 22, 24, 26, 28, 30, 32, 35] {
        pipe_at(r);
    }
    add(20, libc::EPOLLIN, A);
    add(22, libc::EPOLLIN | libc::EPOLLET, B);
    add(24, libc::EPOLLIN | libc::EPOLLONESHOT, C);
    add(26, libc::EPOLLIN | libc::EPOLLONESHOT, D);
    add(34, libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLEXCLUSIVE, X);
    add(33, libc::EPOLLOUT | libc::EPOLLWAKEUP, W);
    // SAFETY: dups and closes of our own fds at reserved numbers.
    unsafe {
        sys(libc::dup2(28, 200), "dup2");
        add(200, libc::EPOLLIN, G);
        libc::close(200);
        sys(libc::dup2(30, 201), "dup2");
        add(201, libc::EPOLLIN, H);
        libc::close(201);
        let y = sys(libc::eventfd(0, libc::EFD_NONBLOCK), "eventfd");
        sys(libc::dup2(y, 201), "dup2");
        libc::close(y);
    }
    add(201, libc::EPOLLIN, Y);
    write1(21, b"a");
    write1(23, b"b");
    write1(25, b"c");
    let first = wait_now(E);
    assert_eq!(first, set(&[A, B, C, X, W]), "epoll_wait before READY");
    ctl(E2, libc::EPOLL_CTL_ADD, E, libc::EPOLLIN as u32, E2_DATA).expect("add E to E2");

    let mut sync = [0; 2];
    // SAFETY: a valid out-array.
    sys(unsafe { libc::pipe(sync.as_mut_ptr()) }, "pipe");
    // SAFETY: fork while single-threaded.
    let pid = sys(unsafe { libc::fork() }, "fork");
    if pid == 0 {
        child(sync[0], sync[1]);
    }
    let mut b = [0u8; 1];
    // SAFETY: a read into a valid buffer; then closing what the parent no longer holds.
    unsafe {
        assert_eq!(
            libc::read(sync[0], b.as_mut_ptr().cast(), 1),
            1,
            "child registered K"
        );
        libc::close(sync[0]);
        libc::close(sync[1]);
        libc::close(35);
    }
    let e_before = fdinfo::epoll_entries(E);
    let e2_before = fdinfo::epoll_entries(E2);
    // SAFETY: getpid has no arguments.
    let me = unsafe { libc::getpid() };
    ready(&format!("pids={me},{pid}"));
    wait_for_check();

    let mut c = Checker::new();
    c.eq(
        fdinfo::epoll_entries(E),
        e_before.clone(),
        "E's interest list",
    );
    c.eq(fdinfo::epoll_entries(E2), e2_before, "E2's interest list");
    // SAFETY: F_GETFD on our fd.
    c.eq(
        unsafe { libc::fcntl(E, libc::F_GETFD) } & libc::FD_CLOEXEC,
        libc::FD_CLOEXEC,
        "E's FD_CLOEXEC",
    );
    // SAFETY: kcmp of our fd 10 and the child's fd 10.
    let same = unsafe {
        libc::syscall(libc::SYS_kcmp, me, pid, 0 /* KCMP_FILE */, E, E)
    };
    c.eq(same, 0, "kcmp(parent fd 10, child fd 10): the same epoll");
    let now = wait_now(E);
    let must = set(&[A, X, W]);
    c.check(
        now.is_superset(&must) && now.is_subset(&set(&[A, B, X, W])),
        format!("epoll_wait at once reported {now:x?}; want {must:x?} (and B's edge at most once)"),
    );
    c.eq(
        wait_now(E),
        must.clone(),
        "epoll_wait again (level-triggered only)",
    );
    c.eq(wait_now(E2), set(&[E2_DATA]), "E2 while E has events");
    write1(36, b"k");
    c.eq(
        wait_now(E),
        set(&[A, K, X, W]),
        "after a write to K (held by the child only)",
    );
    // The child compares its view of E (unchanged so far), reads K and deletes its entry.
    check_child(&mut c, "child", pid);
    c.eq(wait_now(E), must.clone(), "after the child deleted K");
    write1(23, b"b");
    c.eq(wait_now(E), set(&[A, B, X, W]), "after a write to B (ET)");
    c.eq(wait_now(E), must.clone(), "B again without a write");
    c.eq(
        ctl(
            E,
            libc::EPOLL_CTL_MOD,
            24,
            (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
            C,
        ),
        Ok(()),
        "re-arm C",
    );
    c.eq(wait_now(E), set(&[A, C, X, W]), "after re-arming C");
    c.eq(wait_now(E), must.clone(), "C again (one-shot)");
    write1(27, b"d");
    c.eq(wait_now(E), set(&[A, D, X, W]), "after a write to D");
    c.eq(wait_now(E), must.clone(), "D again (one-shot)");
    c.eq(
        ctl(E, libc::EPOLL_CTL_MOD, 34, libc::EPOLLIN as u32, X),
        Err(libc::EINVAL),
        "EPOLL_CTL_MOD of X (EPOLLEXCLUSIVE)",
    );
    write1(29, b"g");
    c.eq(
        wait_now(E),
        set(&[A, G, X, W]),
        "after a write to G (entry under fd 200)",
    );
    // SAFETY: G's read end at fd 200 again, so that the entry's key can be named.
    unsafe { libc::dup2(28, 200) };
    c.eq(
        ctl(E, libc::EPOLL_CTL_DEL, 200, 0, 0),
        Ok(()),
        "EPOLL_CTL_DEL of G as fd 200",
    );
    // SAFETY: closing our dup.
    unsafe { libc::close(200) };
    write1(31, b"h");
    c.eq(
        wait_now(E),
        set(&[A, H, X, W]),
        "after a write to H (entry under fd 201)",
    );
    let mut hb = [0u8; 1];
    // SAFETY: a read into a valid buffer.
    unsafe { libc::read(30, hb.as_mut_ptr().cast(), 1) };
    write1(201, &1u64.to_ne_bytes());
    c.eq(
        wait_now(E),
        set(&[A, X, Y, W]),
        "after a write to Y (fd 201 now)",
    );
    let mut want = e_before;
    want.retain(|e: &EpollEntry| e.data != K && e.data != G);
    for e in want.iter_mut() {
        if e.data == C || e.data == D {
            // Fired one-shots keep only the private bits.
            e.events &=
                (libc::EPOLLONESHOT | libc::EPOLLET | libc::EPOLLWAKEUP | libc::EPOLLEXCLUSIVE)
                    as u32;
        }
    }
    c.eq(
        fdinfo::epoll_entries(E),
        want,
        "E's interest list after the child deleted K",
    );
    c.report()
}
