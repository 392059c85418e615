//! tendril-proxy: the data plane. A thread-per-core io_uring proxy on every application host
//! that sends each client to the current master, reads its routing table lock-free from an
//! etcd watch, and cuts every connection to a demoted master at once.
//!
//! The implementation lands with the Proxy issue.
