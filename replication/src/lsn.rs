//! Log sequence numbers.
//!
//! An [`Lsn`] is a byte position in the write-ahead log of one PostgreSQL
//! server. PostgreSQL prints it as two hexadecimal halves separated by a
//! slash (`16/B374D848`): the high and low 32 bits of a 64-bit integer.
//! Positions of different servers are not comparable; the type does not
//! know which server an LSN belongs to, so keep them apart by name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A position in a server's write-ahead log.
///
/// The field is private on purpose: an LSN is not a number to do arithmetic
/// on, only a position to compare, print and measure distances between.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(u64);

impl Lsn {
    /// `0/0`, the invalid position PostgreSQL uses for "none".
    pub const ZERO: Lsn = Lsn(0);

    /// Wraps the 64-bit integer form, as carried by the replication protocol.
    pub const fn from_u64(value: u64) -> Lsn {
        Lsn(value)
    }

    /// The 64-bit integer form, as carried by the replication protocol.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Whether this is `0/0`.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Bytes of WAL from `earlier` up to `self`; zero when `earlier` is
    /// not earlier. This is the measure of replication lag in bytes.
    pub const fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The position `bytes` further along, saturating at the end of WAL.
    pub const fn advance(self, bytes: u64) -> Lsn {
        Lsn(self.0.saturating_add(bytes))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid LSN {input:?}: expected two hexadecimal numbers of at most 8 digits separated by '/', like 16/B374D848"
)]
pub struct ParseLsnError {
    input: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError {
            input: s.chars().take(64).collect(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| -> Result<u64, ParseLsnError> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> u64 {
        lsn.0
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Lsn {
        Lsn(value)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_the_postgres_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.as_u64(), 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!(
            "ffffffff/FFFFFFFF".parse::<Lsn>().unwrap().as_u64(),
            u64::MAX
        );
        // Leading zeros are accepted, as PostgreSQL's pg_lsn_in does.
        assert_eq!(
            "00000001/0000000A".parse::<Lsn>().unwrap().to_string(),
            "1/A"
        );
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1-2",
            "g/1",
            "1/2/3",
            "123456789/0",
            " 1/2",
            "1/+2",
            "-1/2",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
        let message = "xyz".parse::<Lsn>().unwrap_err().to_string();
        assert!(message.contains("\"xyz\""), "{message}");
    }

    #[test]
    fn orders_by_position_and_measures_distance() {
        let a: Lsn = "0/FFFFFFFF".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.bytes_since(a), 1);
        assert_eq!(a.bytes_since(b), 0, "distance never goes negative");
        assert_eq!(a.advance(1), b);
        assert_eq!(Lsn::from_u64(u64::MAX).advance(5).as_u64(), u64::MAX);
    }

    #[test]
    fn serializes_as_text() {
        let lsn: Lsn = "2/10".parse().unwrap();
        let json = serde_json::to_string(&lsn).unwrap();
        assert_eq!(json, "\"2/10\"");
        assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), lsn);
    }
}
