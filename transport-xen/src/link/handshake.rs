//! The store handshake that sets up a link's pages, rings and event channel.
//!
//! The server ([`listen`]) grants the control page and the ring pages to the client, allocates an
//! unbound event channel and publishes `event-channel` and `ring-ref` under a store path; the
//! client ([`connect`]) waits for them with a store watch, binds the event channel and maps the
//! pages. Both place the rings with one helper, [`place_rings`]: the server fills the control
//! page's grant list with the refs of the pages it grants, the client reads the list back from
//! that (untrusted) page. The result is a [`Handshake`], from which the stream shell builds a
//! [`Link`](super::Link).

use std::ops::Range;

use super::reactor::register;
use super::{LinkConfig, LinkError, server_path};
use crate::backend::{
    Backend, BackendError, EventChannel, MappedPages, Perm, PermKind, SharedPages, Store, StoreWatch,
};
use crate::layout::{self, Placement, RingOrders};
use crate::link::endpoint::Endpoint;
use crate::ring::PeerMisbehaved;
use crate::shmem::{Region, SharedMem};
use crate::types::{DomId, EvtchnPort, GrantRef, PAGE_SIZE};

/// The pages behind a link: owned as granter (server) or mapper (client), kept for its life.
pub(super) enum Pages<B: Backend> {
    Server { _ctl: B::Shared, _rings: Vec<B::Shared> },
    Client { _ctl: B::Mapped, _rings: Vec<B::Mapped> },
}

/// What a finished handshake hands to the stream shell.
pub(super) struct Handshake<B: Backend> {
    /// The protocol state over the control page and the two rings.
    pub(super) endpoint: Endpoint<Region>,
    /// The peer domain.
    pub(super) peer: DomId,
    /// The event-channel handle, bound to `port`.
    pub(super) evtchn: B::Evtchn,
    /// Our local event-channel port.
    pub(super) port: EvtchnPort,
    /// The pages that must stay granted or mapped while the link lives.
    pub(super) pages: Pages<B>,
    /// The store path the server published (to remove on close); `None` on the client.
    pub(super) published: Option<String>,
}

/// Which ring of a link: the client writes the left ring and reads the right one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ring {
    Left,
    Right,
}

/// Places the two rings as `orders` says: a ring of order 10 or 11 inside the control `page`, a
/// larger one in pages of its own. The grant refs of those pages fill the control page's grant
/// list in order, the left ring's first; `own_pages(ring, slots)` provides the pages of one such
/// ring given its slots in that list, and returns them with their region.
///
/// Returns the (left, right) regions and the pages to keep.
fn place_rings<P>(
    page: &Region,
    orders: RingOrders,
    mut own_pages: impl FnMut(Ring, Range<usize>) -> Result<(P, Region), LinkError>,
) -> Result<(Region, Region, Vec<P>), LinkError> {
    let mut kept = Vec::new();
    let mut next_slot = 0usize;
    let mut place = |ring: Ring, order: u32| -> Result<Region, LinkError> {
        match RingOrders::placement(order) {
            Placement::InPage(off) => Ok(page.sub(off, 1 << order)),
            Placement::Pages(n) => {
                let (pages, region) = own_pages(ring, next_slot..next_slot + n)?;
                next_slot += n;
                kept.push(pages);
                Ok(region)
            }
        }
    };
    let left = place(Ring::Left, orders.left)?;
    let right = place(Ring::Right, orders.right)?;
    Ok((left, right, kept))
}

/// Offset in the control page of grant-list slot `slot`.
fn grant_slot(slot: usize) -> usize {
    layout::GRANTS + 4 * slot
}

/// Server side: grants the pages to `client`, allocates the event channel and publishes the link
/// under `path` (relative paths live under this domain's home).
pub(super) fn listen<B: Backend>(
    backend: &B,
    path: &str,
    client: DomId,
    cfg: &LinkConfig,
) -> Result<Handshake<B>, LinkError> {
    let orders = RingOrders::for_sizes(cfg.client_to_server, cfg.server_to_client).ok_or_else(|| {
        LinkError::Config(format!(
            "ring sizes {}/{} exceed the 1 MiB maximum",
            cfg.client_to_server, cfg.server_to_client
        ))
    })?;
    let evtchn = backend.open_evtchn()?;
    let port = evtchn.bind_unbound(client)?;
    let mut ctl = backend.share_pages(client, 1, true)?;
    // If we die, the hypervisor clears our live byte and signals the client.
    ctl.set_unmap_notify(layout::SRV_LIVE, Some(port))?;
    let page = ctl.region().clone();

    let (left, right, rings) = place_rings(&page, orders, |_, slots| {
        let shared = backend.share_pages(client, slots.len(), true)?;
        for (slot, r) in slots.zip(shared.refs()) {
            page.store_u32(grant_slot(slot), r.0);
        }
        let region = shared.region().clone();
        Ok((shared, region))
    })?;
    let endpoint = Endpoint::init_server(page.clone(), left, right, orders);

    // Publish: event-channel first, ring-ref last, each readable by the client only, so that
    // a client that sees ring-ref also finds event-channel (libxenvchan uses a transaction).
    // `publish` makes sure the client's watch hears of each node.
    let store = backend.store();
    let path = server_path(backend.domid(), path);
    let perms =
        [Perm { domid: backend.domid(), kind: PermKind::None }, Perm { domid: client, kind: PermKind::Read }];
    let ring_ref = ctl.refs().first().copied().ok_or_else(|| {
        LinkError::Backend(BackendError::InvalidArgument("share_pages returned no grant ref".into()))
    })?;
    for (key, value) in [("event-channel", port.0), ("ring-ref", ring_ref.0)] {
        let node = format!("{path}/{key}");
        crate::backend::publish(store, &node, value.to_string().as_bytes(), &perms)?;
    }
    tracing::debug!(%path, %client, %port, ?orders, "link published");
    Ok(Handshake {
        endpoint,
        peer: client,
        evtchn,
        port,
        pages: Pages::Server { _ctl: ctl, _rings: rings },
        published: Some(path),
    })
}

/// Client side: waits (via a store watch) until the server at `path` has published the link,
/// then binds the event channel and maps the pages. A relative `path` is resolved under the
/// *server's* home. The caller wakes the server once its shell is ready.
pub(super) async fn connect<B: Backend>(
    backend: &B,
    path: &str,
    server: DomId,
) -> Result<Handshake<B>, LinkError> {
    let path = server_path(server, path);
    let (ring_ref, remote_port) = wait_published(backend, &path, server).await?;
    let evtchn = backend.open_evtchn()?;
    let port = evtchn.bind_interdomain(server, remote_port)?;
    let misbehaved = |violation| LinkError::PeerMisbehaved { peer: server, violation };

    let mut ctl = backend.map_grants(server, &[ring_ref], true)?;
    // If we die, the hypervisor clears our live byte and signals the server.
    ctl.set_unmap_notify(layout::CLI_LIVE, Some(port))?;
    let page = ctl.region().clone();
    let orders = RingOrders::from_control_word(page.load_u32(layout::ORDERS)).map_err(misbehaved)?;

    let (left, right, rings) = place_rings(&page, orders, |ring, slots| {
        let n = slots.len();
        // Each grant ref is read once from the (untrusted) page; the hypervisor checks that it
        // is a live grant to us.
        let refs: Vec<GrantRef> = slots.map(|slot| GrantRef(page.load_u32(grant_slot(slot)))).collect();
        // We write the left ring and only read the right one (libxenvchan maps it read-only).
        let mapped = backend.map_grants(server, &refs, ring == Ring::Left)?;
        let region = mapped.region().clone();
        if region.len() != n * PAGE_SIZE {
            return Err(LinkError::Backend(BackendError::InvalidArgument(format!(
                "mapped {} bytes for {n} ring pages",
                region.len()
            ))));
        }
        Ok((mapped, region))
    })?;
    let endpoint = Endpoint::join_client(page.clone(), left, right, orders);
    Ok(Handshake {
        endpoint,
        peer: server,
        evtchn,
        port,
        pages: Pages::Client { _ctl: ctl, _rings: rings },
        published: None,
    })
}

/// Waits until `ring-ref` and `event-channel` under `path` are published and parses them.
async fn wait_published<B: Backend>(
    backend: &B,
    path: &str,
    server: DomId,
) -> Result<(GrantRef, EvtchnPort), LinkError> {
    let store = backend.store();
    let watch = register(store.watch(path)?)?;
    loop {
        if let Some(found) = read_published(store, path, server)? {
            return Ok(found);
        }
        let mut guard = watch.readable().await?;
        while watch.get_ref().0.try_next()?.is_some() {}
        guard.clear_ready();
    }
}

/// Reads the published `ring-ref` and `event-channel` under `path`; `None` until both are there.
fn read_published<S: Store>(
    store: &S,
    path: &str,
    server: DomId,
) -> Result<Option<(GrantRef, EvtchnPort)>, LinkError> {
    let read = |key: &'static str| -> Result<Option<u32>, LinkError> {
        match store.read(&format!("{path}/{key}")) {
            // Created but not yet written (see `listen`).
            Ok(v) if v.is_empty() => Ok(None),
            Ok(v) => parse_decimal(key, &v)
                .map(Some)
                .map_err(|violation| LinkError::PeerMisbehaved { peer: server, violation }),
            Err(BackendError::NotFound(_)) | Err(BackendError::PermissionDenied(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    // ring-ref is written last: once it is there, event-channel must be too.
    let Some(ring_ref) = read("ring-ref")? else { return Ok(None) };
    let Some(port) = read("event-channel")? else { return Ok(None) };
    Ok(Some((GrantRef(ring_ref), EvtchnPort(port))))
}

/// Parses a non-zero decimal u32 published by the (untrusted) server.
fn parse_decimal(what: &'static str, raw: &[u8]) -> Result<u32, PeerMisbehaved> {
    let bad = || PeerMisbehaved::BadStoreValue {
        what,
        value: String::from_utf8_lossy(&raw[..raw.len().min(32)]).into(),
    };
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    match text.trim_end_matches('\0').parse::<u32>() {
        Ok(v) if v != 0 => Ok(v),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_values_are_parsed_strictly() {
        assert_eq!(parse_decimal("ring-ref", b"42").ok(), Some(42));
        assert_eq!(parse_decimal("ring-ref", b"42\0").ok(), Some(42));
        for bad in [&b"0"[..], b"-1", b"", b"4294967296", b"12ab", b"\xff\xfe"] {
            assert!(parse_decimal("ring-ref", bad).is_err(), "{bad:?}");
        }
    }

    /// Places rings of `orders` over an anonymous control page, recording each call for pages.
    fn placed(orders: RingOrders) -> (Vec<(Ring, Range<usize>)>, Region, Region, Region) {
        let page = Region::anonymous(PAGE_SIZE);
        let mut calls = Vec::new();
        let (left, right, kept) = place_rings(&page, orders, |ring, slots| {
            calls.push((ring, slots.clone()));
            Ok((slots.len(), Region::anonymous(slots.len() * PAGE_SIZE)))
        })
        .unwrap();
        assert_eq!(kept, calls.iter().map(|(_, s)| s.len()).collect::<Vec<_>>());
        (calls, page, left, right)
    }

    #[test]
    fn small_rings_live_in_the_control_page_and_large_ones_take_grant_slots_in_order() {
        let (calls, page, left, right) = placed(RingOrders { left: 10, right: 11 });
        assert!(calls.is_empty());
        assert_eq!(left.as_ptr(), page.sub(layout::SMALL_RING_OFFSET, 1 << 10).as_ptr());
        assert_eq!(right.as_ptr(), page.sub(layout::LARGE_RING_OFFSET, 1 << 11).as_ptr());
        assert_eq!((left.len(), right.len()), (1 << 10, 1 << 11));

        // Left ring 2 pages, right ring 4 pages: slots 0..2 then 2..6.
        let (calls, _, left, right) = placed(RingOrders { left: 13, right: 14 });
        assert_eq!(calls, [(Ring::Left, 0..2), (Ring::Right, 2..6)]);
        assert_eq!((left.len(), right.len()), (2 * PAGE_SIZE, 4 * PAGE_SIZE));

        // An in-page left ring takes no slot: the right ring's pages start at slot 0.
        let (calls, page, left, _) = placed(RingOrders { left: 11, right: 12 });
        assert_eq!(calls, [(Ring::Right, 0..1)]);
        assert_eq!(left.as_ptr(), page.sub(layout::LARGE_RING_OFFSET, 1 << 11).as_ptr());
    }
}
