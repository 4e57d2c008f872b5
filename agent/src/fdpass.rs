//! One fixed-size record with one file descriptor attached (`SCM_RIGHTS`) over a Unix stream
//! socket: how an agent hands an accepted connection's socket to the listening process.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Sends `record` with `fd` attached. The record is small and sent whole or not at all (a Unix
/// stream socket takes it as one buffer); a short send is an error.
pub async fn send(sock: &UnixStream, record: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd];
    let n = sock
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(sock, &[io::IoSlice::new(record)], &mut control, SendFlags::NOSIGNAL)
                .map_err(io::Error::from)
        })
        .await?;
    if n != record.len() {
        return Err(io::Error::other(format!("short send of a record: {n} of {} bytes", record.len())));
    }
    Ok(())
}

/// Receives one `N`-byte record and the descriptor attached to it. `Ok(None)` at the end of the
/// stream (before a record began).
pub async fn recv<const N: usize>(sock: &UnixStream) -> io::Result<Option<([u8; N], OwnedFd)>> {
    let mut record = [0u8; N];
    let mut got = 0;
    let mut fd = None;
    while got < N {
        let (n, received) = sock
            .async_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [io::IoSliceMut::new(&mut record[got..])];
                let msg = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                let mut fds: Vec<OwnedFd> = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(it) = m {
                        fds.extend(it);
                    }
                }
                Ok((msg.bytes, fds))
            })
            .await?;
        // Descriptors past the first are closed here: a record carries one.
        if let Some(first) = received.into_iter().next() {
            if fd.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a second descriptor within one record",
                ));
            }
            fd = Some(first);
        }
        if n == 0 {
            return if got == 0 && fd.is_none() {
                Ok(None)
            } else {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a record"))
            };
        }
        got += n;
    }
    let fd =
        fd.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a record without its descriptor"))?;
    Ok(Some((record, fd)))
}
