//! A domain's account, for one peer, of why it could not set up its half of their link: where it
//! is kept in the store, how it is tied to one set-up attempt, and how it is written and read
//! (bounded and sanitised), with no I/O.
//!
//! A domain that fails to set up its half of a link writes `<attempt> <reason>` at
//! [`failure_path`]`(me, peer)`, readable by `peer` only. `<attempt>` is the decimal number the
//! waiting peer published for its attempt: the value of its request
//! (`/local/domain/<high>/data/dombus/want/<low>`) when the higher domain waits, the
//! [`ATTEMPT_KEY`] node of the published link when the lower one does. A waiting peer heeds only
//! an account that names its current attempt, so an account left from an earlier attempt never
//! fails a fresh one.

use crate::types::DomId;

/// Longest reason kept, in bytes (after sanitising: printable ASCII only).
pub const MAX_REASON_LEN: usize = 256;

/// The node, under a published link's directory, that holds the server's attempt number.
pub(crate) const ATTEMPT_KEY: &str = "attempt";

/// Longest attempt number: a decimal u64.
const MAX_ATTEMPT_LEN: usize = 20;

/// Where `me` writes why it could not set up its half of the link to `peer`.
pub fn failure_path(me: DomId, peer: DomId) -> String {
    format!("/local/domain/{}/data/dombus/error/{}", me.0, peer.0)
}

/// If `path` is the failure account `writer` keeps for `reader` ([`failure_path`]), `writer`.
pub(crate) fn failure_writer(path: &str, reader: DomId) -> Option<DomId> {
    let rest = path.strip_prefix("/local/domain/")?;
    let (writer, rest) = rest.split_once('/')?;
    let for_whom = rest.strip_prefix("data/dombus/error/")?;
    (for_whom.parse::<u16>().ok()? == reader.0).then_some(DomId(writer.parse().ok()?))
}

/// A peer's account of why it could not set up its half of a link this domain waited for.
///
/// The reason is the peer's words, untrusted: bounded to [`MAX_REASON_LEN`] bytes of printable
/// ASCII and never interpreted. It reaches callers inside an [`std::io::Error`] of kind
/// [`Other`](std::io::ErrorKind::Other).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("domain {peer} could not set up the link: {reason}")]
pub struct PeerSetupFailed {
    /// The peer domain.
    pub peer: DomId,
    /// Why, in the peer's words (sanitised).
    pub reason: String,
}

/// `text` made safe to show: printable ASCII only (anything else becomes `?`, so no control
/// sequence or direction override reaches a terminal or log), at most [`MAX_REASON_LEN`] bytes.
pub(crate) fn sanitise(text: &str) -> String {
    let clean: String = text
        .chars()
        .take(MAX_REASON_LEN)
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect();
    let clean = clean.trim();
    if clean.is_empty() { "no reason given".to_string() } else { clean.to_string() }
}

/// The value of a failure account for `attempt`.
pub(crate) fn encode_failure(attempt: u64, reason: &str) -> String {
    format!("{attempt} {}", sanitise(reason))
}

/// The reason in a failure account read from the store, if it names `attempt`. Reads at most
/// the bytes a well-formed account can have; anything malformed is no account.
pub(crate) fn decode_failure(raw: &[u8], attempt: u64) -> Option<String> {
    let raw = &raw[..raw.len().min(MAX_ATTEMPT_LEN + 1 + 4 * MAX_REASON_LEN)];
    let space = raw.iter().position(|&b| b == b' ')?;
    if parse_attempt(&raw[..space])? != attempt {
        return None;
    }
    Some(sanitise(&String::from_utf8_lossy(&raw[space + 1..])))
}

/// An attempt number published by a peer (its request or its link's [`ATTEMPT_KEY`]): a decimal
/// u64, perhaps NUL-terminated; anything else is none.
pub(crate) fn parse_attempt(raw: &[u8]) -> Option<u64> {
    if raw.len() > MAX_ATTEMPT_LEN + 1 {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?.trim_end_matches('\0');
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_heeded_only_for_its_own_attempt() {
        let value = encode_failure(7, "resource limit: domain 1 would exceed 65536 grants");
        assert_eq!(value, "7 resource limit: domain 1 would exceed 65536 grants");
        assert_eq!(
            decode_failure(value.as_bytes(), 7).as_deref(),
            Some("resource limit: domain 1 would exceed 65536 grants")
        );
        assert_eq!(decode_failure(value.as_bytes(), 8), None);
        for bad in [&b""[..], b"7", b"x7 reason", b"-7 reason", b" reason", b"99999999999999999999999 r"] {
            assert_eq!(decode_failure(bad, 7), None, "{bad:?}");
        }
    }

    #[test]
    fn reasons_are_bounded_and_printable() {
        let hostile = format!("\x1b[2J\u{202e}evil\nline{}", "x".repeat(4000));
        let reason = decode_failure(format!("3 {hostile}").as_bytes(), 3).unwrap();
        assert!(reason.len() <= MAX_REASON_LEN, "{}", reason.len());
        assert!(reason.bytes().all(|b| b.is_ascii_graphic() || b == b' '), "{reason:?}");
        assert!(reason.starts_with("?[2J?evil?line"), "{reason:?}");
        assert_eq!(decode_failure(b"3 \xff\xfe", 3).as_deref(), Some("??"));
        assert_eq!(decode_failure(b"3 \n\t ", 3).as_deref(), Some("??"));
        assert_eq!(decode_failure(b"3 ", 3).as_deref(), Some("no reason given"));
        assert!(encode_failure(1, &"y".repeat(1000)).len() <= MAX_ATTEMPT_LEN + 1 + MAX_REASON_LEN);
    }

    #[test]
    fn attempt_numbers_are_parsed_strictly() {
        assert_eq!(parse_attempt(b"42"), Some(42));
        assert_eq!(parse_attempt(b"42\0"), Some(42));
        assert_eq!(parse_attempt(b"18446744073709551615"), Some(u64::MAX));
        for bad in [&b""[..], b"+1", b"1 ", b"18446744073709551616", b"\xff", &[b'1'; 64]] {
            assert_eq!(parse_attempt(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn failure_paths_name_their_writer_for_one_reader() {
        let path = failure_path(DomId(1), DomId(2));
        assert_eq!(path, "/local/domain/1/data/dombus/error/2");
        assert_eq!(failure_writer(&path, DomId(2)), Some(DomId(1)));
        assert_eq!(failure_writer(&path, DomId(3)), None);
        assert_eq!(failure_writer("/local/domain/1/data/dombus/want/2", DomId(2)), None);
        assert_eq!(failure_writer("/local/domain/x/data/dombus/error/2", DomId(2)), None);
    }
}
