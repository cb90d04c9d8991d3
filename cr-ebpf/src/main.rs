//! cr's eBPF programs. They watch tracked processes from inside the kernel so that an
//! incremental checkpoint only touches what changed.
//!
//! Programs here are plain tracepoints: fentry/fexit and kprobes cannot load on the kernels cr
//! targets (sandbox policy), and tracepoints have a stable record layout that the user side
//! checks against tracefs before loading (see `cr-user/src/track/loader.rs`).
#![no_std]
#![no_main]

mod fault;
mod locks;
mod netlock;
mod probe;
mod sock;
mod sys;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves no panic path is reachable; this is never called.
    loop {}
}
