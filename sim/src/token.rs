//! Who may attach as which domain: the toolstack key and one-time domain tokens.
//!
//! The daemon makes a random 256-bit key when it starts and writes it, readable by its owner
//! only, beside its socket: whoever presents it is the toolstack. The toolstack creates a domain
//! (`Op::Create`) and receives a one-time token naming it, which it hands to the process that
//! will run as that domain; that process attaches with the token (`Op::Hello`), which is then
//! spent. No process picks its own domain id. Tokens are `<domid>-<64 hex digits>`, the key
//! `toolstack-<64 hex digits>`; secrets are compared in constant time.

use std::io;

use dombus_transport_xen::types::DomId;

/// Bytes of randomness in a key or token.
const SECRET_LEN: usize = 32;

/// A random secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Secret([u8; SECRET_LEN]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh secret from the kernel's random source.
    pub(crate) fn random() -> io::Result<Secret> {
        let mut b = [0u8; SECRET_LEN];
        let mut filled = 0;
        while filled < SECRET_LEN {
            match rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty()) {
                Ok(n) => filled += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Secret(b))
    }

    /// Whether `other` is this secret, in time independent of where they differ.
    pub(crate) fn matches(&self, other: &Secret) -> bool {
        self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(s: &str) -> Option<Secret> {
        if s.len() != 2 * SECRET_LEN || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut b = [0u8; SECRET_LEN];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Secret(b))
    }
}

/// What a presented credential claims to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Credential {
    /// The toolstack key.
    Key(Secret),
    /// A token for domain `.0`.
    Token(DomId, Secret),
}

impl Credential {
    /// Parses a credential (untrusted input: `None` if it is neither form).
    pub(crate) fn parse(s: &str) -> Option<Credential> {
        let (who, hex) = s.split_once('-')?;
        let secret = Secret::from_hex(hex)?;
        if who == "toolstack" {
            return Some(Credential::Key(secret));
        }
        if who.is_empty() || who.len() > 5 || !who.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        Some(Credential::Token(who.parse().ok()?, secret))
    }
}

/// The text form of the toolstack key.
pub(crate) fn key_text(key: &Secret) -> String {
    format!("toolstack-{}", key.hex())
}

/// The text form of domain `domid`'s token.
pub(crate) fn token_text(domid: DomId, secret: &Secret) -> String {
    format!("{domid}-{}", secret.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let s = Secret::random().unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(s, Secret::random().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(Credential::parse(&key_text(&s)), Some(Credential::Key(s)));
        assert_eq!(Credential::parse(&token_text(DomId(7), &s)), Some(Credential::Token(DomId(7), s)));
        let hex = s.hex();
        for bad in [
            String::new(),
            hex.clone(),
            format!("-{hex}"),
            format!("x-{hex}"),
            format!("70000-{hex}"),
            format!("123456-{hex}"),
            format!("7-{}", &hex[1..]),
            format!("7-{hex}0"),
            format!("7-{}", hex.replace(|c: char| c.is_ascii_hexdigit(), "g")),
            format!("7-+{}", &hex[1..]),
        ] {
            assert_eq!(Credential::parse(&bad), None, "{bad}");
        }
        assert!(s.matches(&s));
        let mut other = s;
        other.0[31] ^= 1;
        assert!(!s.matches(&other));
        // Two bytes differing the same way must not cancel out.
        other.0[0] ^= 1;
        assert!(!s.matches(&other));
        // A secret never shows in logs.
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,80}") {
            let _ = Credential::parse(&s);
        }
    }
}
