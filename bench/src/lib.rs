//! tendril-bench: pgbench-driven comparisons of tendril against direct PostgreSQL, HAProxy and
//! PgBouncer in the same run, failover timings, and criterion micro-benchmarks.
//!
//! The harness lands with the Proxy issue's benchmark.
#![forbid(unsafe_code)]
