//! (being written)
pub mod dir;
pub mod show;
