//! Opening and loading the kernel-forwarding objects, with the reasons the proxy logs when
//! a path is unavailable (not built, not permitted, refused by the kernel).

use std::os::fd::{AsFd, AsRawFd, RawFd};

use libbpf_rs::{MapCore, Object, ObjectBuilder, OpenObject};

use crate::{Inherited, Unavailable};

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

/// Whether a map of an object is one a taker shares: all but the object's own data
/// (`.rodata` and the like, named with a dot, as no map in C can be), which holds this
/// process's settings.
pub(crate) fn shared(name: &str) -> bool {
    !name.contains('.')
}

/// Has an opened object load with the maps of the same object in a running proxy: every
/// shared map must be among them, of the type and key and value sizes this object declares
/// (libbpf takes a reused map's definition from its descriptor without comparing; the
/// fingerprints the two processes compared are what vouch for the rest).
pub(crate) fn reuse(
    open: &mut OpenObject,
    inherited: &Inherited,
    mechanism: &'static str,
) -> Result<(), Unavailable> {
    let unavailable = |reason: String| Unavailable { mechanism, reason };
    for mut map in open.maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        if !shared(&name) {
            continue;
        }
        let (_, fd) = inherited
            .maps
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| unavailable(format!("map {name} was not handed over")))?;
        let info = libbpf_rs::MapInfo::new(fd.as_fd())
            .map_err(|e| unavailable(format!("inspect map {name}: {e}")))?;
        let theirs = (info.map_type(), info.info.key_size, info.info.value_size);
        let ours = (map.map_type(), map.key_size(), map.value_size());
        if theirs != ours {
            return Err(unavailable(format!(
                "map {name} handed over is {theirs:?} (type, key and value sizes), this object's is {ours:?}"
            )));
        }
        map.reuse_fd(fd.as_fd())
            .map_err(|e| unavailable(format!("reuse map {name}: {e}")))?;
    }
    Ok(())
}

/// The shared maps of a loaded object, by name ([`Inherited`] in the taker).
pub(crate) fn shared_maps(object: &Object) -> Vec<(String, RawFd)> {
    object
        .maps()
        .map(|m| {
            (
                m.name().to_string_lossy().into_owned(),
                m.as_fd().as_raw_fd(),
            )
        })
        .filter(|(name, _)| shared(name))
        .collect()
}

/// What a taker must load identically to share an object's maps: FNV-1a over `parts`
/// (stable across builds and Rust versions, unlike the standard hasher), in hex.
pub(crate) fn fingerprint(parts: &[&[u8]]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
