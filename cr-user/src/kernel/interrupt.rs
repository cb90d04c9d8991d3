//! Ctrl-C / SIGTERM during a dump: noted by a handler, acted on at the next step boundary, so the
//! dump unwinds through its normal error path (registers restored, target detached).

use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Result};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
}

/// Installs the handlers (without SA_RESTART: a blocking wait returns EINTR and the caller
/// checks [`check`]).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The termination signal that arrived since [`install`], if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Fails if a termination signal arrived since [`install`].
pub fn check() -> Result<()> {
    let sig = RECEIVED.load(Ordering::SeqCst);
    if sig != 0 {
        bail!("interrupted by signal {sig}; the target was left running as before");
    }
    Ok(())
}
