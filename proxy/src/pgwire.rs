//! The few PostgreSQL protocol messages the proxy understands, sans-IO: the first packet a
//! client sends (startup, SSL request, GSS encryption request, cancel request) and the
//! `ErrorResponse` it answers with when there is no master.
//!
//! The proxy parses only while it has no master to send the client to; with a master, bytes
//! are forwarded untouched and PostgreSQL does its own negotiation.

/// `SSLRequest` code.
const SSL_REQUEST: u32 = 80_877_103;
/// `GSSENCRequest` code.
const GSSENC_REQUEST: u32 = 80_877_104;
/// `CancelRequest` code.
const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.0.
const PROTOCOL_3: u32 = 196_608;
/// PostgreSQL refuses startup packets longer than this (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// A complete first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// The client asks for TLS. Only PostgreSQL answers it (`S` or `N`); the proxy holds it
    /// like a startup packet or refuses with an `ErrorResponse`.
    SslRequest,
    /// The client asks for GSS encryption; handled as [`FirstPacket::SslRequest`].
    GssEncRequest,
    /// Cancel a running query of another connection.
    CancelRequest {
        /// Backend process id.
        pid: u32,
        /// Secret key.
        key: u32,
    },
    /// A protocol 3 startup message.
    Startup {
        /// The parameters (`user`, `database`, `application_name`, ...).
        params: Vec<(String, String)>,
    },
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// Not a whole packet yet.
    NeedMore,
    /// A packet, and how many bytes it took.
    Done(FirstPacket, usize),
    /// Not PostgreSQL, or not a version we speak: say why and close.
    Invalid(String),
}

/// Parses the first packet from the start of `buf`.
pub fn parse_first_packet(buf: &[u8]) -> Parse {
    if buf.len() < 8 {
        // Reject an impossible length as soon as its four bytes are in.
        if buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if !(8..=MAX_STARTUP_PACKET).contains(&len) {
                return Parse::Invalid(format!("invalid startup packet length {len}"));
            }
        }
        return Parse::NeedMore;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Parse::Invalid(format!("invalid startup packet length {len}"));
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    match code {
        SSL_REQUEST | GSSENC_REQUEST if len != 8 => {
            return Parse::Invalid(format!("encryption request of length {len}"));
        }
        SSL_REQUEST => return Parse::Done(FirstPacket::SslRequest, 8),
        GSSENC_REQUEST => return Parse::Done(FirstPacket::GssEncRequest, 8),
        CANCEL_REQUEST if len != 16 => {
            return Parse::Invalid(format!("cancel request of length {len}"));
        }
        CANCEL_REQUEST | PROTOCOL_3 => {}
        other if other >> 16 == 3 => {}
        other => {
            return Parse::Invalid(format!(
                "unsupported frontend protocol {}.{}",
                other >> 16,
                other & 0xffff
            ));
        }
    }
    if buf.len() < len {
        return Parse::NeedMore;
    }
    let body = &buf[8..len];
    if code == CANCEL_REQUEST {
        let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let key = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
        return Parse::Done(FirstPacket::CancelRequest { pid, key }, len);
    }
    match parse_params(body) {
        Ok(params) => Parse::Done(FirstPacket::Startup { params }, len),
        Err(why) => Parse::Invalid(why),
    }
}

fn parse_params(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut params = Vec::new();
    let mut rest = body;
    loop {
        let Some(end) = rest.iter().position(|b| *b == 0) else {
            return Err("startup packet is not terminated".into());
        };
        if end == 0 {
            return Ok(params);
        }
        let name = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 1..];
        let Some(vend) = rest.iter().position(|b| *b == 0) else {
            return Err(format!("startup parameter {name:?} has no value"));
        };
        let value = String::from_utf8_lossy(&rest[..vend]).into_owned();
        rest = &rest[vend + 1..];
        params.push((name, value));
    }
}

/// An `ErrorResponse` message (severity FATAL) with `code` (SQLSTATE) and `message`.
pub fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut fields = Vec::with_capacity(64 + message.len());
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = Vec::with_capacity(fields.len() + 5);
    out.push(b'E');
    out.extend_from_slice(
        &u32::try_from(fields.len() + 4)
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&fields);
    out
}

/// SQLSTATE 57P03 `cannot_connect_now`: what PostgreSQL says while starting up, and what
/// clients and pools treat as "retry later".
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE 53300 `too_many_connections`.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// SQLSTATE 08006 `connection_failure`.
pub const CONNECTION_FAILURE: &str = "08006";
/// SQLSTATE 08P01 `protocol_violation`.
pub const PROTOCOL_VIOLATION: &str = "08P01";

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = u32::try_from(body.len() + 4)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(&body);
        out
    }

    fn packet(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut out = u32::try_from(8 + extra.len())
            .unwrap()
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(extra);
        out
    }

    /// Feeds `bytes` in pieces of `chunk` (0: all at once), as a socket would deliver them.
    fn feed(bytes: &[u8], chunk: usize) -> Parse {
        let mut buf = Vec::new();
        let step = if chunk == 0 {
            bytes.len().max(1)
        } else {
            chunk
        };
        for piece in bytes.chunks(step) {
            buf.extend_from_slice(piece);
            match parse_first_packet(&buf) {
                Parse::NeedMore => continue,
                done => return done,
            }
        }
        parse_first_packet(&buf)
    }

    fn fixtures() -> Vec<(Vec<u8>, Parse)> {
        let s = startup(&[
            ("user", "app"),
            ("database", "db"),
            ("application_name", "x y"),
        ]);
        let s_len = s.len();
        let mut cancel_extra = 1234u32.to_be_bytes().to_vec();
        cancel_extra.extend_from_slice(&5678u32.to_be_bytes());
        vec![
            (
                s,
                Parse::Done(
                    FirstPacket::Startup {
                        params: vec![
                            ("user".into(), "app".into()),
                            ("database".into(), "db".into()),
                            ("application_name".into(), "x y".into()),
                        ],
                    },
                    s_len,
                ),
            ),
            (
                packet(SSL_REQUEST, &[]),
                Parse::Done(FirstPacket::SslRequest, 8),
            ),
            (
                packet(GSSENC_REQUEST, &[]),
                Parse::Done(FirstPacket::GssEncRequest, 8),
            ),
            (
                packet(CANCEL_REQUEST, &cancel_extra),
                Parse::Done(
                    FirstPacket::CancelRequest {
                        pid: 1234,
                        key: 5678,
                    },
                    16,
                ),
            ),
        ]
    }

    #[test]
    fn fixtures_whole_byte_by_byte_and_in_odd_chunks() {
        for (bytes, expected) in fixtures() {
            for chunk in [0, 1, 2, 3, 5, 7, 13] {
                assert_eq!(feed(&bytes, chunk), expected, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_not_consumed() {
        let mut bytes = packet(SSL_REQUEST, &[]);
        bytes.extend_from_slice(&startup(&[("user", "u")]));
        assert_eq!(
            parse_first_packet(&bytes),
            Parse::Done(FirstPacket::SslRequest, 8)
        );
    }

    #[test]
    fn garbage_is_rejected_not_waited_for() {
        // HTTP on the PostgreSQL port: the length field is absurd.
        assert!(matches!(
            parse_first_packet(b"GET / HTTP/1.1\r\n"),
            Parse::Invalid(_)
        ));
        assert!(matches!(
            parse_first_packet(&[0, 0, 0, 2]),
            Parse::Invalid(_)
        ));
        assert!(matches!(parse_first_packet(&[0xff; 4]), Parse::Invalid(_)));
        assert!(matches!(
            parse_first_packet(&packet(2 << 16, &[0])),
            Parse::Invalid(_)
        ));
        assert!(matches!(
            parse_first_packet(&packet(SSL_REQUEST, &[1, 2])),
            Parse::Invalid(_)
        ));
        assert!(matches!(
            parse_first_packet(&packet(CANCEL_REQUEST, &[1])),
            Parse::Invalid(_)
        ));
        // Unterminated parameters.
        let mut bad = startup(&[("user", "u")]);
        let n = bad.len();
        bad[n - 1] = b'x';
        assert!(matches!(parse_first_packet(&bad), Parse::Invalid(_)));
        let mut no_value = PROTOCOL_3.to_be_bytes().to_vec();
        no_value.extend_from_slice(b"user\0");
        let mut p = u32::try_from(no_value.len() + 4)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        p.extend_from_slice(&no_value);
        assert!(matches!(parse_first_packet(&p), Parse::Invalid(_)));
    }

    #[test]
    fn short_input_needs_more() {
        assert_eq!(parse_first_packet(&[]), Parse::NeedMore);
        assert_eq!(parse_first_packet(&[0, 0, 0]), Parse::NeedMore);
        assert_eq!(parse_first_packet(&[0, 0, 0, 8, 4]), Parse::NeedMore);
    }

    #[test]
    fn error_response_is_well_formed() {
        let e = error_response("57P03", "no master");
        assert_eq!(e[0], b'E');
        let len = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert!(e.windows(6).any(|w| w == b"C57P03"));
        assert!(e.windows(10).any(|w| w == b"Mno master"));
        assert_eq!(&e[e.len() - 2..], &[0, 0]);
    }

    #[test]
    fn never_panics_on_random_input() {
        // A cheap deterministic fuzz pass; the cargo-fuzz target in proxy/fuzz goes further.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let mut bytes = Vec::with_capacity(len);
            let mut s = state;
            for _ in 0..len {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                bytes.push((s >> 56) as u8);
            }
            if len >= 8 && state.is_multiple_of(3) {
                // Make some inputs plausible so the deeper paths are reached.
                bytes[..4].copy_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
                bytes[4..8].copy_from_slice(&PROTOCOL_3.to_be_bytes());
            }
            let _ = parse_first_packet(&bytes);
        }
    }
}
