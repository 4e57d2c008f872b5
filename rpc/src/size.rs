//! Byte counts for people: [`Size`] reads `10G`, `512M`, `1.5T` or plain bytes and shows a count
//! the same way, while the wire and JSON carry the plain integer.
//!
//! A result field that is a byte count is a [`Size`], or a `u64` marked
//! `#[serde(with = "dombus::rpc::size")]`; either way it serializes as a newtype struct named
//! [`TOKEN`], which every format dombus uses (bincode, postcard, JSON) writes as the bare `u64`.
//! The command-line glue (`cli`) recognises that name and prints the count with [`Size`]'s
//! `Display` in text output; `--json` gets the integer.
//!
//! ```
//! use dombus_rpc::size::Size;
//! assert_eq!("10G".parse(), Ok(Size(10 << 30)));
//! assert_eq!(Size(10 << 30).to_string(), "10G");
//! assert_eq!(Size(3 << 29).to_string(), "1.5G");
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The newtype-struct name under which a byte count is serialized (the marker the CLI glue
/// looks for).
pub const TOKEN: &str = "$dombus::size";

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

/// The units `Display` uses, largest first.
const UNITS: [(u32, &str); 5] = [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")];

impl fmt::Display for Size {
    /// In the largest unit the size reaches: a whole number of it exactly (`10G`, `512K`), else
    /// to three significant digits (`1.5G`, `12.3M`, `100G`); under 1K, bytes (`0`, `512`).
    /// Parsing it back gives the size exactly when it is a whole number of its unit, else within
    /// 0.5%.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (i, &(shift, unit)) in UNITS.iter().enumerate() {
            if n >> shift == 0 {
                continue;
            }
            if n & ((1u64 << shift) - 1) == 0 {
                return write!(f, "{}{unit}", n >> shift);
            }
            let v = n as f64 / (1u64 << shift) as f64;
            let decimals = if v < 10.0 {
                2
            } else if v < 100.0 {
                1
            } else {
                0
            };
            let shown = format!("{v:.decimals$}");
            let rounded = shown.parse::<f64>().unwrap_or(v);
            // 1023.7M rounds to 1024M: that is 1G.
            if rounded >= 1024.0 && i > 0 {
                return write!(f, "1{}", UNITS[i - 1].1);
            }
            // Just under 2^64 rounds to 16384P, which is not a u64: bytes, exactly.
            if rounded * (1u64 << shift) as f64 >= u64::MAX as f64 {
                return write!(f, "{n}");
            }
            let shown =
                if shown.contains('.') { shown.trim_end_matches('0').trim_end_matches('.') } else { &shown };
            return write!(f, "{shown}{unit}");
        }
        write!(f, "{n}")
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        deserialize(d).map(Size)
    }
}

/// Serializes a byte count (a `u64` field marked `#[serde(with = "dombus::rpc::size")]`): the
/// bare integer in every format, marked as a size for the CLI glue.
pub fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_newtype_struct(TOKEN, bytes)
}

/// Deserializes a byte count: a `u64`; human-readable formats (JSON from the command line) may
/// also give a string such as `"10G"`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    // Binary formats (bincode, postcard) have no self-description: a u64.
    if !d.is_human_readable() {
        return u64::deserialize(d);
    }
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size: bytes, or a string like \"10G\"")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom("a size cannot be negative"))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            v.parse::<Size>().map(Size::bytes).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor)
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
    fn shows_people_sizes() {
        let shown = |n: u64| Size(n).to_string();
        assert_eq!(shown(0), "0");
        assert_eq!(shown(512), "512");
        assert_eq!(shown(1023), "1023");
        assert_eq!(shown(512 << 10), "512K");
        assert_eq!(shown(10 << 30), "10G");
        assert_eq!(shown(3 << 29), "1.5G");
        assert_eq!(shown(1536 << 20), "1.5G");
        assert_eq!(shown((1 << 30) + 1), "1G");
        assert_eq!(shown((1 << 30) - 1), "1G");
        assert_eq!(shown(12_900_000), "12.3M");
        assert_eq!(shown(1_234_567_890), "1.15G");
        assert_eq!(shown(u64::MAX), u64::MAX.to_string());
        assert_eq!(shown(1500 << 50), "1500P");
    }

    #[test]
    fn json_takes_numbers_and_strings_binary_formats_a_u64() {
        assert_eq!(serde_json::from_str::<Size>("\"1M\"").unwrap(), Size(1 << 20));
        assert_eq!(serde_json::from_str::<Size>("1024").unwrap(), Size(1024));
        assert!(serde_json::from_str::<Size>("-5").is_err());
        let codec = crate::codec::Codec::Bincode;
        assert_eq!(codec.decode::<Size>(&codec.encode(&Size(77)).unwrap()).unwrap(), Size(77));
    }

    #[test]
    fn every_format_writes_the_bare_integer() {
        assert_eq!(serde_json::to_string(&Size(10 << 30)).unwrap(), "10737418240");
        for codec in [crate::codec::Codec::Bincode, crate::codec::Codec::Postcard] {
            assert_eq!(codec.encode(&Size(77)).unwrap(), codec.encode(&77u64).unwrap(), "{codec:?}");
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Disk {
            #[serde(with = "crate::size")]
            bytes: u64,
        }
        assert_eq!(serde_json::to_string(&Disk { bytes: 5 }).unwrap(), r#"{"bytes":5}"#);
        assert_eq!(serde_json::from_str::<Disk>(r#"{"bytes":"1K"}"#).unwrap(), Disk { bytes: 1024 });
    }

    proptest! {
        #[test]
        fn display_parses_back_close_and_whole_units_exactly(n in any::<u64>(), unit in 0u32..=5, k in 1u64..1024) {
            let back = Size(n).to_string().parse::<Size>().map(Size::bytes);
            prop_assert!(back.is_ok(), "{} does not parse", Size(n));
            let back = back.unwrap_or_default();
            let error = (back as f64 - n as f64).abs() / (n as f64).max(1.0);
            prop_assert!(error <= 0.005, "{n} shown as {} reads back as {back}", Size(n));
            // k of a unit (bytes, K, M, G, T, P), k < 1024: shown as that whole number.
            let whole = k << (10 * unit);
            prop_assert_eq!(Size(whole).to_string().parse::<Size>(), Ok(Size(whole)));
        }

        #[test]
        fn garbage_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Size>();
        }
    }
}
