//! Errors scripts must tell apart, each with its own exit status (see `main.rs` and README):
//! [`Refusal`] (3: cr will not dump or restore the target as it is) and [`BadInput`] (2: what
//! the command line names is not something cr can work on). Every other error is a plain
//! `anyhow::Error` (1).

use std::fmt;

/// What cannot be dumped or restored, and which flags would allow it (none: cr cannot, today).
/// The message names the thing and says the flag itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub allowed_by: Vec<&'static str>,
}

impl Refusal {
    /// A refusal no flag lifts.
    pub fn new(message: impl Into<String>) -> Refusal {
        Refusal {
            message: message.into(),
            allowed_by: Vec::new(),
        }
    }

    /// A refusal the flag `flag` lifts.
    pub fn unless(flag: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            message: message.into(),
            allowed_by: vec![flag],
        }
    }

    /// A refusal these flags lift (all of them may be needed).
    pub fn allowed_by(flags: &[&'static str], message: impl Into<String>) -> Refusal {
        Refusal {
            message: message.into(),
            allowed_by: flags.to_vec(),
        }
    }

    /// The refusal behind `e`, if it is one (through any context added on the way up).
    pub fn of(e: &anyhow::Error) -> Option<&Refusal> {
        e.chain().find_map(|c| c.downcast_ref::<Refusal>())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

/// The command line names something cr cannot work on: no such process, a thread id, cr
/// itself, a directory that is not an image (or already is one, for a dump), a pre-dump given
/// to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput(pub String);

impl BadInput {
    /// `e` as bad input (its whole message kept).
    pub fn wrap(e: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(BadInput(format!("{e:#}")))
    }

    /// The bad input behind `e`, if it is one.
    pub fn of(e: &anyhow::Error) -> Option<&BadInput> {
        e.chain().find_map(|c| c.downcast_ref::<BadInput>())
    }
}

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Returns early with a [`BadInput`]: `bad_input!("no process with PID {pid}")`.
#[macro_export]
macro_rules! bad_input {
    ($($fmt:tt)+) => {
        return Err($crate::refusal::BadInput(format!($($fmt)+)).into())
    };
}

/// Returns early with a [`Refusal`]: `refuse!("--shell-job", "PID {pid} has a terminal; …")`
/// (a flag that lifts it) or `refuse!(None, "…")` (nothing does).
#[macro_export]
macro_rules! refuse {
    (None, $($fmt:tt)+) => {
        return Err($crate::refusal::Refusal::new(format!($($fmt)+)).into())
    };
    ($flag:literal, $($fmt:tt)+) => {
        return Err($crate::refusal::Refusal::unless($flag, format!($($fmt)+)).into())
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn refused() -> anyhow::Result<()> {
        refuse!("--tcp-established", "the tree holds {} connection(s)", 2)
    }

    #[test]
    fn found_through_context() {
        let e = refused().context("dumping PID 7").unwrap_err();
        let r = Refusal::of(&e).expect("a refusal");
        assert_eq!(r.allowed_by, ["--tcp-established"]);
        assert_eq!(
            format!("{e:#}"),
            "dumping PID 7: the tree holds 2 connection(s)"
        );
        assert!(Refusal::of(&anyhow::anyhow!("plain")).is_none());
    }

    #[test]
    fn bad_input_keeps_the_message() {
        let e = BadInput::wrap(anyhow::anyhow!("no inventory").context("/x is not an image"));
        let e = e.context("restoring");
        assert!(BadInput::of(&e).is_some() && Refusal::of(&e).is_none());
        assert_eq!(
            format!("{e:#}"),
            "restoring: /x is not an image: no inventory"
        );
    }
}
