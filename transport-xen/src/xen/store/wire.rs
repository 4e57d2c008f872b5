//! The xenstore wire format (`xen/include/public/io/xs_wire.h`) as pure functions over bytes.
//!
//! Nothing here does I/O, so the client, its tests and the `xenstore_wire` fuzz target all drive
//! the same code. Decoders take untrusted bytes: a length is checked against [`PAYLOAD_MAX`]
//! before anything is buffered for it, and malformed input is a [`WireError`], never a panic.

use crate::backend::{Perm, PermKind};
use crate::types::DomId;

/// Size of a message header: `{type, req_id, tx_id, len}`, four little-endian `u32`s.
pub const HEADER_LEN: usize = 16;
/// Largest payload xenstore accepts or sends (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;

/// Bytes that are not a valid xenstore message or payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, WireError> {
    Err(WireError(msg.into()))
}

macro_rules! msg_types {
    ($($name:ident = $val:literal,)*) => {
        /// A message type (`enum xsd_sockmsg_type`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(missing_docs)]
        pub enum MsgType { $($name = $val,)* }

        impl MsgType {
            /// Every type defined by `xs_wire.h` (20, `XS_INVALID`, is not one).
            pub const ALL: &[MsgType] = &[$(MsgType::$name,)*];
        }
    };
}

msg_types! {
    Control = 0, Directory = 1, Read = 2, GetPerms = 3, Watch = 4, Unwatch = 5,
    TransactionStart = 6, TransactionEnd = 7, Introduce = 8, Release = 9, GetDomainPath = 10,
    Write = 11, Mkdir = 12, Rm = 13, SetPerms = 14, WatchEvent = 15, Error = 16,
    IsDomainIntroduced = 17, Resume = 18, SetTarget = 19, ResetWatches = 21, DirectoryPart = 22,
}

impl MsgType {
    /// The type with wire value `v`, if it is a defined one.
    pub fn from_u32(v: u32) -> Option<MsgType> {
        MsgType::ALL.iter().copied().find(|t| *t as u32 == v)
    }
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the message is.
    pub ty: MsgType,
    /// Chosen by the client, echoed in the reply (0 in watch events).
    pub req_id: u32,
    /// The transaction the request runs in (0: none).
    pub tx_id: u32,
    /// Payload length, at most [`PAYLOAD_MAX`].
    pub len: u32,
}

/// A whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// What the message is.
    pub ty: MsgType,
    /// Request id (see [`Header::req_id`]).
    pub req_id: u32,
    /// Transaction id (see [`Header::tx_id`]).
    pub tx_id: u32,
    /// The payload, at most [`PAYLOAD_MAX`] bytes.
    pub payload: Vec<u8>,
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(i..i + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

/// Decodes the header at the start of `bytes`: too short, an undefined type or a length above
/// [`PAYLOAD_MAX`] are errors.
pub fn decode_header(bytes: &[u8]) -> Result<Header, WireError> {
    if bytes.len() < HEADER_LEN {
        return bad(format!("header of {} bytes", bytes.len()));
    }
    let raw_ty = u32_at(bytes, 0);
    let Some(ty) = MsgType::from_u32(raw_ty) else { return bad(format!("unknown message type {raw_ty}")) };
    let len = u32_at(bytes, 12);
    if len as usize > PAYLOAD_MAX {
        return bad(format!("payload of {len} bytes (limit {PAYLOAD_MAX})"));
    }
    Ok(Header { ty, req_id: u32_at(bytes, 4), tx_id: u32_at(bytes, 8), len })
}

/// Encodes one message; a payload above [`PAYLOAD_MAX`] is an error.
pub fn encode_message(ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    if payload.len() > PAYLOAD_MAX {
        return bad(format!("payload of {} bytes (limit {PAYLOAD_MAX})", payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    for word in [ty as u32, req_id, tx_id, payload.len() as u32] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes the message at the start of `bytes`: `Ok(None)` if more bytes are needed, otherwise
/// the message and how many bytes it took.
pub fn decode_message(bytes: &[u8]) -> Result<Option<(Msg, usize)>, WireError> {
    if bytes.len() < HEADER_LEN {
        return Ok(None);
    }
    let h = decode_header(bytes)?;
    let end = HEADER_LEN + h.len as usize;
    Ok(bytes
        .get(HEADER_LEN..end)
        .map(|p| (Msg { ty: h.ty, req_id: h.req_id, tx_id: h.tx_id, payload: p.to_vec() }, end)))
}

/// Splits a byte stream into messages. The buffer holds at most one partial message plus the
/// last chunk pushed, since a header is checked as soon as its 16 bytes are in.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Appends bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if none is complete yet. After an error the stream
    /// is unusable.
    pub fn next_message(&mut self) -> Result<Option<Msg>, WireError> {
        let Some((msg, used)) = decode_message(&self.buf)? else { return Ok(None) };
        self.buf.drain(..used);
        Ok(Some(msg))
    }
}

/// NUL-terminated strings, concatenated (a request's string arguments). A string containing NUL
/// is an error.
pub fn strings<S: AsRef<str>>(parts: &[S]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    for s in parts {
        let s = s.as_ref();
        if s.contains('\0') {
            return bad(format!("{s:?} contains a NUL byte"));
        }
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    Ok(out)
}

/// The `XS_WRITE` payload: `path\0value` (the value is not terminated and may hold any bytes).
pub fn write_payload(path: &str, value: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = strings(&[path])?;
    out.extend_from_slice(value);
    Ok(out)
}

/// One permission as xenstore spells it: letter and domid, e.g. `r3`.
pub fn perm_string(p: Perm) -> String {
    format!("{}{}", p.kind.letter(), p.domid.0)
}

/// A permission list as NUL-terminated strings (`n0\0r3\0`), the `XS_GET_PERMS` reply and the
/// tail of `XS_SET_PERMS`.
pub fn encode_perms(perms: &[Perm]) -> Vec<u8> {
    perms.iter().flat_map(|p| perm_string(*p).into_bytes().into_iter().chain([0])).collect()
}

/// The fields of a NUL-separated payload; one trailing NUL is allowed (and usual).
fn fields(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    body.split(|b| *b == 0).filter(move |_| !payload.is_empty())
}

fn text(field: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(field)
        .or_else(|_| bad(format!("non-UTF-8 string {:?}", field.escape_ascii().to_string())))
}

fn decimal(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 10 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    field.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// The string arguments of a request (`path\0token\0`): NUL-separated UTF-8 fields, one
/// trailing NUL allowed (the server side of [`strings`]).
pub fn parse_strings(payload: &[u8]) -> Result<Vec<&str>, WireError> {
    fields(payload).map(text).collect()
}

/// The `(path, value)` of an `XS_WRITE` payload (the server side of [`write_payload`]).
pub fn parse_write(payload: &[u8]) -> Result<(&str, &[u8]), WireError> {
    let Some(nul) = payload.iter().position(|b| *b == 0) else {
        return bad("write payload without a NUL after the path");
    };
    Ok((text(payload.get(..nul).unwrap_or_default())?, payload.get(nul + 1..).unwrap_or_default()))
}

/// The errno name of an `XS_ERROR` payload (`ENOENT\0`): 1 to 32 ASCII letters and digits.
pub fn parse_error(payload: &[u8]) -> Result<&str, WireError> {
    let name = payload.strip_suffix(&[0]).unwrap_or(payload);
    if name.is_empty() || name.len() > 32 || !name.iter().all(u8::is_ascii_alphanumeric) {
        return bad(format!("bad error name {:?}", name.escape_ascii().to_string()));
    }
    text(name)
}

/// The child names of an `XS_DIRECTORY` reply (`a\0b\0`; empty for no children).
pub fn parse_directory(payload: &[u8]) -> Result<Vec<String>, WireError> {
    fields(payload)
        .map(|f| if f.is_empty() { bad("empty name in directory") } else { text(f).map(str::to_owned) })
        .collect()
}

/// One permission string (`r3`).
pub fn parse_perm(field: &[u8]) -> Result<Perm, WireError> {
    let kind = match field.first() {
        Some(b'n') => PermKind::None,
        Some(b'r') => PermKind::Read,
        Some(b'w') => PermKind::Write,
        Some(b'b') => PermKind::Both,
        _ => return bad(format!("bad permission {:?}", field.escape_ascii().to_string())),
    };
    match decimal(field.get(1..).unwrap_or_default()).and_then(|d| u16::try_from(d).ok()) {
        Some(d) => Ok(Perm { domid: DomId(d), kind }),
        None => bad(format!("bad domid in permission {:?}", field.escape_ascii().to_string())),
    }
}

/// The permission list of an `XS_GET_PERMS` reply (at least the owner's entry).
pub fn parse_perms(payload: &[u8]) -> Result<Vec<Perm>, WireError> {
    let perms = fields(payload).map(parse_perm).collect::<Result<Vec<_>, _>>()?;
    if perms.is_empty() {
        return bad("empty permission list");
    }
    Ok(perms)
}

/// The `(path, token)` of an `XS_WATCH_EVENT` payload (`path\0token\0`).
pub fn parse_watch_event(payload: &[u8]) -> Result<(String, String), WireError> {
    let mut f = fields(payload);
    match (f.next(), f.next(), f.next()) {
        (Some(path), Some(token), None) if !path.is_empty() => {
            Ok((text(path)?.to_owned(), text(token)?.to_owned()))
        }
        _ => bad("watch event is not path\\0token\\0"),
    }
}

/// The transaction id of an `XS_TRANSACTION_START` reply (decimal, NUL-terminated, not 0).
pub fn parse_tx_id(payload: &[u8]) -> Result<u32, WireError> {
    let digits = payload.strip_suffix(&[0]).unwrap_or(payload);
    match decimal(digits).and_then(|d| u32::try_from(d).ok()) {
        Some(id) if id != 0 => Ok(id),
        _ => bad(format!("bad transaction id {:?}", digits.escape_ascii().to_string())),
    }
}

/// A domain id stored as a decimal value (the `domid` key).
pub fn parse_domid(value: &[u8]) -> Result<DomId, WireError> {
    match decimal(value).and_then(|d| u16::try_from(d).ok()).map(DomId) {
        Some(d) if d.is_guest_id() => Ok(d),
        _ => bad(format!("{:?} is not a domain id", value.escape_ascii().to_string())),
    }
}
