//! Shared helpers for cr's integration tests and workloads.
