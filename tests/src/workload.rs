//! The workload side of the test protocol (see the crate docs): get ready, wait to be told to
//! check, check, report.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Collects failed checks; `report` turns them into the verdict.
#[derive(Default)]
pub struct Checker {
    failures: Vec<String>,
}

impl Checker {
    pub fn new() -> Checker {
        Checker::default()
    }

    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }

    pub fn eq<T: PartialEq + std::fmt::Debug>(&mut self, got: T, want: T, what: &str) {
        if got != want {
            self.failures
                .push(format!("{what}: got {got:?}, want {want:?}"));
        }
    }

    /// The failed checks so far (a forked child reports them its own way).
    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// Writes PASS / FAIL to $CR_RESULT and exits 0 / 1.
    pub fn report(self) -> ! {
        self.report_noting("")
    }

    /// [`Checker::report`] with a note after PASS (`PASS note`): what the workload saw that
    /// the harness checks further (e.g. whether queued events were kept).
    pub fn report_noting(self, note: &str) -> ! {
        let path = std::env::var_os("CR_RESULT").expect("CR_RESULT");
        let text = if self.failures.is_empty() {
            format!("PASS{}{note}\n", if note.is_empty() { "" } else { " " })
        } else {
            format!("FAIL: {}\n", self.failures.join("; "))
        };
        std::fs::write(path, &text).expect("write the result file");
        std::process::exit(if self.failures.is_empty() { 0 } else { 1 })
    }
}

/// Leaves the caller's session (a dump refuses a task whose session leader is outside the tree),
/// then writes `READY info` on fd 3 and closes it.
pub fn ready(info: &str) {
    // SAFETY: setsid has no preconditions; failure (already a leader) is fine.
    unsafe { libc::setsid() };
    // SIGUSR1 ("check yourself") may come the moment we say READY: unless a handler is
    // installed for it, block it now so it waits for `wait_for_check` instead of killing us.
    // SAFETY: reading our own disposition into a zeroed struct sigaction.
    let handler = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGUSR1, std::ptr::null(), &mut old);
        old.sa_sigaction
    };
    if handler == libc::SIG_DFL {
        block_check_signal();
    }
    // SAFETY: fd 3 is the ready pipe the harness gave us; we own it from here.
    let mut f = unsafe { std::fs::File::from_raw_fd(3) };
    f.write_all(format!("READY {info}\n").as_bytes())
        .expect("write the ready pipe");
}

/// The set holding SIGUSR1 alone.
fn check_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        set
    }
}

/// Blocks SIGUSR1 ("check yourself") on the calling thread; threads it starts and children it
/// forks inherit the mask. A workload that sets up threads or children, or installs no handler,
/// calls this before it can be told to check, so that the signal waits for
/// [`wait_for_check`] (sigwaitinfo) instead of killing it or landing on the wrong thread.
pub fn block_check_signal() {
    let set = check_signal_set();
    // SAFETY: blocking a signal on this thread; `set` is initialised.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Blocks until SIGUSR1 arrives, in sigwaitinfo (the task is dumped while inside that syscall).
pub fn wait_for_check() {
    block_check_signal();
    let set = check_signal_set();
    loop {
        // SAFETY: waiting for a signal of an initialised set; no siginfo wanted.
        let r = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if r == libc::SIGUSR1 {
            break;
        }
    }
}

static CHECK_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK_REQUESTED.store(true, Ordering::SeqCst);
}

/// For busy workloads: SIGUSR1 sets a flag that [`check_requested`] reads.
pub fn install_check_flag() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
}

pub fn check_requested() -> bool {
    CHECK_REQUESTED.load(Ordering::SeqCst)
}

/// A forked child's verdict: written to `$CR_RESULT.NAME`, then `_exit` with 0 (pass) or 1.
/// Its parent collects it with [`check_child`].
pub fn child_report(name: &str, c: Checker) -> ! {
    let path = format!("{}.{name}", std::env::var("CR_RESULT").expect("CR_RESULT"));
    let text = if c.failures.is_empty() {
        "PASS\n".to_string()
    } else {
        format!("FAIL: {}\n", c.failures.join("; "))
    };
    std::fs::write(&path, text).expect("write the child's result");
    // SAFETY: _exit skips the parent's atexit work (this is a forked child).
    unsafe { libc::_exit(if c.failures.is_empty() { 0 } else { 1 }) }
}

/// The verdict of child `name` (our child `pid`, which waits in [`wait_for_check`]): SIGUSR1
/// it, wait for it to exit, read its result into `c`.
pub fn check_child(c: &mut Checker, name: &str, pid: i32) {
    // SAFETY: plain kill/waitpid on our own child.
    let st = unsafe {
        libc::kill(pid, libc::SIGUSR1);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        st
    };
    let path = format!("{}.{name}", std::env::var("CR_RESULT").expect("CR_RESULT"));
    let res = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("no result: {e}"));
    c.check(
        res.starts_with("PASS") && libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        format!("{name} ({pid}): {} (status {st:#x})", res.trim()),
    );
}
