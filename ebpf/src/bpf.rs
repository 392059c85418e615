//! The BPF mechanism: libbpf-rs loads `killer.bpf.o` (built by `bpf/build.sh`), the targets go
//! into its hash map, and each walk attaches the iterator and reads it to the end (reading is
//! what runs the program over every TCP socket of the namespace).

use std::io::Read;
use std::net::IpAddr;

use libbpf_rs::{MapCore, MapFlags, Object, ObjectBuilder};

use crate::{Counts, KillError, Side, Target, Unavailable};

/// The object file, empty when the build could not make it.
pub(crate) static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/killer.bpf.o"));
/// Why the object is empty.
const BUILD_ERROR: &str = env!("TENDRIL_BPF_BUILD_ERROR");

// The program's enum (killer.bpf.c), checked against its BTF by CONSTANTS's test.
const MATCH_REMOTE: u32 = 1;
const MATCH_LOCAL: u32 = 2;

/// Every constant shared with the program, by its C enum: the layout test
/// (`crate::layout`) checks each against the object's BTF, and that no member is missing.
#[cfg(test)]
pub(crate) const CONSTANTS: &[(&str, &[(&str, u32)])] = &[(
    "match_side",
    &[("MATCH_REMOTE", MATCH_REMOTE), ("MATCH_LOCAL", MATCH_LOCAL)],
)];

/// What a walk does with matching sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Destroy them.
    Destroy = 0,
    /// Only count them.
    Count = 1,
}

pub(crate) struct BpfKiller {
    object: Object,
}

impl std::fmt::Debug for BpfKiller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BpfKiller")
    }
}

fn unavailable(reason: impl Into<String>) -> Unavailable {
    Unavailable {
        mechanism: "BPF socket killer",
        reason: reason.into(),
    }
}

impl BpfKiller {
    pub(crate) fn load() -> Result<BpfKiller, Unavailable> {
        if OBJECT.is_empty() {
            return Err(unavailable(format!(
                "the BPF object was not built: {BUILD_ERROR}"
            )));
        }
        let open = ObjectBuilder::default()
            .open_memory(OBJECT)
            .map_err(|e| unavailable(format!("cannot open the BPF object: {e}")))?;
        let object = open.load().map_err(|e| {
            let text = e.to_string();
            if text.contains("Operation not permitted")
                || text.contains("EPERM")
                || text.contains("ermission")
            {
                unavailable(format!("loading needs CAP_BPF and CAP_PERFMON ({text})"))
            } else {
                unavailable(format!(
                    "cannot load the BPF program (kernel >= 6.5 with BTF needed): {text}"
                ))
            }
        })?;
        Ok(BpfKiller { object })
    }

    fn map(&self, name: &str) -> Result<libbpf_rs::Map<'_>, KillError> {
        self.object
            .maps()
            .find(|m| m.name() == name)
            .ok_or_else(|| KillError::Bpf(format!("map {name} missing from the object")))
    }

    pub(crate) fn walk(&mut self, targets: &[Target], mode: Mode) -> Result<Counts, KillError> {
        let bpf = |what: &str, e: libbpf_rs::Error| KillError::Bpf(format!("{what}: {e}"));
        let keys: Vec<([u8; 20], u32)> = targets.iter().map(key).collect();
        {
            let map = self.map("targets")?;
            for (k, flags) in &keys {
                // Two targets on the same address (local and remote) share a key.
                let merged = match map
                    .lookup(k, MapFlags::ANY)
                    .map_err(|e| bpf("lookup target", e))?
                {
                    Some(v) if v.len() == 4 => flags | u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
                    _ => *flags,
                };
                map.update(k, &merged.to_ne_bytes(), MapFlags::ANY)
                    .map_err(|e| bpf("insert target", e))?;
            }
            let stats = self.map("stats")?;
            for i in 0u32..4 {
                stats
                    .update(&i.to_ne_bytes(), &0u64.to_ne_bytes(), MapFlags::ANY)
                    .map_err(|e| bpf("reset stats", e))?;
            }
            let mode_map = self.map("mode")?;
            mode_map
                .update(
                    &0u32.to_ne_bytes(),
                    &(mode as u32).to_ne_bytes(),
                    MapFlags::ANY,
                )
                .map_err(|e| bpf("set mode", e))?;
        }
        let result = self.iterate();
        // Targets are per walk: never leave one behind for the next.
        if let Ok(map) = self.map("targets") {
            for (k, _) in &keys {
                let _ = map.delete(k);
            }
        }
        result?;
        let stats = self.map("stats")?;
        let read = |i: u32| -> Result<u64, KillError> {
            let v = stats
                .lookup(&i.to_ne_bytes(), MapFlags::ANY)
                .map_err(|e| bpf("read stats", e))?;
            Ok(v.filter(|v| v.len() == 8).map_or(0, |v| {
                u64::from_ne_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]])
            }))
        };
        Ok(Counts {
            scanned: read(0)?,
            matched: read(1)?,
            destroyed: read(2)?,
            errors: read(3)?,
        })
    }

    /// Runs the program over every TCP socket of the namespace (reading the iterator to its
    /// end is what runs it).
    fn iterate(&mut self) -> Result<(), KillError> {
        let program = self
            .object
            .progs_mut()
            .find(|p| p.name() == "kill_tcp")
            .ok_or_else(|| KillError::Bpf("program kill_tcp missing from the object".into()))?;
        // An iterator link is consumed by one walk; attaching again is cheap.
        let link = program
            .attach()
            .map_err(|e| KillError::Bpf(format!("attach iterator: {e}")))?;
        let mut iter = libbpf_rs::Iter::new(&link)
            .map_err(|e| KillError::Bpf(format!("create iterator: {e}")))?;
        let mut out = Vec::new();
        iter.read_to_end(&mut out)
            .map_err(|e| KillError::Bpf(format!("run iterator: {e}")))?;
        Ok(())
    }
}

/// The map key: 16 address bytes (IPv4 mapped to IPv6), the port in host order, padding;
/// and the match flags.
pub(crate) fn key(t: &Target) -> ([u8; 20], u32) {
    let mut k = [0u8; 20];
    let v6 = match t.addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    k[..16].copy_from_slice(&v6.octets());
    k[16..18].copy_from_slice(&t.addr.port().to_ne_bytes());
    let flags = match t.side {
        Side::Remote => MATCH_REMOTE,
        Side::Local => MATCH_LOCAL,
    };
    (k, flags)
}
