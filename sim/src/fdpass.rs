//! Sending and receiving one `SOCK_SEQPACKET` record with file descriptors (`SCM_RIGHTS`).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use super::proto::{MAX_FDS, MAX_MSG};

/// Sends `bytes` as one record with `fds` attached. Never raises `SIGPIPE`.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds in one message"));
    }
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small for fds"));
    }
    loop {
        match rustix::net::sendmsg(sock, &[io::IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!("short seqpacket send: {n} of {}", bytes.len())));
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// What [`recv`] got.
pub enum Received {
    /// A record of `len` bytes (in the caller's buffer) with these fds.
    Msg {
        /// Bytes received.
        len: usize,
        /// Descriptors received (close-on-exec).
        fds: Vec<OwnedFd>,
    },
    /// A record larger than the buffer (its tail was discarded) or with too many fds.
    Oversize {
        /// Why it was refused.
        reason: String,
    },
    /// The peer closed the connection.
    Eof,
}

/// Receives one record into `buf` (which should be [`MAX_MSG`] bytes long).
pub fn recv(sock: impl AsFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        match rustix::net::recvmsg(&sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(m) => break m,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if msg.flags.contains(ReturnFlags::TRUNC) || msg.bytes > buf.len() {
        return Ok(Received::Oversize {
            reason: format!("message larger than the {}-byte limit", buf.len().min(MAX_MSG)),
        });
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Ok(Received::Oversize { reason: format!("more than {MAX_FDS} fds in one message") });
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(Received::Eof);
    }
    Ok(Received::Msg { len: msg.bytes, fds })
}

/// A receive buffer of the protocol's maximum message size.
pub fn buffer() -> Vec<u8> {
    vec![0u8; MAX_MSG]
}
