//! tendril-sentinel: several run, one is elected leader through the store, and the leader
//! computes the cluster view and writes it by compare-and-swap.
//!
//! [`decide`] is the brain: a pure function from the cluster data, the component reports, the
//! leader's timers and the time to the next cluster data (see [`decide`]'s module docs for the
//! steps). [`sentinel`] is the loop around it: campaign, read, decide, write guarded by the
//! leadership, so a sentinel that lost it cannot write.
#![forbid(unsafe_code)]

pub mod config;
pub mod decide;
pub mod sentinel;

pub use decide::{Decision, Memory, Now, Observations, decide};
