//! The commands: each sequences the resource modules; nothing imports them but `main.rs`.

pub mod check;
pub mod dump;
pub mod migrate;
pub mod network_unlock;
pub mod page_server;
pub mod periodic;
pub mod pre_dump;
pub mod restore;
pub mod show;
pub mod tracker;
