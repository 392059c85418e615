//! The C structs whose bytes the loaders write and read, checked against the compiled objects'
//! BTF, like cilium's pkg/alignchecker: sizes, field offsets and field sizes; and the
//! constants they share (C enums: modes, events, counters), value by value and member by
//! member. Encoders run with
//! a distinct value per field and each value must sit at its field's BTF offset; decoders get a
//! zeroed struct with one field set at its BTF offset at a time and must read that field, and
//! only that field, as set. The objects are only opened (parsed), never loaded: no privileges.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::mem::offset_of;
use std::net::Ipv6Addr;

use libbpf_rs::btf::BtfType;
use libbpf_rs::btf::types::{DataSec, Enum, MemberAttr, Struct};
use libbpf_rs::{AsRawLibbpf as _, Btf, HasSize as _, libbpf_sys};

use crate::client_socket::{self, ClientKey, ReplyMode};
use crate::ring::cookie_and_kind;
use crate::sockmap::{self, RawDirection};
use crate::{Side, Target};

use crate::bpf::OBJECT as KILLER;
use crate::client_socket::OBJECT as CLIENT_SOCKET;
use crate::sockmap::OBJECT as SOCKMAP;

const BUILD_ERROR: &str = env!("TENDRIL_BPF_BUILD_ERROR");

/// A struct as the object's BTF describes it: size, and each field's byte offset and size.
struct CStruct {
    name: &'static str,
    size: usize,
    fields: BTreeMap<String, (usize, usize)>,
}

fn c_struct(btf: &Btf<'_>, name: &'static str) -> Result<CStruct, String> {
    // By kind: a map may have the struct's name (`forwarded`, `checker`).
    let s = btf
        .type_by_kind::<Struct<'_>>()
        .find(|s| s.name() == Some(OsStr::new(name)))
        .ok_or_else(|| format!("struct {name} is not in the BTF"))?;
    let mut fields = BTreeMap::new();
    for m in s.iter() {
        let field = m.name.map_or_else(
            || "(anonymous)".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let MemberAttr::Normal { offset: bits } = m.attr else {
            return Err(format!("{name}.{field} is a bitfield"));
        };
        // SAFETY: the BTF is live for the call; an unknown type id gives a negative errno.
        let size = unsafe {
            libbpf_sys::btf__resolve_size(btf.as_libbpf_object().as_ptr(), u32::from(m.ty))
        };
        if bits % 8 != 0 || size < 0 {
            return Err(format!("{name}.{field}: bit offset {bits}, size {size}"));
        }
        fields.insert(field, (bits as usize / 8, size as usize));
    }
    Ok(CStruct {
        name,
        size: s.size(),
        fields,
    })
}

fn find(btf: &Btf<'_>, name: &'static str, errors: &mut Vec<String>) -> Option<CStruct> {
    c_struct(btf, name).map_err(|e| errors.push(e)).ok()
}

/// Offset of global `var` in data section `section`.
fn var_offset(btf: &Btf<'_>, section: &str, var: &str) -> Option<usize> {
    let sec = btf
        .type_by_kind::<DataSec<'_>>()
        .find(|d| d.name() == Some(OsStr::new(section)))?;
    sec.iter()
        .find(|v| {
            btf.type_by_id::<BtfType<'_>>(v.ty).and_then(|t| t.name()) == Some(OsStr::new(var))
        })
        .map(|v| v.offset as usize)
}

/// The Rust side's own statement of a struct: size and (field, offset, size). `full`: every C
/// field must be there (a `#[repr(C)]` mirror).
fn check_declared(
    c: &CStruct,
    what: &str,
    size: usize,
    fields: &[(&str, usize, usize)],
    full: bool,
    errors: &mut Vec<String>,
) {
    if size != c.size {
        errors.push(format!(
            "{what}: {size} bytes, struct {} has {}",
            c.name, c.size
        ));
    }
    for &(field, offset, len) in fields {
        match c.fields.get(field) {
            None => errors.push(format!("{what}: has {field}, struct {} does not", c.name)),
            Some(&(o, l)) if (o, l) != (offset, len) => errors.push(format!(
                "{what}: {field} at byte {offset} ({len} bytes), struct {} has it at {o} ({l} bytes)",
                c.name
            )),
            Some(_) => {}
        }
    }
    if full {
        for field in c.fields.keys() {
            if !fields.iter().any(|f| f.0 == field.as_str()) {
                errors.push(format!("{what}: lacks {}.{field}", c.name));
            }
        }
    }
}

/// An encoder's output, made from a distinct value per field: its length is the C size and
/// each field's bytes sit at the field's BTF offset.
fn check_encoder(
    c: &CStruct,
    what: &str,
    encoded: &[u8],
    fields: &[(&str, Vec<u8>)],
    errors: &mut Vec<String>,
) {
    if encoded.len() != c.size {
        errors.push(format!(
            "{what}: writes {} bytes, struct {} has {}",
            encoded.len(),
            c.name,
            c.size
        ));
    }
    for (field, bytes) in fields {
        let Some(&(offset, size)) = c.fields.get(*field) else {
            errors.push(format!(
                "{what}: writes {field}, struct {} has no such field",
                c.name
            ));
            continue;
        };
        if size != bytes.len() {
            errors.push(format!(
                "{what}: writes {field} as {} bytes, struct {} has {size}",
                bytes.len(),
                c.name
            ));
        } else if encoded.get(offset..offset + size) != Some(bytes.as_slice()) {
            let at = encoded.windows(size).position(|w| w == bytes.as_slice());
            errors.push(format!(
                "{what}: {}.{field} is at byte {offset}, the Rust side writes it at {at:?}",
                c.name
            ));
        }
    }
}

/// Feeds `decode` a zeroed struct of the C size with one field set at its BTF offset, for each
/// field `decode` reports (to `fixed`'s value, else a value filling the field): `decode` must
/// read that field as set and every other as 0.
fn check_decoder(
    c: &CStruct,
    what: &str,
    fixed: &[(&str, u64)],
    decode: impl Fn(&[u8]) -> Vec<(&'static str, u64)>,
    errors: &mut Vec<String>,
) {
    let zero = vec![0u8; c.size];
    let fields = decode(&zero);
    if fields.is_empty() {
        errors.push(format!(
            "{what}: refuses a {}-byte struct {}",
            c.size, c.name
        ));
    }
    for &(field, _) in &fields {
        let Some(&(offset, size)) = c.fields.get(field) else {
            errors.push(format!(
                "{what}: reads {field}, struct {} has no such field",
                c.name
            ));
            continue;
        };
        let value = fixed
            .iter()
            .find(|f| f.0 == field)
            .map_or(0x1122_3344_5566_7788 >> (8 * (8 - size.min(8))), |f| f.1);
        let mut buf = zero.clone();
        buf[offset..offset + size].copy_from_slice(&ne(value, size));
        for (name, got) in decode(&buf) {
            let want = if name == field { value } else { 0 };
            if got != want {
                errors.push(format!(
                    "{what}: with only {}.{field} set (byte {offset}, {size} bytes) it reads \
                     {name} = {got:#x}, not {want:#x}",
                    c.name
                ));
            }
        }
    }
}

/// `value` in `size` bytes, native order.
fn ne(value: u64, size: usize) -> Vec<u8> {
    match size {
        1 => vec![value as u8],
        2 => (value as u16).to_ne_bytes().to_vec(),
        4 => (value as u32).to_ne_bytes().to_vec(),
        8 => value.to_ne_bytes().to_vec(),
        _ => panic!("no test value for a {size}-byte field"),
    }
}

/// `N` bytes counting up from `seed`: with seeds 0x10 apart no byte repeats across fields.
fn pat<const N: usize>(seed: u8) -> [u8; N] {
    std::array::from_fn(|i| seed + i as u8)
}
fn u64_pat(seed: u8) -> u64 {
    u64::from_ne_bytes(pat(seed))
}
fn u32_pat(seed: u8) -> u32 {
    u32::from_ne_bytes(pat(seed))
}

/// (field, offset, size) of each named field of a `#[repr(C)]` type.
macro_rules! mirror {
    ($t:ty: $($f:ident),+ $(,)?) => {{
        let v = <$t>::default();
        [$((stringify!($f), offset_of!($t, $f), size_of_val(&v.$f))),+]
    }};
}
/// (field, its native-order bytes) of each named field of `v`.
macro_rules! field_bytes {
    ($v:expr; $($f:ident),+ $(,)?) => { [$((stringify!($f), $v.$f.to_ne_bytes().to_vec())),+] };
}
/// (field, value as u64) of each named field of `v`.
macro_rules! project {
    ($v:expr; $($f:ident),+ $(,)?) => { vec![$((stringify!($f), u64::from($v.$f))),+] };
}

/// `struct event` (stats_events.h), read by ring::cookie_and_kind.
fn check_event(btf: &Btf<'_>, errors: &mut Vec<String>) {
    if let Some(c) = find(btf, "event", errors) {
        let decode = |b: &[u8]| match cookie_and_kind(b) {
            Some((cookie, kind)) => vec![("cookie", cookie), ("kind", u64::from(kind))],
            None => Vec::new(),
        };
        check_decoder(&c, "ring::cookie_and_kind", &[], decode, errors);
    }
}

fn sockmap_structs(btf: &Btf<'_>, errors: &mut Vec<String>) {
    check_event(btf, errors);
    if let Some(c) = find(btf, "direction", errors) {
        let mirror = mirror!(RawDirection: base, limit, redirected, passed, mode, pauses, peak,
            acked, next_seq, seq_known, trimmed, dropped);
        check_declared(
            &c,
            "RawDirection",
            size_of::<RawDirection>(),
            &mirror,
            true,
            errors,
        );
        let d = RawDirection {
            base: u64_pat(0x10),
            limit: u64_pat(0x20),
            redirected: u64_pat(0x30),
            passed: u64_pat(0x40),
            mode: u32_pat(0x50),
            pauses: u32_pat(0x60),
            peak: u64_pat(0x70),
            acked: u64_pat(0x80),
            next_seq: u32_pat(0x90),
            seq_known: u32_pat(0xa0),
            trimmed: u64_pat(0xb0),
            dropped: u64_pat(0xc0),
        };
        let fields = field_bytes!(d; base, limit, redirected, passed, mode, pauses, peak, acked,
            next_seq, seq_known, trimmed, dropped);
        check_encoder(&c, "RawDirection::bytes", &d.bytes(), &fields, errors);
        let decode = |b: &[u8]| {
            let Ok(raw) = b.try_into() else {
                return Vec::new();
            };
            let d = RawDirection::from_bytes(raw);
            project!(d; base, limit, redirected, passed, mode, pauses, peak, acked, next_seq,
                seq_known, trimmed, dropped)
        };
        check_decoder(&c, "RawDirection::from_bytes", &[], decode, errors);
    }
    if let Some(c) = find(btf, "forwarded", errors) {
        // Sockmap::join and set_forwarded write one u64.
        let what = "FORWARDED_SIZE";
        check_declared(
            &c,
            what,
            sockmap::FORWARDED_SIZE,
            &[("bytes", 0, 8)],
            true,
            errors,
        );
    }
}

fn client_socket_structs(btf: &Btf<'_>, errors: &mut Vec<String>) {
    check_event(btf, errors);
    let (client_ip, proxy_ip) = (
        Ipv6Addr::from(pat::<16>(0x20)),
        Ipv6Addr::from(pat::<16>(0x50)),
    );
    let (client_port, proxy_port) = (u16::from_ne_bytes(pat(0x40)), u16::from_ne_bytes(pat(0x70)));
    let key = ClientKey {
        netns: u64_pat(0x10),
        client: (client_ip, client_port).into(),
        proxy: (proxy_ip, proxy_port).into(),
    };
    if let Some(c) = find(btf, "client_key", errors) {
        let fields = [
            ("netns", key.netns.to_ne_bytes().to_vec()),
            ("client_ip", client_ip.octets().to_vec()),
            ("proxy_ip", proxy_ip.octets().to_vec()),
            ("client_port", u32::from(client_port).to_ne_bytes().to_vec()),
            ("proxy_port", u32::from(proxy_port).to_ne_bytes().to_vec()),
        ];
        check_encoder(&c, "ClientKey::bytes", &key.bytes(), &fields, errors);
    }
    if let Some(c) = find(btf, "route", errors) {
        let (server, client, from_client, to_server) =
            (u64_pat(0x10), u64_pat(0x20), u64_pat(0x30), u64_pat(0x40));
        let route = client_socket::route_bytes(server, client, from_client, to_server);
        let fields = [
            ("server", server.to_ne_bytes().to_vec()),
            ("client", client.to_ne_bytes().to_vec()),
            ("from_client", from_client.to_ne_bytes().to_vec()),
            ("to_server", to_server.to_ne_bytes().to_vec()),
        ];
        check_encoder(&c, "route_bytes", &route, &fields, errors);
    }
    if let Some(c) = find(btf, "reply", errors) {
        let server = u64_pat(0x80);
        let fields = [
            ("client", key.bytes().to_vec()),
            ("server", server.to_ne_bytes().to_vec()),
        ];
        check_encoder(
            &c,
            "reply_bytes",
            &client_socket::reply_bytes(&key, server),
            &fields,
            errors,
        );
        let decode = |b: &[u8]| {
            let Ok(raw) = b.try_into() else {
                return Vec::new();
            };
            let r = client_socket::decode_reply(raw);
            let mut out =
                project!(r; redirected, passed, allow, peak, direct, pauses, fin, delivered);
            let mode = match r.mode {
                ReplyMode::Kernel => client_socket::R_KERNEL,
                ReplyMode::Draining => client_socket::R_DRAINING,
                ReplyMode::User => client_socket::R_USER,
                ReplyMode::Failed => client_socket::R_FAILED,
            };
            out.push(("mode", u64::from(mode)));
            out
        };
        let fixed = [
            ("mode", u64::from(client_socket::R_USER)),
            ("fin", 1),
            ("delivered", 1),
        ];
        check_decoder(&c, "decode_reply", &fixed, decode, errors);
    }
    if let Some(c) = find(btf, "config", errors) {
        let (ip, port) = (
            Ipv6Addr::from(pat::<16>(0x20)),
            u16::from_ne_bytes(pat(0x40)),
        );
        let (tgid, send_limit, recv_limit) = (u32_pat(0x50), u64_pat(0x60), u64_pat(0x70));
        let read_only_port = u16::from_ne_bytes(pat(0x80));
        let config = client_socket::config_bytes(
            (ip, port).into(),
            read_only_port,
            tgid,
            send_limit,
            recv_limit,
        );
        let fields = [
            ("listen_ip", ip.octets().to_vec()),
            ("listen_port", u32::from(port).to_ne_bytes().to_vec()),
            ("proxy_tgid", tgid.to_ne_bytes().to_vec()),
            ("send_limit", send_limit.to_ne_bytes().to_vec()),
            ("recv_limit", recv_limit.to_ne_bytes().to_vec()),
            (
                "read_only_port",
                u32::from(read_only_port).to_ne_bytes().to_vec(),
            ),
        ];
        check_encoder(&c, "config_bytes", &config, &fields, errors);
        // ClientSocket::load writes the config at the start of the read-only data.
        let at = var_offset(btf, ".rodata", "cfg");
        if at != Some(0) {
            errors.push(format!(
                "cfg is at {at:?} in .rodata, ClientSocket::load writes it at 0"
            ));
        }
    }
    if let Some(c) = find(btf, "init_args", errors) {
        // init_checker passes an 8-byte context and reads the result as an i64.
        check_declared(&c, "init_checker", 8, &[("result", 0, 8)], true, errors);
    }
}

fn killer_structs(btf: &Btf<'_>, errors: &mut Vec<String>) {
    if let Some(c) = find(btf, "target", errors) {
        let (ip, port) = (
            Ipv6Addr::from(pat::<16>(0x20)),
            u16::from_ne_bytes(pat(0x40)),
        );
        let (key, _) = crate::bpf::key(&Target {
            addr: (ip, port).into(),
            side: Side::Remote,
        });
        let fields = [
            ("addr", ip.octets().to_vec()),
            ("port", port.to_ne_bytes().to_vec()),
        ];
        check_encoder(&c, "bpf::key", &key, &fields, errors);
    }
}

fn with_btf(
    object: &'static str,
    bytes: &'static [u8],
    errors: &mut Vec<String>,
    check: impl FnOnce(&Btf<'_>, &mut Vec<String>),
) {
    let mut found = Vec::new();
    match Btf::from_raw(object, bytes) {
        Ok(Some(btf)) => check(&btf, &mut found),
        Ok(None) => found.push("no BTF (built without -g?)".to_owned()),
        Err(e) => found.push(format!("cannot open: {e}")),
    }
    errors.extend(found.into_iter().map(|e| format!("{object}: {e}")));
}

/// Checks a loader's constants (`CONSTANTS`: C enum, then each member's name and value)
/// against the object's enums: each value, and that every member of each enum is there.
fn constants(
    table: &'static [(&'static str, &'static [(&'static str, u32)])],
) -> impl FnOnce(&Btf<'_>, &mut Vec<String>) {
    move |btf, errors| {
        for (name, rust) in table {
            let Some(e) = btf
                .type_by_kind::<Enum<'_>>()
                .find(|e| e.name() == Some(OsStr::new(name)))
            else {
                errors.push(format!("enum {name} is not in the BTF"));
                continue;
            };
            let c: BTreeMap<String, i64> = e
                .iter()
                .map(|m| {
                    let n = m
                        .name
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                    (n, m.value)
                })
                .collect();
            for (member, value) in *rust {
                match c.get(*member) {
                    Some(v) if *v == i64::from(*value) => {}
                    Some(v) => {
                        errors.push(format!("{name}: {member} is {v} in C, {value} in Rust"))
                    }
                    None => errors.push(format!("{name}: {member} is not in the C enum")),
                }
            }
            for member in c.keys() {
                if !rust.iter().any(|(m, _)| m == member) {
                    errors.push(format!("{name}: {member} has no Rust counterpart"));
                }
            }
        }
    }
}

/// A check of one object's BTF: it adds what differs to the list.
type Check = Box<dyn FnOnce(&Btf<'_>, &mut Vec<String>)>;

/// Runs one check per object and fails with every difference found.
fn check_objects(what: &str, checks: [(&'static str, &'static [u8], Check); 3]) {
    // Like the loaders' own tests, this needs the objects: `cargo xtask test` installs
    // what builds them.
    assert!(
        checks.iter().all(|(_, bytes, _)| !bytes.is_empty()),
        "the BPF objects were not built: {BUILD_ERROR}"
    );
    let mut errors = Vec::new();
    for (object, bytes, check) in checks {
        with_btf(object, bytes, &mut errors, check);
    }
    assert!(
        errors.is_empty(),
        "{what} and their Rust side differ:\n  {}",
        errors.join("\n  ")
    );
}

#[test]
fn shared_constants_match_the_rust_side() {
    check_objects(
        "BPF constants",
        [
            (
                "sockmap.bpf.o",
                SOCKMAP,
                Box::new(constants(sockmap::CONSTANTS)),
            ),
            (
                "client_socket.bpf.o",
                CLIENT_SOCKET,
                Box::new(constants(client_socket::CONSTANTS)),
            ),
            (
                "killer.bpf.o",
                KILLER,
                Box::new(constants(crate::bpf::CONSTANTS)),
            ),
        ],
    );
}

#[test]
fn c_structs_match_the_rust_side() {
    check_objects(
        "BPF structs",
        [
            ("sockmap.bpf.o", SOCKMAP, Box::new(sockmap_structs)),
            (
                "client_socket.bpf.o",
                CLIENT_SOCKET,
                Box::new(client_socket_structs),
            ),
            ("killer.bpf.o", KILLER, Box::new(killer_structs)),
        ],
    );
}
