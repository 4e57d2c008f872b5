//! The kernel's links over rtnetlink: what the service reads of a link ([`Link`]) and the
//! requests it makes (bridges, veth pairs, an end's MAC, MTU, bridge and state, deletion), with
//! the kernel's errors named by their operation ([`kernel_error`]).
//!
//! A connection belongs to the namespace its socket was made in: [`Kernel::connect`] on a
//! thread inside another namespace (see `netns::block_on_in`) reaches that namespace's links.

use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec};

use super::kernel_error::kernel_error;
use super::{Counters, Mac, NetworkError, OperState};

/// A link as the kernel describes it (`RTM_NEWLINK`), reduced to what the service shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    /// Its index in its namespace.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its kind (`bridge`, `veth`, `tun`), when it has one.
    pub kind: Option<InfoKind>,
    /// Its MTU.
    pub mtu: u32,
    /// Its MAC address, when it has a six-byte one.
    pub mac: Option<Mac>,
    /// Whether it is set up.
    pub up: bool,
    /// Its operational state.
    pub state: OperState,
    /// The index of the bridge it is attached to.
    pub master: Option<u32>,
    /// What it counted.
    pub counters: Counters,
}

impl Link {
    /// The link a kernel message describes; `None` without a name (a message the service
    /// cannot place).
    pub fn from_message(m: &LinkMessage) -> Option<Link> {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            kind: None,
            mtu: 0,
            mac: None,
            up: m.header.flags.contains(LinkFlags::Up),
            state: OperState::Unknown,
            master: None,
            counters: Counters::default(),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Mtu(v) => link.mtu = *v,
                LinkAttribute::Address(b) => link.mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac),
                LinkAttribute::Controller(i) => link.master = Some(*i).filter(|i| *i != 0),
                LinkAttribute::OperState(s) => link.state = oper_state(*s),
                LinkAttribute::LinkInfo(infos) => {
                    link.kind = infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.clone()),
                        _ => None,
                    });
                }
                LinkAttribute::Stats64(s) => {
                    link.counters = Counters {
                        rx_bytes: s.rx_bytes,
                        rx_packets: s.rx_packets,
                        rx_errors: s.rx_errors,
                        rx_dropped: s.rx_dropped,
                        tx_bytes: s.tx_bytes,
                        tx_packets: s.tx_packets,
                        tx_errors: s.tx_errors,
                        tx_dropped: s.tx_dropped,
                        spoofed_dropped: 0,
                    };
                }
                _ => {}
            }
        }
        (!link.name.is_empty()).then_some(link)
    }

    /// Whether it is a bridge.
    pub fn is_bridge(&self) -> bool {
        self.kind == Some(InfoKind::Bridge)
    }
}

fn oper_state(s: State) -> OperState {
    match s {
        State::Up => OperState::Up,
        State::Down => OperState::Down,
        State::LowerLayerDown => OperState::LowerLayerDown,
        State::Dormant => OperState::Dormant,
        State::Testing => OperState::Testing,
        State::NotPresent => OperState::NotPresent,
        _ => OperState::Unknown,
    }
}

/// The errno of a kernel refusal, if it is one.
pub(crate) fn errno_of(e: &NetworkError) -> Option<i32> {
    match e {
        NetworkError::Kernel { errno, .. } => Some(*errno),
        _ => None,
    }
}

/// A netlink connection to the links of one namespace.
#[derive(Clone)]
pub(crate) struct Kernel {
    handle: Handle,
}

impl Kernel {
    /// A connection to this thread's namespace, driven by a task on the current runtime.
    pub fn connect() -> Result<Kernel, NetworkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetworkError::Kernel {
            operation: "opening a netlink socket".into(),
            errno: e.raw_os_error().unwrap_or(0),
            message: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(Kernel { handle })
    }

    /// The connection whose requests go through `handle` (a connection driven elsewhere).
    pub fn from_handle(handle: Handle) -> Kernel {
        Kernel { handle }
    }

    /// The netlink handle (for the requests rtnetlink has no builder for).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetworkError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| kernel_error("RTM_GETLINK (all links)", e))?;
        Ok(messages.iter().filter_map(Link::from_message).collect())
    }

    /// The link `name`, or `None` when there is none.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetworkError> {
        let got: Result<Vec<LinkMessage>, _> =
            self.handle.link().get().match_name(name.to_owned()).execute().try_collect().await;
        match got {
            Ok(m) => Ok(m.iter().find_map(Link::from_message)),
            Err(e) => {
                let e = kernel_error(&format!("RTM_GETLINK {name}"), e);
                if errno_of(&e) == Some(libc::ENODEV) { Ok(None) } else { Err(e) }
            }
        }
    }

    /// Adds the bridge `name` with `mtu`, up, with an address of its own (see
    /// [`Mac::random_local`]).
    pub async fn add_bridge(&self, name: &str, mtu: u32) -> Result<(), NetworkError> {
        let m = LinkBridge::new(name).mtu(mtu).address(Mac::random_local().0.to_vec()).up().build();
        self.handle
            .link()
            .add(m)
            .execute()
            .await
            .map_err(|e| kernel_error(&format!("RTM_NEWLINK bridge {name}"), e))
    }

    /// Adds the veth pair `name` (here, with `mac` and `mtu`, down) and `peer` (with
    /// `peer_mac` and `mtu`, made right in the namespace of `peer_netns`, an open namespace
    /// file).
    pub async fn add_veth(
        &self,
        name: &str,
        mac: Mac,
        mtu: u32,
        peer: &str,
        peer_mac: Mac,
        peer_netns: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), NetworkError> {
        use std::os::fd::AsRawFd as _;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_owned())
            .address(peer_mac.0.to_vec())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let m = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_owned())
            .address(mac.0.to_vec())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(m)
            .execute()
            .await
            .map_err(|e| kernel_error(&format!("RTM_NEWLINK veth {name}"), e))
    }

    /// Changes the link `index` (`what` names the change in an error): the builder it is given
    /// starts from the link's index alone.
    pub async fn change(
        &self,
        index: u32,
        what: &str,
        change: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
    ) -> Result<(), NetworkError> {
        let m = change(LinkUnspec::new_with_index(index)).build();
        self.handle.link().set(m).execute().await.map_err(|e| kernel_error(what, e))
    }

    /// Deletes the link `index` (`name` for an error).
    pub async fn delete(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| kernel_error(&format!("RTM_DELLINK {name}"), e))
    }
}
