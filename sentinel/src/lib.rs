//! tendril-sentinel: several run, one is elected leader through the store, and the leader
//! computes the cluster view (master, followers, synchronous standbys, failover, proxy fencing)
//! with a pure `decide()` and writes it by compare-and-swap.
//!
//! The implementation lands with the Sentinel issue.
#![forbid(unsafe_code)]
