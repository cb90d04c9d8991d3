//! The probes of `cr check`: each uses one kernel feature for real ([`features`]), in
//! children that cannot outlive them ([`child`]).

pub mod child;
pub mod features;
