//! tendril-ebpf: the BPF programs (C sources under `ebpf/bpf/`) and their Rust loader: the
//! socket killer that destroys every host socket connected to a demoted master, and later the
//! sockmap forwarding path.
//!
//! The implementation lands with the eBPF issue.
