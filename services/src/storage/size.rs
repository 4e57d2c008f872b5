//! Sizes in bytes, written for people as `10G`, `512M`, `1.5T` or plain bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes. On the wire a `u64`; in JSON and on the command line a number of bytes or a
/// string with a binary suffix: `K`, `M`, `G`, `T`, `P` (optionally followed by `iB` or `B`),
/// e.g. `10G` = 10 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl Size {
    /// Bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let digits_end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, suffix) = t.split_at(digits_end);
        let suffix = suffix.trim();
        let shift = match suffix.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            "P" => 50,
            _ => return Err(format!("{s:?}: unknown unit {suffix:?} (K, M, G, T or P, powers of 1024)")),
        };
        let bad = || format!("{s:?}: not a size (e.g. 10G, 512M, 1048576)");
        if number.is_empty() {
            return Err(bad());
        }
        let multiplier = 1u64 << shift;
        if let Ok(n) = number.parse::<u64>() {
            return n.checked_mul(multiplier).map(Size).ok_or_else(|| format!("{s:?}: too large"));
        }
        let f: f64 = number.parse().map_err(|_| bad())?;
        let bytes = f * multiplier as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{s:?}: too large"));
        }
        Ok(Size(bytes.round() as u64))
    }
}

impl fmt::Display for Size {
    /// The largest unit that shows the size exactly (`10G`, `1536M`), else bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if self.0 != 0 && self.0 % (1u64 << shift) == 0 {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        // Binary formats (bincode, postcard) have no self-description: a u64. Human-readable
        // ones (JSON from the command line) may also give "10G".
        if !d.is_human_readable() {
            return u64::deserialize(d).map(Size);
        }
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: bytes, or a string like \"10G\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_people_sizes() {
        assert_eq!("10G".parse(), Ok(Size(10 << 30)));
        assert_eq!("512m".parse(), Ok(Size(512 << 20)));
        assert_eq!("1.5GiB".parse(), Ok(Size(3 << 29)));
        assert_eq!("4096".parse(), Ok(Size(4096)));
        assert_eq!(" 2 KB ".parse(), Ok(Size(2048)));
        for bad in ["", "G", "10X", "1.2.3G", "-1G", "99999999999P", "inf"] {
            assert!(bad.parse::<Size>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn json_takes_numbers_and_strings_binary_formats_a_u64() {
        assert_eq!(serde_json::from_str::<Size>("\"1M\"").unwrap(), Size(1 << 20));
        assert_eq!(serde_json::from_str::<Size>("1024").unwrap(), Size(1024));
        assert!(serde_json::from_str::<Size>("-5").is_err());
        let codec = dombus::rpc::codec::Codec::Bincode;
        assert_eq!(codec.decode::<Size>(&codec.encode(&Size(77)).unwrap()).unwrap(), Size(77));
    }

    proptest! {
        #[test]
        fn display_parses_back(n in any::<u64>()) {
            prop_assert_eq!(Size(n).to_string().parse::<Size>(), Ok(Size(n)));
        }

        #[test]
        fn garbage_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Size>();
        }
    }
}
