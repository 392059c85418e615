//! PostgreSQL log sequence numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A WAL position, printed and parsed the way PostgreSQL does: two hexadecimal halves of the
/// 64-bit value separated by a slash (`16/B374D848`). Stored in JSON in that same text form so
/// that an operator reading `tendrilctl clusterdata read` can paste it into a SQL query.
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hexadecimal numbers of at most 8 digits as X/Y")]
pub struct ParseLsnError {
    input: String,
}

impl Lsn {
    /// The invalid position PostgreSQL prints as `0/0`.
    pub const INVALID: Lsn = Lsn(0);

    /// How many bytes `self` is ahead of `other`, zero when it is behind.
    pub fn bytes_ahead_of(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }

    /// The name PostgreSQL gives the WAL segment holding this position on `timeline`, for a
    /// segment size in bytes (16 MiB by default).
    pub fn wal_file_name(self, timeline: u32, segment_size: u64) -> String {
        let segments_per_xlogid = 0x1_0000_0000 / segment_size;
        let segno = self.0 / segment_size;
        format!(
            "{timeline:08X}{:08X}{:08X}",
            segno / segments_per_xlogid,
            segno % segments_per_xlogid
        )
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError {
            input: s.to_owned(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(Lsn(0x0300_0060).to_string(), "0/3000060");
    }

    #[test]
    fn parses_what_postgres_prints() {
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/3000060".parse::<Lsn>(), Ok(Lsn(0x0300_0060)));
        assert_eq!("ffffffff/ffffffff".parse::<Lsn>(), Ok(Lsn(u64::MAX)));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "G/0",
            "123456789/0",
            "-1/0",
            " 1/0",
            "+1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn round_trips_through_text_and_json() {
        for v in [
            0,
            1,
            0xffff_ffff,
            0x1_0000_0000,
            0xdead_beef_0bad_f00d,
            u64::MAX,
        ] {
            let lsn = Lsn(v);
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
            let json = serde_json::to_string(&lsn).unwrap();
            assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), lsn);
        }
        assert_eq!(
            serde_json::to_string(&Lsn(0x16_B374_D848)).unwrap(),
            "\"16/B374D848\""
        );
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
        assert!(serde_json::from_str::<Lsn>("12").is_err());
    }

    #[test]
    fn orders_and_measures_lag() {
        let a: Lsn = "0/3000000".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.bytes_ahead_of(a), 0x1_0000_0000 - 0x300_0000);
        assert_eq!(a.bytes_ahead_of(b), 0);
    }

    #[test]
    fn names_wal_segments() {
        let seg = 16 * 1024 * 1024;
        assert_eq!(
            Lsn(0x0300_0060).wal_file_name(1, seg),
            "000000010000000000000003"
        );
        assert_eq!(
            Lsn(0x1_0500_0000).wal_file_name(2, seg),
            "000000020000000100000005"
        );
    }
}
