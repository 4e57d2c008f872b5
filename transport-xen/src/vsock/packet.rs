//! The packet header of the virtual-socket protocol on a link (sans-IO).
//!
//! Every packet is a fixed 24-byte header, followed by `len` payload bytes for `RW` packets.
//! Modelled on virtio-vsock's header, without the CIDs (a link joins exactly two domains, so
//! they are implicit). All fields little-endian:
//!
//! ```text
//! off size field      meaning
//!   0  u8  version    protocol version: 1
//!   1  u8  op         1 REQUEST, 2 RESPONSE, 3 RST, 4 SHUTDOWN, 5 RW, 6 CREDIT_UPDATE,
//!                     7 CREDIT_REQUEST
//!   2  u16 flags      SHUTDOWN: 0x1 RCV (will receive no more), 0x2 SEND (will send no more),
//!                     at least one set; RST: 0x1 UNSUPPORTED_VERSION; other ops: 0
//!   4  u32 src_port   sender's port
//!   8  u32 dst_port   receiver's port
//!  12  u32 len        payload bytes after the header: 1..=MAX_PAYLOAD for RW, 0 otherwise
//!  16  u32 buf_alloc  sender's receive buffer for this connection, in bytes
//!  20  u32 fwd_cnt    bytes of this connection the sender's application has consumed
//!                     (free-running, wraps at 2^32)
//! ```
//!
//! A receiver that gets a version it does not speak closes the link as a protocol violation
//! ([`PacketError::UnsupportedVersion`]). The `RST` flag `UNSUPPORTED_VERSION` is reserved for
//! telling the sender which version to speak instead; this implementation never sends it.
//!
//! Every field comes from the peer: [`Header::decode`] checks the version, the op, the flags
//! allowed for that op and the payload length before anything else looks at the packet.

/// The protocol version this implementation speaks.
pub const VERSION: u8 = 1;
/// Size of the encoded header.
pub const HEADER_LEN: usize = 24;
/// Largest payload of one `RW` packet.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `SHUTDOWN` flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u16 = 0x1;
/// `SHUTDOWN` flag: the sender will send no more.
pub const SHUTDOWN_SEND: u16 = 0x2;
/// `RST` flag: the packet that caused it had a version the sender does not speak.
pub const RST_UNSUPPORTED_VERSION: u16 = 0x1;

/// What a packet does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Open a connection to `dst_port`.
    Request = 1,
    /// Accept a connection.
    Response = 2,
    /// Refuse or abort a connection (or, with a flag, a version).
    Rst = 3,
    /// Close one or both directions of a connection.
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's receive credit changed.
    CreditUpdate = 6,
    /// Asks the receiver to send its credit.
    CreditRequest = 7,
}

impl Op {
    /// The op for a wire byte, if the protocol defines one.
    pub fn from_byte(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    /// The flags this op may carry.
    fn allowed_flags(self) -> u16 {
        match self {
            Op::Shutdown => SHUTDOWN_RCV | SHUTDOWN_SEND,
            Op::Rst => RST_UNSUPPORTED_VERSION,
            _ => 0,
        }
    }
}

/// A decoded, validated packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the packet does.
    pub op: Op,
    /// Op-specific flags (validated against the op).
    pub flags: u16,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes following the header.
    pub len: u32,
    /// Sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender's application has consumed from this connection.
    pub fwd_cnt: u32,
}

/// How a header from the peer is malformed. Each is a protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("packet header truncated: {0} of {HEADER_LEN} bytes")]
    Truncated(usize),
    /// A version this implementation does not speak.
    #[error("packet version {0} is not supported (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// An op code the protocol does not define.
    #[error("unknown packet op {0}")]
    UnknownOp(u8),
    /// Flags the op does not allow (or a SHUTDOWN with no direction).
    #[error("flags {flags:#x} are not valid for {op:?}")]
    BadFlags {
        /// The op.
        op: Op,
        /// The flags received.
        flags: u16,
    },
    /// An RW packet with no payload or more than [`MAX_PAYLOAD`].
    #[error("RW packet with payload length {0} (allowed 1..={MAX_PAYLOAD})")]
    BadPayloadLength(u32),
    /// A payload on an op that carries none.
    #[error("{op:?} packet carries {len} payload bytes; only RW carries data")]
    UnexpectedPayload {
        /// The op.
        op: Op,
        /// The length received.
        len: u32,
    },
}

impl Header {
    /// A header with no payload, flags or credit (fill in what the op needs).
    pub fn new(op: Op, src_port: u32, dst_port: u32) -> Header {
        Header { op, flags: 0, src_port, dst_port, len: 0, buf_alloc: 0, fwd_cnt: 0 }
    }

    /// An `RST` from `src_port` to `dst_port`: no flags, no credit (it ends the connection, so
    /// there is none to announce).
    pub fn rst(src_port: u32, dst_port: u32) -> Header {
        Header::new(Op::Rst, src_port, dst_port)
    }

    /// An `RW` header announcing `len` payload bytes (credit still to fill in).
    pub fn rw(src_port: u32, dst_port: u32, len: u32) -> Header {
        Header { len, ..Header::new(Op::Rw, src_port, dst_port) }
    }

    /// The packet as it goes on the link: this header followed by `payload` (`len` bytes).
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&self.encode());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// Encodes the header (version [`VERSION`]).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = VERSION;
        b[1] = self.op as u8;
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.src_port.to_le_bytes());
        b[8..12].copy_from_slice(&self.dst_port.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[20..24].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes and validates the header at the start of `bytes` (the rest is not looked at).
    pub fn decode(bytes: &[u8]) -> Result<Header, PacketError> {
        let Some(b) = bytes.get(..HEADER_LEN) else {
            return Err(PacketError::Truncated(bytes.len()));
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if b[0] != VERSION {
            return Err(PacketError::UnsupportedVersion(b[0]));
        }
        let op = Op::from_byte(b[1]).ok_or(PacketError::UnknownOp(b[1]))?;
        let flags = u16::from_le_bytes([b[2], b[3]]);
        if flags & !op.allowed_flags() != 0 || (op == Op::Shutdown && flags == 0) {
            return Err(PacketError::BadFlags { op, flags });
        }
        let len = u32_at(12);
        match op {
            Op::Rw if len == 0 || len > MAX_PAYLOAD => return Err(PacketError::BadPayloadLength(len)),
            Op::Rw => {}
            _ if len != 0 => return Err(PacketError::UnexpectedPayload { op, len }),
            _ => {}
        }
        Ok(Header {
            op,
            flags,
            src_port: u32_at(4),
            dst_port: u32_at(8),
            len,
            buf_alloc: u32_at(16),
            fwd_cnt: u32_at(20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_byte_exact() {
        let h = Header {
            op: Op::Rw,
            flags: 0,
            src_port: 0x0102_0304,
            dst_port: 0x0506_0708,
            len: 9,
            buf_alloc: 0x1112_1314,
            fwd_cnt: 0x2122_2324,
        };
        assert_eq!(
            h.encode(),
            [1, 5, 0, 0, 4, 3, 2, 1, 8, 7, 6, 5, 9, 0, 0, 0, 0x14, 0x13, 0x12, 0x11, 0x24, 0x23, 0x22, 0x21]
        );
        assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn hostile_headers_are_refused_by_name() {
        let good = Header { flags: SHUTDOWN_SEND, ..Header::new(Op::Shutdown, 1, 2) }.encode();
        assert!(Header::decode(&good).is_ok());
        assert_eq!(Header::decode(&good[..23]), Err(PacketError::Truncated(23)));
        let with = |i: usize, v: u8| {
            let mut b = good;
            b[i] = v;
            Header::decode(&b)
        };
        assert_eq!(with(0, 2), Err(PacketError::UnsupportedVersion(2)));
        assert_eq!(with(1, 0), Err(PacketError::UnknownOp(0)));
        assert_eq!(with(1, 8), Err(PacketError::UnknownOp(8)));
        assert_eq!(with(2, 0), Err(PacketError::BadFlags { op: Op::Shutdown, flags: 0 }));
        assert_eq!(with(2, 4), Err(PacketError::BadFlags { op: Op::Shutdown, flags: 4 }));
        assert_eq!(with(12, 1), Err(PacketError::UnexpectedPayload { op: Op::Shutdown, len: 1 }));
        let rw = |len: u32| Header::decode(&Header::rw(1, 2, len).encode());
        assert_eq!(rw(0), Err(PacketError::BadPayloadLength(0)));
        assert_eq!(rw(MAX_PAYLOAD + 1), Err(PacketError::BadPayloadLength(MAX_PAYLOAD + 1)));
        assert!(rw(MAX_PAYLOAD).is_ok());
        let rst = Header { flags: RST_UNSUPPORTED_VERSION, ..Header::rst(1, 2) };
        assert_eq!(Header::decode(&rst.encode()), Ok(rst));
    }

    proptest! {
        /// Whatever the bytes, decoding never panics, and whatever decodes re-encodes to the
        /// same 24 bytes (there is exactly one encoding of each header).
        #[test]
        fn decode_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(h) = Header::decode(&bytes) {
                prop_assert_eq!(&h.encode()[..], &bytes[..HEADER_LEN]);
            }
        }
    }
}
