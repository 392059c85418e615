//! Test support for the sentinel: the scenario language.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support module"
)]
#![allow(clippy::unwrap_used, reason = "test support: a failed step panics")]

pub mod script;
