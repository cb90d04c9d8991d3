//! Workload: CPU state held in registers across a checkpoint.
//!
//! Usage: wl_cpu regs | rseq
//!
//! `regs`: loads known values into every general register but rsp (rsp is checked by the
//! routine returning at all), the direction flag, zmm0-31 (so xmm, the ymm upper halves and the
//! AVX-512 state), the opmask registers k0-k7, the eight x87 stack registers, the x87 control
//! word and MXCSR; then spins in user mode on a flag that only the SIGUSR1 handler sets, without
//! touching any of them. The harness dumps while it spins. After the flag is seen everything is
//! stored and compared. The kernel saves and restores the whole register state around the
//! handler (signal frame), so the handler itself cannot disturb the values.
//!
//! The "READY" line is written from inside the routine, after the vector/x87 state is loaded, and
//! the ready pipe is closed only after the general registers are loaded: when the harness sees
//! EOF, every value but rax/rcx/rdi/r11 (set by or for the `close` syscall, reloaded right after
//! it) is already in its register, so whatever instant the dump picks, it sees them there.
//!
//! Also checked (both modes): a `thread_local!` value and the fs base (TLS), a gs base set with
//! arch_prctl and read back through a gs-relative load, and a floating-point computation.
//!
//! `rseq`: spins inside an rseq critical section registered with glibc's rseq area. A checkpoint
//! in the middle of the section must resume at its abort handler (the restored task cannot know
//! whether it was preempted or migrated): the workload fails if the section "commits" across the
//! checkpoint. In an undisturbed run only SIGUSR1 ends the section, and a signal always aborts it.

use std::arch::global_asm;
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use cr_tests::workload::Checker;

/// Set by the SIGUSR1 handler; read by the spin loops with a plain `cmp` from memory.
static GO: AtomicU8 = AtomicU8::new(0);

#[repr(C, align(64))]
struct Zmm([u8; 32 * 64]);

/// Memory the assembly reads or writes by symbol.
#[repr(transparent)]
struct AsmCell<T>(UnsafeCell<T>);

// SAFETY: the workload is single-threaded, and the assembly and the Rust code touching these
// never run at the same time.
unsafe impl<T> Sync for AsmCell<T> {}

impl<T: Copy> AsmCell<T> {
    const fn new(v: T) -> AsmCell<T> {
        AsmCell(UnsafeCell::new(v))
    }
    fn set(&self, v: T) {
        // SAFETY: see the Sync impl: no concurrent access.
        unsafe { *self.0.get() = v }
    }
    fn get(&self) -> T {
        // SAFETY: as above.
        unsafe { *self.0.get() }
    }
}

impl Clone for Zmm {
    fn clone(&self) -> Zmm {
        *self
    }
}
impl Copy for Zmm {}

static ZMM_IN: AsmCell<Zmm> = AsmCell::new(Zmm([0; 32 * 64]));
static ZMM_OUT: AsmCell<Zmm> = AsmCell::new(Zmm([0; 32 * 64]));
static K_IN: AsmCell<[u64; 8]> = AsmCell::new([0; 8]);
static K_OUT: AsmCell<[u64; 8]> = AsmCell::new([0; 8]);
/// rax, rbx, rcx, rdx, rsi, rdi, rbp, r8..r15.
static GP_IN: AsmCell<[u64; 15]> = AsmCell::new([0; 15]);
static GP_OUT: AsmCell<[u64; 15]> = AsmCell::new([0; 15]);
static ST_IN: AsmCell<[i64; 8]> = AsmCell::new([0; 8]);
static ST_OUT: AsmCell<[i64; 8]> = AsmCell::new([0; 8]);
static FLAGS_OUT: AsmCell<u64> = AsmCell::new(0);
/// x87 control word: round up, 53-bit precision, all exceptions masked.
static FCW_IN: u16 = 0x0A7F;
static FCW_OUT: AsmCell<u16> = AsmCell::new(0);
static FCW_DEFAULT: u16 = 0x037F;
/// MXCSR: flush-to-zero, round toward zero, denormals-are-zero, all exceptions masked.
static MXCSR_IN: u32 = 0xFFC0;
static MXCSR_OUT: AsmCell<u32> = AsmCell::new(0);
static MXCSR_DEFAULT: u32 = 0x1F80;
static READY_MSG: [u8; 6] = *b"READY\n";

/// Number of times the rseq critical section was aborted (by preemption, migration, a signal or
/// a restore).
static RSEQ_ABORTS: AtomicU64 = AtomicU64::new(0);

global_asm!(
    ".pushsection .text.cr_spin_regs, \"ax\"",
    ".globl cr_spin_regs",
    ".type cr_spin_regs, @function",
    "cr_spin_regs:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "fldcw word ptr [rip + {fcw_in}]",
    "ldmxcsr dword ptr [rip + {mxcsr_in}]",
    "fild qword ptr [rip + {st_in}]",
    "fild qword ptr [rip + {st_in} + 8]",
    "fild qword ptr [rip + {st_in} + 16]",
    "fild qword ptr [rip + {st_in} + 24]",
    "fild qword ptr [rip + {st_in} + 32]",
    "fild qword ptr [rip + {st_in} + 40]",
    "fild qword ptr [rip + {st_in} + 48]",
    "fild qword ptr [rip + {st_in} + 56]",
    "vmovdqu64 zmm0, [rip + {zmm_in} + 0*64]",
    "vmovdqu64 zmm1, [rip + {zmm_in} + 1*64]",
    "vmovdqu64 zmm2, [rip + {zmm_in} + 2*64]",
    "vmovdqu64 zmm3, [rip + {zmm_in} + 3*64]",
    "vmovdqu64 zmm4, [rip + {zmm_in} + 4*64]",
    "vmovdqu64 zmm5, [rip + {zmm_in} + 5*64]",
    "vmovdqu64 zmm6, [rip + {zmm_in} + 6*64]",
    "vmovdqu64 zmm7, [rip + {zmm_in} + 7*64]",
    "vmovdqu64 zmm8, [rip + {zmm_in} + 8*64]",
    "vmovdqu64 zmm9, [rip + {zmm_in} + 9*64]",
    "vmovdqu64 zmm10, [rip + {zmm_in} + 10*64]",
    "vmovdqu64 zmm11, [rip + {zmm_in} + 11*64]",
    "vmovdqu64 zmm12, [rip + {zmm_in} + 12*64]",
    "vmovdqu64 zmm13, [rip + {zmm_in} + 13*64]",
    "vmovdqu64 zmm14, [rip + {zmm_in} + 14*64]",
    "vmovdqu64 zmm15, [rip + {zmm_in} + 15*64]",
    "vmovdqu64 zmm16, [rip + {zmm_in} + 16*64]",
    "vmovdqu64 zmm17, [rip + {zmm_in} + 17*64]",
    "vmovdqu64 zmm18, [rip + {zmm_in} + 18*64]",
    "vmovdqu64 zmm19, [rip + {zmm_in} + 19*64]",
    "vmovdqu64 zmm20, [rip + {zmm_in} + 20*64]",
    "vmovdqu64 zmm21, [rip + {zmm_in} + 21*64]",
    "vmovdqu64 zmm22, [rip + {zmm_in} + 22*64]",
    "vmovdqu64 zmm23, [rip + {zmm_in} + 23*64]",
    "vmovdqu64 zmm24, [rip + {zmm_in} + 24*64]",
    "vmovdqu64 zmm25, [rip + {zmm_in} + 25*64]",
    "vmovdqu64 zmm26, [rip + {zmm_in} + 26*64]",
    "vmovdqu64 zmm27, [rip + {zmm_in} + 27*64]",
    "vmovdqu64 zmm28, [rip + {zmm_in} + 28*64]",
    "vmovdqu64 zmm29, [rip + {zmm_in} + 29*64]",
    "vmovdqu64 zmm30, [rip + {zmm_in} + 30*64]",
    "vmovdqu64 zmm31, [rip + {zmm_in} + 31*64]",
    "kmovq k0, qword ptr [rip + {k_in} + 0]",
    "kmovq k1, qword ptr [rip + {k_in} + 8]",
    "kmovq k2, qword ptr [rip + {k_in} + 16]",
    "kmovq k3, qword ptr [rip + {k_in} + 24]",
    "kmovq k4, qword ptr [rip + {k_in} + 32]",
    "kmovq k5, qword ptr [rip + {k_in} + 40]",
    "kmovq k6, qword ptr [rip + {k_in} + 48]",
    "kmovq k7, qword ptr [rip + {k_in} + 56]",
    // write(3, "READY\n", 6)
    "mov eax, 1",
    "mov edi, 3",
    "lea rsi, [rip + {ready}]",
    "mov edx, 6",
    "syscall",
    // Every general register the close syscall leaves alone gets its value now.
    "mov rbx, [rip + {gp_in} + 1*8]",
    "mov rdx, [rip + {gp_in} + 3*8]",
    "mov rsi, [rip + {gp_in} + 4*8]",
    "mov rbp, [rip + {gp_in} + 6*8]",
    "mov r8, [rip + {gp_in} + 7*8]",
    "mov r9, [rip + {gp_in} + 8*8]",
    "mov r10, [rip + {gp_in} + 9*8]",
    "mov r12, [rip + {gp_in} + 11*8]",
    "mov r13, [rip + {gp_in} + 12*8]",
    "mov r14, [rip + {gp_in} + 13*8]",
    "mov r15, [rip + {gp_in} + 14*8]",
    "std",
    // close(3): the harness's read of the ready pipe returns EOF.
    "mov eax, 3",
    "mov edi, 3",
    "syscall",
    "mov rax, [rip + {gp_in} + 0*8]",
    "mov rcx, [rip + {gp_in} + 2*8]",
    "mov rdi, [rip + {gp_in} + 5*8]",
    "mov r11, [rip + {gp_in} + 10*8]",
    "2:",
    "cmp byte ptr [rip + {go}], 0",
    "je 2b",
    "mov [rip + {gp_out} + 0*8], rax",
    "mov [rip + {gp_out} + 1*8], rbx",
    "mov [rip + {gp_out} + 2*8], rcx",
    "mov [rip + {gp_out} + 3*8], rdx",
    "mov [rip + {gp_out} + 4*8], rsi",
    "mov [rip + {gp_out} + 5*8], rdi",
    "mov [rip + {gp_out} + 6*8], rbp",
    "mov [rip + {gp_out} + 7*8], r8",
    "mov [rip + {gp_out} + 8*8], r9",
    "mov [rip + {gp_out} + 9*8], r10",
    "mov [rip + {gp_out} + 10*8], r11",
    "mov [rip + {gp_out} + 11*8], r12",
    "mov [rip + {gp_out} + 12*8], r13",
    "mov [rip + {gp_out} + 13*8], r14",
    "mov [rip + {gp_out} + 14*8], r15",
    "pushfq",
    "pop rax",
    "mov [rip + {flags_out}], rax",
    "cld",
    "vmovdqu64 [rip + {zmm_out} + 0*64], zmm0",
    "vmovdqu64 [rip + {zmm_out} + 1*64], zmm1",
    "vmovdqu64 [rip + {zmm_out} + 2*64], zmm2",
    "vmovdqu64 [rip + {zmm_out} + 3*64], zmm3",
    "vmovdqu64 [rip + {zmm_out} + 4*64], zmm4",
    "vmovdqu64 [rip + {zmm_out} + 5*64], zmm5",
    "vmovdqu64 [rip + {zmm_out} + 6*64], zmm6",
    "vmovdqu64 [rip + {zmm_out} + 7*64], zmm7",
    "vmovdqu64 [rip + {zmm_out} + 8*64], zmm8",
    "vmovdqu64 [rip + {zmm_out} + 9*64], zmm9",
    "vmovdqu64 [rip + {zmm_out} + 10*64], zmm10",
    "vmovdqu64 [rip + {zmm_out} + 11*64], zmm11",
    "vmovdqu64 [rip + {zmm_out} + 12*64], zmm12",
    "vmovdqu64 [rip + {zmm_out} + 13*64], zmm13",
    "vmovdqu64 [rip + {zmm_out} + 14*64], zmm14",
    "vmovdqu64 [rip + {zmm_out} + 15*64], zmm15",
    "vmovdqu64 [rip + {zmm_out} + 16*64], zmm16",
    "vmovdqu64 [rip + {zmm_out} + 17*64], zmm17",
    "vmovdqu64 [rip + {zmm_out} + 18*64], zmm18",
    "vmovdqu64 [rip + {zmm_out} + 19*64], zmm19",
    "vmovdqu64 [rip + {zmm_out} + 20*64], zmm20",
    "vmovdqu64 [rip + {zmm_out} + 21*64], zmm21",
    "vmovdqu64 [rip + {zmm_out} + 22*64], zmm22",
    "vmovdqu64 [rip + {zmm_out} + 23*64], zmm23",
    "vmovdqu64 [rip + {zmm_out} + 24*64], zmm24",
    "vmovdqu64 [rip + {zmm_out} + 25*64], zmm25",
    "vmovdqu64 [rip + {zmm_out} + 26*64], zmm26",
    "vmovdqu64 [rip + {zmm_out} + 27*64], zmm27",
    "vmovdqu64 [rip + {zmm_out} + 28*64], zmm28",
    "vmovdqu64 [rip + {zmm_out} + 29*64], zmm29",
    "vmovdqu64 [rip + {zmm_out} + 30*64], zmm30",
    "vmovdqu64 [rip + {zmm_out} + 31*64], zmm31",
    "kmovq qword ptr [rip + {k_out} + 0], k0",
    "kmovq qword ptr [rip + {k_out} + 8], k1",
    "kmovq qword ptr [rip + {k_out} + 16], k2",
    "kmovq qword ptr [rip + {k_out} + 24], k3",
    "kmovq qword ptr [rip + {k_out} + 32], k4",
    "kmovq qword ptr [rip + {k_out} + 40], k5",
    "kmovq qword ptr [rip + {k_out} + 48], k6",
    "kmovq qword ptr [rip + {k_out} + 56], k7",
    // The x87 stack pops in reverse: ST_OUT[0] is the last value loaded.
    "fistp qword ptr [rip + {st_out} + 0]",
    "fistp qword ptr [rip + {st_out} + 8]",
    "fistp qword ptr [rip + {st_out} + 16]",
    "fistp qword ptr [rip + {st_out} + 24]",
    "fistp qword ptr [rip + {st_out} + 32]",
    "fistp qword ptr [rip + {st_out} + 40]",
    "fistp qword ptr [rip + {st_out} + 48]",
    "fistp qword ptr [rip + {st_out} + 56]",
    "fnstcw word ptr [rip + {fcw_out}]",
    "stmxcsr dword ptr [rip + {mxcsr_out}]",
    "fldcw word ptr [rip + {fcw_default}]",
    "ldmxcsr dword ptr [rip + {mxcsr_default}]",
    // Leave the AVX-512 state clean for the compiled code that follows.
    "vpxorq zmm16, zmm16, zmm16",
    "vpxorq zmm17, zmm17, zmm17",
    "vpxorq zmm18, zmm18, zmm18",
    "vpxorq zmm19, zmm19, zmm19",
    "vpxorq zmm20, zmm20, zmm20",
    "vpxorq zmm21, zmm21, zmm21",
    "vpxorq zmm22, zmm22, zmm22",
    "vpxorq zmm23, zmm23, zmm23",
    "vpxorq zmm24, zmm24, zmm24",
    "vpxorq zmm25, zmm25, zmm25",
    "vpxorq zmm26, zmm26, zmm26",
    "vpxorq zmm27, zmm27, zmm27",
    "vpxorq zmm28, zmm28, zmm28",
    "vpxorq zmm29, zmm29, zmm29",
    "vpxorq zmm30, zmm30, zmm30",
    "vpxorq zmm31, zmm31, zmm31",
    "vzeroupper",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".size cr_spin_regs, . - cr_spin_regs",
    ".popsection",
    fcw_in = sym FCW_IN,
    fcw_out = sym FCW_OUT,
    fcw_default = sym FCW_DEFAULT,
    mxcsr_in = sym MXCSR_IN,
    mxcsr_out = sym MXCSR_OUT,
    mxcsr_default = sym MXCSR_DEFAULT,
    st_in = sym ST_IN,
    st_out = sym ST_OUT,
    zmm_in = sym ZMM_IN,
    zmm_out = sym ZMM_OUT,
    k_in = sym K_IN,
    k_out = sym K_OUT,
    gp_in = sym GP_IN,
    gp_out = sym GP_OUT,
    flags_out = sym FLAGS_OUT,
    ready = sym READY_MSG,
    go = sym GO,
);

// cr_rseq_spin(area: *mut struct rseq) -> 1 (left through the commit path) | 2 (aborted, GO set).
// The critical section is the spin loop [start, post_commit); its descriptor must be 32-byte
// aligned and the abort handler preceded by the signature glibc registered (0x53053053).
global_asm!(
    ".pushsection .data.cr_rseq_cs, \"aw\"",
    ".balign 32",
    ".globl cr_rseq_cs_desc",
    "cr_rseq_cs_desc:",
    ".Lcr_rseq_cs:",
    ".long 0",
    ".long 0",
    ".quad .Lcr_rseq_start",
    ".quad .Lcr_rseq_post - .Lcr_rseq_start",
    ".quad .Lcr_rseq_abort",
    ".popsection",
    ".pushsection .text.cr_rseq_spin, \"ax\"",
    ".globl cr_rseq_spin",
    ".type cr_rseq_spin, @function",
    "cr_rseq_spin:",
    "lea rax, [rip + .Lcr_rseq_cs]",
    ".Lcr_rseq_arm:",
    "mov [rdi + 8], rax",
    ".Lcr_rseq_start:",
    "cmp byte ptr [rip + {go}], 0",
    "je .Lcr_rseq_start",
    ".Lcr_rseq_post:",
    "mov qword ptr [rdi + 8], 0",
    "mov eax, 1",
    "ret",
    ".long 0x53053053",
    ".Lcr_rseq_abort:",
    "cmp byte ptr [rip + {go}], 0",
    "jne 3f",
    "lock inc qword ptr [rip + {aborts}]",
    "lea rax, [rip + .Lcr_rseq_cs]",
    "jmp .Lcr_rseq_arm",
    "3:",
    "lock inc qword ptr [rip + {aborts}]",
    "mov qword ptr [rdi + 8], 0",
    "mov eax, 2",
    "ret",
    ".size cr_rseq_spin, . - cr_rseq_spin",
    ".popsection",
    go = sym GO,
    aborts = sym RSEQ_ABORTS,
);

extern "C" {
    fn cr_spin_regs();
    fn cr_rseq_spin(area: *mut u8) -> u64;
    /// glibc (2.35+): offset of this thread's rseq area from the thread pointer, and its size
    /// (0 when glibc did not register rseq).
    static __rseq_offset: isize;
    static __rseq_size: u32;
    /// The critical section's descriptor: {version, flags} as one word, start_ip,
    /// post_commit_offset, abort_ip.
    static cr_rseq_cs_desc: [u64; 4];
}

const ARCH_SET_GS: i32 = 0x1001;
const ARCH_GET_FS: i32 = 0x1003;
const ARCH_GET_GS: i32 = 0x1004;

thread_local! {
    static TLS_VALUE: Cell<u64> = const { Cell::new(0) };
}

/// What gs:[0] must read after the checkpoint (gs base points here).
static GS_DATA: [u64; 2] = [0x6A5E_0000_C0DE_F00D, 0];

extern "C" fn on_usr1(_: libc::c_int) {
    GO.store(1, Ordering::SeqCst);
}

fn install_go_handler() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
}

fn arch_prctl_get(code: i32) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: ARCH_GET_FS/GS write one u64 to the pointer.
    unsafe { libc::syscall(libc::SYS_arch_prctl, code, &mut v as *mut u64) };
    v
}

fn zmm_pattern(reg: usize, byte: usize) -> u8 {
    ((reg * 64 + byte) as u32)
        .wrapping_mul(0x9E37_79B1)
        .rotate_right(13) as u8
        ^ 0x5A
}

fn setup_common() -> (u64, u64) {
    TLS_VALUE.with(|v| v.set(0x7115_7115_0000_0001));
    // SAFETY: ARCH_SET_GS with the address of a static; glibc does not use gs.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, GS_DATA.as_ptr()) };
    assert_eq!(r, 0, "arch_prctl(ARCH_SET_GS)");
    (arch_prctl_get(ARCH_GET_FS), arch_prctl_get(ARCH_GET_GS))
}

fn check_common(c: &mut Checker, fs: u64, gs: u64) {
    c.eq(
        TLS_VALUE.with(|v| v.get()),
        0x7115_7115_0000_0001,
        "thread_local value",
    );
    c.eq(arch_prctl_get(ARCH_GET_FS), fs, "fs base");
    c.eq(arch_prctl_get(ARCH_GET_GS), gs, "gs base");
    let via_gs: u64;
    // SAFETY: gs base points at GS_DATA (checked above to be unchanged).
    unsafe { std::arch::asm!("mov {}, gs:[0]", out(reg) via_gs, options(nostack, readonly)) };
    c.eq(via_gs, GS_DATA[0], "load through gs");
    let x = std::hint::black_box(1.0f64) / std::hint::black_box(3.0f64);
    c.check(
        (x * 3.0 - 1.0).abs() < 1e-15,
        format!("floating point after restore: {x}"),
    );
}

fn regs_mode(c: &mut Checker) {
    let mut zin = Zmm([0; 32 * 64]);
    for r in 0..32 {
        for b in 0..64 {
            zin.0[r * 64 + b] = zmm_pattern(r, b);
        }
    }
    ZMM_IN.set(zin);
    let mut kin = [0u64; 8];
    for (i, k) in kin.iter_mut().enumerate() {
        *k = 0x0123_4567_89AB_CDEFu64.rotate_left(8 * i as u32) ^ (i as u64 + 1);
    }
    K_IN.set(kin);
    let mut gin = [0u64; 15];
    for (i, g) in gin.iter_mut().enumerate() {
        *g = 0xC0DE_0000_0000_0000 | (i as u64) << 40 | 0x1111_1111u64.wrapping_mul(i as u64 + 1);
    }
    GP_IN.set(gin);
    let mut sin = [0i64; 8];
    for (i, s) in sin.iter_mut().enumerate() {
        *s = (i as i64 + 1) * 1_000_000_007 - 3;
    }
    ST_IN.set(sin);
    let (fs, gs) = setup_common();
    install_go_handler();
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    // SAFETY: the routine saves and restores every callee-saved register, leaves rsp balanced,
    // DF clear and the control words at their defaults; it writes only the *_OUT statics.
    unsafe { cr_spin_regs() };

    let zout = ZMM_OUT.get();
    for r in 0..32 {
        let (a, b) = (&zin.0[r * 64..r * 64 + 64], &zout.0[r * 64..r * 64 + 64]);
        if a != b {
            let first = (0..64).find(|&i| a[i] != b[i]).unwrap_or(0);
            c.check(
                false,
                format!(
                    "zmm{r}: byte {first} is {:#04x}, want {:#04x}",
                    b[first], a[first]
                ),
            );
        }
    }
    let kout = K_OUT.get();
    for i in 0..8 {
        c.eq(kout[i], kin[i], &format!("k{i}"));
    }
    const NAMES: [&str; 15] = [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15",
    ];
    let gout = GP_OUT.get();
    for i in 0..15 {
        c.eq(gout[i], gin[i], NAMES[i]);
    }
    let sout = ST_OUT.get();
    for i in 0..8 {
        c.eq(sout[i], sin[7 - i], &format!("st({i})"));
    }
    let flags = FLAGS_OUT.get();
    c.check(
        flags & 0x400 != 0,
        format!("direction flag lost (rflags {flags:#x})"),
    );
    c.eq(FCW_OUT.get(), FCW_IN, "x87 control word");
    c.eq(MXCSR_OUT.get(), MXCSR_IN, "MXCSR");
    check_common(c, fs, gs);
}

fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: fs:0 holds the thread pointer itself on x86_64 (TCB self-pointer).
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly)) };
    tp
}

fn rseq_mode(c: &mut Checker) {
    // SAFETY: glibc's exported constants, set before main.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        c.check(
            false,
            "glibc did not register rseq (GLIBC_TUNABLES=glibc.pthread.rseq=0?)",
        );
        return;
    }
    let area = (thread_pointer() as isize + off) as *mut u8;
    let (fs, gs) = setup_common();
    install_go_handler();
    // SAFETY: a static descriptor, relocated at load time.
    let d = unsafe { cr_rseq_cs_desc };
    // Tell the harness where the section is, so it can check where the dump left the task.
    cr_tests::workload::ready(&format!("{:#x} {:#x} {:#x}", d[1], d[1] + d[2], d[3]));
    // SAFETY: area is this thread's registered rseq area; the routine writes only its rseq_cs.
    let how = unsafe { cr_rseq_spin(area) };
    c.eq(
        how,
        2,
        "how the rseq critical section ended (2: abort handler, 1: commit path)",
    );
    c.check(
        RSEQ_ABORTS.load(Ordering::SeqCst) >= 1,
        "the abort handler never ran",
    );
    // SAFETY: reading the cpu_id field (offset 4) of our own rseq area.
    let cpu_id = unsafe { std::ptr::read_volatile(area.add(4) as *const u32) };
    // SAFETY: plain sched_getcpu.
    let cpu = unsafe { libc::sched_getcpu() };
    c.check(
        cpu >= 0 && cpu_id as i32 >= 0,
        format!("rseq cpu_id {cpu_id}, sched_getcpu {cpu}"),
    );
    check_common(c, fs, gs);
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let mut c = Checker::new();
    match mode.as_str() {
        "regs" => regs_mode(&mut c),
        "rseq" => rseq_mode(&mut c),
        _ => c.check(false, format!("unknown mode {mode:?} (regs | rseq)")),
    }
    c.report();
}
