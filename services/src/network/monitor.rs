//! The monitor of the daemon's links: the kernel's link notifications (`RTNLGRP_LINK`) turned
//! into [`NetworkEvent`]s, whoever made the change.
//!
//! The monitor keeps the links as the kernel last described them: each notification carries a
//! whole link (`RTM_NEWLINK`) or its end (`RTM_DELLINK`) and replaces what was known of it, and
//! after each the difference between the state published last and the state now is published
//! ([`diff`]). So a vif that comes and goes between two reads is seen coming and going. Where
//! notifications were lost (the socket overran under a burst), and where something the kernel
//! does not announce changed (a vif's addresses or rate), it reads every link again instead:
//! a late event, never a wrong state, and what a subscriber builds from a snapshot and the
//! events is the kernel's state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::kernel::{Kernel, Link};
use super::service::{VifConfig, state_of};
use super::{NetworkError, NetworkEvent, NetworkState, VifId};
use dombus::Topic;

/// The published state of the links, and how to publish a change (cheap to clone).
#[derive(Clone)]
pub(crate) struct Monitor {
    shared: Arc<Shared>,
}

struct Shared {
    kernel: Kernel,
    topic: Topic<NetworkEvent, NetworkState>,
    vifs: Arc<Mutex<BTreeMap<VifId, VifConfig>>>,
    /// The links as the kernel last described them, by index, and the state published last.
    view: Mutex<(BTreeMap<u32, Link>, NetworkState)>,
    /// Wakes the task to read the links again (a change the kernel does not announce: a vif's
    /// addresses or rate).
    poke: tokio::sync::Notify,
}

/// The monitor's task, stopped when this is dropped.
pub(crate) struct MonitorTask(tokio::task::AbortHandle);

impl Drop for MonitorTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Monitor {
    /// Subscribes to the link notifications of this thread's namespace, reads the links once
    /// (the state a first subscriber gets) and starts following them.
    pub async fn start(
        topic: Topic<NetworkEvent, NetworkState>,
        vifs: Arc<Mutex<BTreeMap<VifId, VifConfig>>>,
    ) -> Result<(Monitor, MonitorTask), NetworkError> {
        let (conn, handle, mut messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .map_err(|e| NetworkError::Kernel {
                operation: "subscribing to the link notifications (RTNLGRP_LINK)".into(),
                errno: e.raw_os_error().unwrap_or(0),
                message: e.to_string(),
            })?;
        let conn = tokio::spawn(conn);
        let kernel = Kernel::from_handle(handle);
        let links = kernel.links().await?;
        let state = state_of(&links, &vifs.lock().unwrap_or_else(|p| p.into_inner()));
        let links = links.into_iter().map(|l| (l.index, l)).collect();
        let shared = Arc::new(Shared {
            kernel,
            topic,
            vifs,
            view: Mutex::new((links, state)),
            poke: tokio::sync::Notify::new(),
        });
        let monitor = Monitor { shared: Arc::clone(&shared) };
        let follow = monitor.clone();
        let task = tokio::spawn(async move {
            loop {
                let reread = tokio::select! {
                    m = messages.next() => match m.map(|(m, _)| m.payload) {
                        // The bridge's own notifications of its ports (family AF_BRIDGE) say
                        // less of a link than the link's own: they are not its description.
                        Some(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)))
                            if m.header.interface_family == AddressFamily::Unspec =>
                        {
                            if let Some(link) = Link::from_message(&m) {
                                follow.apply(|links| {
                                    links.insert(link.index, link);
                                });
                            }
                            false
                        }
                        // A port leaving a bridge is an AF_BRIDGE deletion: the link stays.
                        Some(NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)))
                            if m.header.interface_family == AddressFamily::Unspec =>
                        {
                            follow.apply(|links| {
                                links.remove(&m.header.index);
                            });
                            false
                        }
                        Some(NetlinkPayload::Overrun(_)) => true,
                        Some(_) => false,
                        None => {
                            tracing::error!("the link notifications ended: no more network events");
                            break;
                        }
                    },
                    () = follow.shared.poke.notified() => true,
                };
                if reread && let Err(e) = follow.read_and_publish().await {
                    tracing::warn!("reading the links again: {e}");
                }
            }
            conn.abort();
        });
        Ok((monitor, MonitorTask(task.abort_handle())))
    }

    /// Makes the monitor read the links again soon and publish what changed (for a change the
    /// kernel does not announce).
    pub fn refresh(&self) {
        self.shared.poke.notify_one();
    }

    /// The state published last: a new subscriber's snapshot.
    pub fn state(&self) -> NetworkState {
        self.shared.view.lock().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    /// Reads every link again, and publishes what changed.
    async fn read_and_publish(&self) -> Result<(), NetworkError> {
        let links = self.shared.kernel.links().await?;
        self.apply(|known| *known = links.into_iter().map(|l| (l.index, l)).collect());
        Ok(())
    }

    /// Changes the links known with `change`, and publishes what that changed.
    fn apply(&self, change: impl FnOnce(&mut BTreeMap<u32, Link>)) {
        let mut view = self.shared.view.lock().unwrap_or_else(|p| p.into_inner());
        let (links, published) = &mut *view;
        change(links);
        let links: Vec<Link> = links.values().cloned().collect();
        let now = state_of(&links, &self.shared.vifs.lock().unwrap_or_else(|p| p.into_inner()));
        for event in diff(published, &now) {
            self.shared.topic.publish(event);
        }
        *published = now;
    }
}

/// The events that take `old` to `new`: bridges added or changed, vifs added or changed, vifs
/// removed, bridges removed (so that a vif is never shown on a bridge the subscriber has not
/// seen).
pub(crate) fn diff(old: &NetworkState, new: &NetworkState) -> Vec<NetworkEvent> {
    let mut events = Vec::new();
    let old_bridges: BTreeMap<_, _> = old.bridges.iter().map(|b| (b.name.as_str(), b)).collect();
    let new_bridges: BTreeMap<_, _> = new.bridges.iter().map(|b| (b.name.as_str(), b)).collect();
    let old_vifs: BTreeMap<_, _> = old.vifs.iter().map(|v| (v.vif, v)).collect();
    let new_vifs: BTreeMap<_, _> = new.vifs.iter().map(|v| (v.vif, v)).collect();
    for (name, b) in &new_bridges {
        match old_bridges.get(name) {
            None => events.push(NetworkEvent::BridgeAdded((*b).clone())),
            Some(was) if was != b => events.push(NetworkEvent::BridgeChanged((*b).clone())),
            Some(_) => {}
        }
    }
    for (id, v) in &new_vifs {
        match old_vifs.get(id) {
            None => events.push(NetworkEvent::VifAdded((*v).clone())),
            Some(was) if was != v => events.push(NetworkEvent::VifChanged((*v).clone())),
            Some(_) => {}
        }
    }
    for id in old_vifs.keys().filter(|id| !new_vifs.contains_key(id)) {
        events.push(NetworkEvent::VifRemoved { vif: *id });
    }
    for name in old_bridges.keys().filter(|n| !new_bridges.contains_key(*n)) {
        events.push(NetworkEvent::BridgeRemoved { name: (*name).to_owned() });
    }
    events
}

/// `state` with `event` applied, as a subscriber keeps it (for the tests of [`diff`]).
#[cfg(test)]
pub(crate) fn apply(state: &mut NetworkState, event: &NetworkEvent) {
    match event {
        NetworkEvent::BridgeAdded(b) | NetworkEvent::BridgeChanged(b) => {
            state.bridges.retain(|x| x.name != b.name);
            state.bridges.push(b.clone());
            state.bridges.sort_by(|a, b| a.name.cmp(&b.name));
        }
        NetworkEvent::BridgeRemoved { name } => state.bridges.retain(|x| &x.name != name),
        NetworkEvent::VifAdded(v) | NetworkEvent::VifChanged(v) => {
            state.vifs.retain(|x| x.vif != v.vif);
            state.vifs.push(v.clone());
            state.vifs.sort_by_key(|v| v.vif);
        }
        NetworkEvent::VifRemoved { vif } => state.vifs.retain(|x| x.vif != *vif),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::network::{BridgeInfo, OperState, VifInfo, VifKind};

    fn bridge(name: &str, mtu: u32) -> BridgeInfo {
        BridgeInfo { name: name.into(), mtu, mac: None, up: true, state: OperState::Up, members: vec![] }
    }

    fn vif(domid: u32, mtu: u32, bridge: Option<&str>) -> VifInfo {
        VifInfo {
            vif: VifId { domid, devid: 0 },
            name: format!("vif{domid}.0"),
            kind: VifKind::Veth,
            mac: None,
            mtu,
            bridge: bridge.map(Into::into),
            up: true,
            state: OperState::Up,
            addresses: vec![],
            rate: None,
            guest_netns: None,
        }
    }

    fn state() -> impl Strategy<Value = NetworkState> {
        let bridges = proptest::collection::btree_map(0u8..4, 1000u32..1003, 0..4);
        let vifs =
            proptest::collection::btree_map(0u32..5, (1000u32..1003, proptest::option::of(0u8..4)), 0..5);
        (bridges, vifs).prop_map(|(b, v)| NetworkState {
            bridges: b.into_iter().map(|(n, mtu)| bridge(&format!("br{n}"), mtu)).collect(),
            vifs: v
                .into_iter()
                .map(|(d, (mtu, br))| vif(d, mtu, br.map(|n| format!("br{n}")).as_deref()))
                .collect(),
        })
    }

    proptest! {
        /// Applying the difference of two states to the first gives the second, and two equal
        /// states differ by nothing.
        #[test]
        fn a_difference_takes_one_state_to_the_other(old in state(), new in state()) {
            let mut s = old.clone();
            for e in diff(&old, &new) {
                apply(&mut s, &e);
            }
            prop_assert_eq!(&s, &new);
            prop_assert!(diff(&new, &new).is_empty());
        }
    }

    /// One change is one event of the right kind; added bridges come before the vifs on them,
    /// removed ones after.
    #[test]
    fn one_change_is_one_event_in_an_order_a_subscriber_can_follow() {
        let empty = NetworkState::default();
        let one = NetworkState { bridges: vec![bridge("br0", 1500)], vifs: vec![vif(3, 1500, Some("br0"))] };
        assert_eq!(
            diff(&empty, &one),
            [
                NetworkEvent::BridgeAdded(bridge("br0", 1500)),
                NetworkEvent::VifAdded(vif(3, 1500, Some("br0")))
            ]
        );
        let mut changed = one.clone();
        changed.vifs[0].up = false;
        assert_eq!(diff(&one, &changed), [NetworkEvent::VifChanged(changed.vifs[0].clone())]);
        assert_eq!(
            diff(&one, &empty),
            [
                NetworkEvent::VifRemoved { vif: VifId { domid: 3, devid: 0 } },
                NetworkEvent::BridgeRemoved { name: "br0".into() }
            ]
        );
    }
}
