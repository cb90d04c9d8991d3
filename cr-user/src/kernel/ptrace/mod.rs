//! ptrace: seizing tasks, reading and writing their registers, and running syscalls inside them.
//!
//! - [`raw`]: the thin `unsafe` wrappers over ptrace(2)/waitpid(2).
//! - [`tracee`]: one traced thread, released (detached or killed) on every path.
//! - [`inject`]: remote syscalls through the vDSO's own `syscall` instruction.

pub mod inject;
pub mod raw;
pub mod tracee;

pub use inject::{Remote, Scratch};
pub use tracee::{SeizedState, Tracee};

/// Finds a `syscall` instruction in the mapping `[start, end)` of task `pid` (its vDSO).
pub fn locate_syscall(pid: i32, start: u64, end: u64) -> anyhow::Result<u64> {
    let mut code = vec![0u8; (end - start) as usize];
    inject::read_mem(pid, start, &mut code)?;
    inject::find_syscall_insn(&code, start).ok_or_else(|| {
        anyhow::anyhow!("no syscall instruction in the vDSO of task {pid} ({start:#x}-{end:#x})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn vdso_of(pid: i32) -> (u64, u64) {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let l = maps
            .lines()
            .find(|l| l.ends_with("[vdso]"))
            .expect("a vDSO");
        let r = l.split_whitespace().next().unwrap();
        let (a, b) = r.split_once('-').unwrap();
        (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        )
    }

    /// Seize a real process, run syscalls inside it, and let it go with its registers intact.
    #[test]
    fn remote_syscalls_leave_the_target_intact() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut t = Tracee::seize(pid, pid).unwrap();
        let before = t.regs().unwrap();
        let (vs, ve) = vdso_of(pid);
        let ip = locate_syscall(pid, vs, ve).unwrap();
        {
            let mut r = Remote::new(&mut t, ip).unwrap();
            assert_eq!(
                r.syscall("getpid", libc::SYS_getpid, &[]).unwrap(),
                pid as u64
            );
            let s = r.scratch(100).unwrap();
            r.write_mem(s.addr, b"hello").unwrap();
            let mut back = [0u8; 5];
            r.read_mem(s.addr, &mut back).unwrap();
            assert_eq!(&back, b"hello");
            // An error comes back as an error naming the call.
            let e = r
                .syscall("close(-1)", libc::SYS_close, &[u64::MAX])
                .unwrap_err();
            assert!(format!("{e:#}").contains("close(-1)"), "{e:#}");
            r.finish().unwrap();
        }
        let after = t.regs().unwrap();
        assert_eq!(
            (before.rip, before.rsp, before.rax, before.orig_rax),
            (after.rip, after.rsp, after.rax, after.orig_rax)
        );
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        t.detach().unwrap();
        // The scratch mapping is gone: the same number of mappings as a fresh look shows.
        assert_eq!(
            maps,
            std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
