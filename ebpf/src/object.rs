//! Opening and loading the kernel-forwarding objects, with the reasons the proxy logs when
//! a path is unavailable (not built, not permitted, refused by the kernel).

use libbpf_rs::{Object, ObjectBuilder, OpenObject};

use crate::Unavailable;

/// Opens an embedded object for `mechanism`; `build_error` says why an empty one is empty.
pub(crate) fn open(
    bytes: &'static [u8],
    build_error: &str,
    mechanism: &'static str,
) -> Result<OpenObject, Unavailable> {
    let unavailable = |reason: String| Unavailable { mechanism, reason };
    if bytes.is_empty() {
        return Err(unavailable(format!(
            "the BPF object was not built: {build_error}"
        )));
    }
    ObjectBuilder::default()
        .open_memory(bytes)
        .map_err(|e| unavailable(format!("cannot open the BPF object: {e}")))
}

/// Loads an opened object: the kernel verifies its programs here.
pub(crate) fn load(open: OpenObject, mechanism: &'static str) -> Result<Object, Unavailable> {
    open.load().map_err(|e| {
        let text = e.to_string();
        let reason = if text.contains("Operation not permitted") || text.contains("ermission") {
            format!("loading needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON ({text})")
        } else {
            format!("the kernel refused the programs: {text}")
        };
        Unavailable { mechanism, reason }
    })
}
