//! [`Netlink`]: the network service on the kernel of the namespace the daemon runs in.
//!
//! The kernel holds the truth about links; the service adds what the kernel does not keep for a
//! vif (what it is made of, the guest's MAC address and namespace, the addresses it may send
//! from, its rate) in one table, and serializes the calls that change anything, so that two
//! calls never interleave their netlink requests. Events come from the kernel's link
//! notifications ([`super::monitor`]), never from the calls, so that a change is published once
//! whoever made it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use dombus::{Events, Topic, TopicLimits};
use rtnetlink::packet_route::link::InfoKind;

use super::kernel::{Kernel, Link, errno_of};
use super::monitor::{Monitor, MonitorTask};
use super::netns::{GuestNamespaces, Namespace, block_on_in};
use super::spoof::AntiSpoof;
use super::{
    BridgeInfo, Counters, Mac, Network, NetworkError, NetworkEvent, NetworkState, Rate, VifId, VifInfo,
    VifKind, shape,
};

/// The most bridges the service makes.
pub const DEFAULT_MAX_BRIDGES: usize = 64;
/// The most vifs the service makes.
pub const DEFAULT_MAX_VIFS: usize = 1024;
/// The MTU of a bridge made without one, and of a vif with neither bridge nor MTU.
pub const DEFAULT_MTU: u32 = 1500;

/// How the network service runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Where the guests' namespaces are held (`<dir>/dom<domid>`).
    pub guest_netns_dir: PathBuf,
    /// The `nft` program the anti-spoofing rules are loaded with.
    pub nft: PathBuf,
    /// The name of the service's nftables table (family `netdev`).
    pub nft_table: String,
    /// The domains that are the toolstack: the only callers that may manage the network.
    /// Callers over Unix or TCP (the same host's processes) are the toolstack too.
    pub toolstack_domains: Vec<u32>,
    /// The most bridges the service makes.
    pub max_bridges: usize,
    /// The most vifs the service makes.
    pub max_vifs: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            guest_netns_dir: PathBuf::from("/run/dombus/netns"),
            nft: PathBuf::from("nft"),
            nft_table: "dombus".into(),
            toolstack_domains: vec![0],
            max_bridges: DEFAULT_MAX_BRIDGES,
            max_vifs: DEFAULT_MAX_VIFS,
        }
    }
}

/// What the service keeps about a vif that the kernel does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VifConfig {
    pub kind: VifKind,
    /// The guest's MAC address, when the service made the vif.
    pub mac: Option<Mac>,
    pub addresses: Vec<IpAddr>,
    pub rate: Option<Rate>,
    pub guest_netns: Option<PathBuf>,
}

/// The network service on netlink (see the module's documentation).
#[derive(Clone)]
pub struct Netlink {
    inner: Arc<Inner>,
}

struct Inner {
    kernel: Kernel,
    guests: GuestNamespaces,
    spoof: AntiSpoof,
    config: NetworkConfig,
    vifs: Arc<Mutex<BTreeMap<VifId, VifConfig>>>,
    events: Topic<NetworkEvent, NetworkState>,
    monitor: Monitor,
    _monitor_task: MonitorTask,
    /// Held by every call that changes something, for the whole call.
    changing: tokio::sync::Mutex<()>,
}

impl Netlink {
    /// Starts the service in this thread's network namespace: a netlink connection, the
    /// monitor of its links, the nftables table (emptied of a previous run's rules).
    pub async fn start(config: NetworkConfig) -> Result<Netlink, NetworkError> {
        let kernel = Kernel::connect()?;
        let guests = GuestNamespaces::new(config.guest_netns_dir.clone())
            .map_err(|e| NetworkError::ToolFailed { tool: "namespaces".into(), message: e.to_string() })?;
        let spoof = AntiSpoof::new(config.nft.clone(), config.nft_table.clone());
        // A previous run's rules go. Without nft the service still runs: only anti-spoofing
        // calls fail, each saying why.
        if let Err(e) = spoof.clear_all().await {
            tracing::warn!("anti-spoofing rules cannot be managed: {e}");
        }
        let vifs = Arc::new(Mutex::new(BTreeMap::new()));
        let events = Topic::new(TopicLimits::default());
        let (monitor, monitor_task) = Monitor::start(events.clone(), Arc::clone(&vifs)).await?;
        Ok(Netlink {
            inner: Arc::new(Inner {
                kernel,
                guests,
                spoof,
                config,
                vifs,
                events,
                monitor,
                _monitor_task: monitor_task,
                changing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The guests' namespaces.
    pub fn guests(&self) -> &GuestNamespaces {
        &self.inner.guests
    }

    /// Lets every guest namespace go and removes the anti-spoofing table: the daemon's stop.
    pub async fn shut_down(&self) {
        let _held = self.inner.changing.lock().await;
        if let Err(e) = self.inner.spoof.clear_all().await {
            tracing::warn!("removing the anti-spoofing rules: {e}");
        }
        if let Err(e) = self.inner.guests.remove_all() {
            tracing::warn!("letting the guests' namespaces go: {e}");
        }
    }

    fn vifs(&self) -> MutexGuard<'_, BTreeMap<VifId, VifConfig>> {
        self.inner.vifs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses a caller that is not the toolstack.
    fn require_toolstack(&self, operation: &str) -> Result<(), NetworkError> {
        match dombus::rpc::current_caller().and_then(|c| c.domain) {
            Some(d) if !self.inner.config.toolstack_domains.contains(&d) => {
                Err(NetworkError::PermissionDenied {
                    operation: operation.to_owned(),
                    reason: format!(
                        "domain {d} is not the toolstack (domains {:?}): only the toolstack manages the network",
                        self.inner.config.toolstack_domains
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// The whole state now, read from the kernel.
    async fn state(&self) -> Result<NetworkState, NetworkError> {
        let links = self.inner.kernel.links().await?;
        Ok(state_of(&links, &self.vifs()))
    }

    async fn bridge(&self, name: &str) -> Result<Link, NetworkError> {
        match self.inner.kernel.link(name).await? {
            Some(l) if l.is_bridge() => Ok(l),
            _ => Err(NetworkError::NotFound { what: "bridge".into(), name: name.to_owned() }),
        }
    }

    /// The backend end of `vif`, which must exist.
    async fn vif_link(&self, vif: VifId) -> Result<Link, NetworkError> {
        let name = vif.link_name();
        self.inner.kernel.link(&name).await?.ok_or(NetworkError::NotFound { what: "vif".into(), name })
    }

    async fn vif_info_now(&self, vif: VifId) -> Result<VifInfo, NetworkError> {
        let link = self.vif_link(vif).await?;
        let links = self.inner.kernel.links().await?;
        let bridges = bridge_names(&links);
        Ok(vif_info(vif, &link, self.vifs().get(&vif), &bridges))
    }

    /// Runs `work` with a netlink connection to the namespace of `vif`'s guest.
    async fn in_guest<T, F, Fut>(&self, vif: VifId, what: &str, work: F) -> Result<T, NetworkError>
    where
        T: Send + 'static,
        F: FnOnce(Kernel) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, NetworkError>>,
    {
        let ns = self.vifs().get(&vif).and_then(|c| c.guest_netns.clone()).ok_or_else(|| {
            NetworkError::Unsupported { reason: format!("vif {vif} has no guest namespace here ({what})") }
        })?;
        let done = tokio::task::spawn_blocking(move || {
            block_on_in(Namespace::Path(ns), move || async move { work(Kernel::connect()?).await })
        })
        .await
        .map_err(|e| NetworkError::ToolFailed { tool: "namespaces".into(), message: e.to_string() })?;
        done.map_err(|e| NetworkError::ToolFailed {
            tool: "namespaces".into(),
            message: format!("{what}: {e}"),
        })?
    }

    /// The guest's end of `vif` (in the guest's namespace), changed by `change`.
    async fn change_guest_end(
        &self,
        vif: VifId,
        what: &'static str,
        change: impl FnOnce(
            rtnetlink::LinkMessageBuilder<rtnetlink::LinkUnspec>,
        ) -> rtnetlink::LinkMessageBuilder<rtnetlink::LinkUnspec>
        + Send
        + 'static,
    ) -> Result<(), NetworkError> {
        let guest = vif.guest_name();
        self.in_guest(vif, what, move |k| async move {
            let end = k
                .link(&guest)
                .await?
                .ok_or(NetworkError::NotFound { what: "vif".into(), name: guest.clone() })?;
            k.change(end.index, &format!("RTM_NEWLINK {what} of {guest} (the guest's end)"), change).await
        })
        .await
    }

    /// Forgets what the service keeps of the vifs that have no link among `links` (deleted
    /// behind its back), and lets their guests' namespaces go when no vif uses them.
    fn forget_gone(&self, links: &[Link]) {
        let gone: Vec<VifId> =
            self.vifs().keys().filter(|v| !links.iter().any(|l| l.name == v.link_name())).copied().collect();
        for vif in gone {
            self.vifs().remove(&vif);
            self.release_guest_if_unused(vif.domid);
        }
    }

    /// Whether `vif` has anti-spoofing rules: the service sets them, and removed every
    /// earlier run's at its start.
    fn has_rules(&self, vif: VifId) -> bool {
        self.vifs().get(&vif).is_some_and(|c| !c.addresses.is_empty())
    }

    /// Lets the namespace of `domid` go when none of its vifs uses it any more.
    fn release_guest_if_unused(&self, domid: u32) {
        let used = self.vifs().iter().any(|(v, c)| v.domid == domid && c.guest_netns.is_some());
        if !used && let Err(e) = self.inner.guests.remove(domid) {
            tracing::warn!(domid, "letting the guest's namespace go: {e}");
        }
    }

    async fn do_vif_create(
        &self,
        vif: VifId,
        kind: VifKind,
        bridge: Option<String>,
        mac: Mac,
        mtu: Option<u32>,
    ) -> Result<VifInfo, NetworkError> {
        if let Some(reason) = mac.unusable() {
            return Err(NetworkError::InvalidMac { mac, reason: reason.into() });
        }
        if let Some(mtu) = mtu {
            check_mtu(mtu)?;
        }
        let name = vif.link_name();
        if self.inner.kernel.link(&name).await?.is_some() {
            return Err(NetworkError::AlreadyExists { name });
        }
        // What the service keeps of a vif deleted behind its back is forgotten here.
        let links = self.inner.kernel.links().await?;
        self.forget_gone(&links);
        if self.vifs().len() >= self.inner.config.max_vifs {
            return Err(NetworkError::TooMany {
                what: "vifs".into(),
                limit: self.inner.config.max_vifs as u64,
            });
        }
        let bridge = match &bridge {
            Some(b) => Some(self.bridge(b).await?),
            None => None,
        };
        let mtu = mtu.or(bridge.as_ref().map(|b| b.mtu)).unwrap_or(DEFAULT_MTU);
        let guest_netns = match kind {
            VifKind::Veth => {
                let guests = self.inner.guests.clone();
                let path = tokio::task::spawn_blocking(move || guests.ensure(vif.domid))
                    .await
                    .map_err(|e| NetworkError::ToolFailed {
                        tool: "namespaces".into(),
                        message: e.to_string(),
                    })?
                    .map_err(|e| NetworkError::ToolFailed {
                        tool: "namespaces".into(),
                        message: format!("the namespace of domain {}: {e}", vif.domid),
                    })?;
                Some(path)
            }
            VifKind::Tap => None,
        };
        // Known before the link appears, so that the monitor's first event of it is whole.
        let config = VifConfig {
            kind,
            mac: Some(mac),
            addresses: vec![],
            rate: None,
            guest_netns: guest_netns.clone(),
        };
        self.vifs().insert(vif, config);
        let made = self.make_vif(vif, kind, bridge.as_ref(), mac, mtu, guest_netns).await;
        if let Err(e) = made {
            if let Ok(Some(link)) = self.inner.kernel.link(&name).await {
                let _ = self.inner.kernel.delete(link.index, &name).await;
            }
            self.vifs().remove(&vif);
            self.release_guest_if_unused(vif.domid);
            return Err(e);
        }
        self.vif_info_now(vif).await
    }

    async fn make_vif(
        &self,
        vif: VifId,
        kind: VifKind,
        bridge: Option<&Link>,
        mac: Mac,
        mtu: u32,
        guest_netns: Option<PathBuf>,
    ) -> Result<(), NetworkError> {
        let name = vif.link_name();
        let k = &self.inner.kernel;
        match (kind, guest_netns) {
            (VifKind::Veth, Some(ns)) => {
                let file = std::fs::File::open(&ns).map_err(|e| NetworkError::ToolFailed {
                    tool: "namespaces".into(),
                    message: format!("opening {}: {e}", ns.display()),
                })?;
                let added = k.add_veth(&name, Mac::BACKEND, mtu, &vif.guest_name(), mac, file.as_fd()).await;
                if let Err(e) = added {
                    return Err(match errno_of(&e) {
                        Some(libc::EEXIST) => NetworkError::AlreadyExists {
                            name: format!("{} in the namespace of domain {}", vif.guest_name(), vif.domid),
                        },
                        _ => e,
                    });
                }
            }
            _ => {
                let tap = name.clone();
                tokio::task::spawn_blocking(move || make_tap(&tap))
                    .await
                    .map_err(|e| NetworkError::ToolFailed { tool: "tun".into(), message: e.to_string() })??;
            }
        }
        let link = self.vif_link(vif).await?;
        if kind == VifKind::Tap {
            k.change(link.index, &format!("RTM_NEWLINK address and MTU of {name}"), |b| {
                b.address(Mac::BACKEND.0.to_vec()).mtu(mtu)
            })
            .await?;
        }
        if let Some(bridge) = bridge {
            k.change(link.index, &format!("RTM_NEWLINK {name} master {}", bridge.name), |b| {
                b.controller(bridge.index)
            })
            .await?;
        }
        k.change(link.index, &format!("RTM_NEWLINK {name} up"), |b| b.up()).await
    }
}

/// Makes the persistent tap `name`, down. The kernel refuses taps over netlink: tun-rs opens
/// `/dev/net/tun`, and the tap outlives the descriptor as a persistent one.
fn make_tap(name: &str) -> Result<(), NetworkError> {
    let fail = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AlreadyExists || e.raw_os_error() == Some(libc::EBUSY) {
            NetworkError::AlreadyExists { name: name.to_owned() }
        } else if e.kind() == std::io::ErrorKind::PermissionDenied {
            NetworkError::PermissionDenied { operation: format!("TUNSETIFF {name}"), reason: e.to_string() }
        } else {
            NetworkError::Kernel {
                operation: format!("TUNSETIFF tap {name}"),
                errno: e.raw_os_error().unwrap_or(0),
                message: e.to_string(),
            }
        }
    };
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .layer(tun_rs::Layer::L2)
        .enable(false)
        .build_sync()
        .map_err(fail)?;
    dev.persist().map_err(fail)
}

/// Refuses an MTU no Ethernet link can have (the kernel refuses more, per driver).
fn check_mtu(mtu: u32) -> Result<(), NetworkError> {
    if !(68..=65535).contains(&mtu) {
        return Err(NetworkError::InvalidMtu { mtu, reason: "not within 68 to 65535".into() });
    }
    Ok(())
}

/// Refuses a bridge name the kernel or the service cannot take.
fn check_bridge_name(name: &str) -> Result<(), NetworkError> {
    let bad = |reason: &str| Err(NetworkError::InvalidName { name: name.to_owned(), reason: reason.into() });
    if name.is_empty() || name.len() > 15 {
        return bad("a link's name is 1 to 15 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return bad("only A-Z a-z 0-9 _ - may be used");
    }
    if VifId::from_link_name(name).is_some() {
        return bad("vif<domid>.<devid> names are the vifs'");
    }
    Ok(())
}

/// Refuses an address no guest may send from.
fn check_address(a: &IpAddr) -> Result<(), NetworkError> {
    let reason = if a.is_unspecified() {
        "the unspecified address"
    } else if a.is_multicast() {
        "a multicast address"
    } else if matches!(a, IpAddr::V4(v4) if v4.is_broadcast()) {
        "the broadcast address"
    } else {
        return Ok(());
    };
    Err(NetworkError::InvalidAddress { address: a.to_string(), reason: reason.into() })
}

/// The bridges among `links`, by index.
pub(crate) fn bridge_names(links: &[Link]) -> BTreeMap<u32, String> {
    links.iter().filter(|l| l.is_bridge()).map(|l| (l.index, l.name.clone())).collect()
}

/// What the service shows of the vif `vif`, whose end here is `link`.
pub(crate) fn vif_info(
    vif: VifId,
    link: &Link,
    config: Option<&VifConfig>,
    bridges: &BTreeMap<u32, String>,
) -> VifInfo {
    let kind = config
        .map_or(if link.kind == Some(InfoKind::Tun) { VifKind::Tap } else { VifKind::Veth }, |c| c.kind);
    VifInfo {
        vif,
        name: link.name.clone(),
        kind,
        mac: config.and_then(|c| c.mac),
        mtu: link.mtu,
        bridge: link.master.and_then(|m| bridges.get(&m).cloned()),
        up: link.up,
        state: link.state,
        addresses: config.map(|c| c.addresses.clone()).unwrap_or_default(),
        rate: config.and_then(|c| c.rate),
        guest_netns: config.and_then(|c| c.guest_netns.as_ref()).map(|p| p.display().to_string()),
    }
}

/// The bridges and vifs among `links`, with what the service keeps about the vifs.
pub(crate) fn state_of(links: &[Link], vifs: &BTreeMap<VifId, VifConfig>) -> NetworkState {
    let bridges = bridge_names(links);
    let mut state = NetworkState::default();
    for l in links {
        if l.is_bridge() {
            let mut members: Vec<String> =
                links.iter().filter(|m| m.master == Some(l.index)).map(|m| m.name.clone()).collect();
            members.sort();
            state.bridges.push(BridgeInfo {
                name: l.name.clone(),
                mtu: l.mtu,
                mac: l.mac,
                up: l.up,
                state: l.state,
                members,
            });
        } else if let Some(vif) = VifId::from_link_name(&l.name) {
            state.vifs.push(vif_info(vif, l, vifs.get(&vif), &bridges));
        }
    }
    state.bridges.sort_by(|a, b| a.name.cmp(&b.name));
    state.vifs.sort_by_key(|v| v.vif);
    state
}

impl Network for Netlink {
    async fn bridge_create(&self, name: String, mtu: Option<u32>) -> Result<BridgeInfo, NetworkError> {
        self.require_toolstack("bridge-create")?;
        check_bridge_name(&name)?;
        let mtu = mtu.unwrap_or(DEFAULT_MTU);
        check_mtu(mtu)?;
        let _held = self.inner.changing.lock().await;
        if self.inner.kernel.link(&name).await?.is_some() {
            return Err(NetworkError::AlreadyExists { name });
        }
        let links = self.inner.kernel.links().await?;
        if links.iter().filter(|l| l.is_bridge()).count() >= self.inner.config.max_bridges {
            return Err(NetworkError::TooMany {
                what: "bridges".into(),
                limit: self.inner.config.max_bridges as u64,
            });
        }
        self.inner.kernel.add_bridge(&name, mtu).await.map_err(|e| match errno_of(&e) {
            Some(libc::EEXIST) => NetworkError::AlreadyExists { name: name.clone() },
            _ => e,
        })?;
        let state = self.state().await?;
        tracing::info!(bridge = %name, mtu, "bridge created");
        state
            .bridges
            .into_iter()
            .find(|b| b.name == name)
            .ok_or(NetworkError::NotFound { what: "bridge".into(), name })
    }

    async fn bridge_delete(&self, name: String) -> Result<(), NetworkError> {
        self.require_toolstack("bridge-delete")?;
        let _held = self.inner.changing.lock().await;
        let bridge = self.bridge(&name).await?;
        let links = self.inner.kernel.links().await?;
        let mut members: Vec<String> =
            links.iter().filter(|l| l.master == Some(bridge.index)).map(|l| l.name.clone()).collect();
        if !members.is_empty() {
            members.sort();
            return Err(NetworkError::Busy { name, members });
        }
        self.inner.kernel.delete(bridge.index, &name).await?;
        tracing::info!(bridge = %name, "bridge deleted");
        Ok(())
    }

    async fn bridge_list(&self) -> Result<Vec<BridgeInfo>, NetworkError> {
        self.require_toolstack("bridge-list")?;
        Ok(self.state().await?.bridges)
    }

    async fn vif_create(
        &self,
        vif: VifId,
        kind: Option<VifKind>,
        bridge: Option<String>,
        mac: Option<Mac>,
        mtu: Option<u32>,
    ) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-create")?;
        let _held = self.inner.changing.lock().await;
        let kind = kind.unwrap_or_default();
        let info = self.do_vif_create(vif, kind, bridge, mac.unwrap_or_else(Mac::random_xen), mtu).await?;
        tracing::info!(%vif, ?kind, bridge = ?info.bridge, "vif created");
        Ok(info)
    }

    async fn vif_delete(&self, vif: VifId) -> Result<(), NetworkError> {
        self.require_toolstack("vif-delete")?;
        let _held = self.inner.changing.lock().await;
        let link = match self.vif_link(vif).await {
            Ok(link) => link,
            Err(e) => {
                // Deleted behind the service's back: what it kept of the vif goes too.
                if self.vifs().remove(&vif).is_some() {
                    self.release_guest_if_unused(vif.domid);
                }
                return Err(e);
            }
        };
        if self.has_rules(vif) {
            self.inner.spoof.clear(&link.name).await?;
        }
        self.inner.kernel.delete(link.index, &link.name).await?;
        self.vifs().remove(&vif);
        self.release_guest_if_unused(vif.domid);
        tracing::info!(%vif, "vif deleted");
        Ok(())
    }

    async fn vif_attach(&self, vif: VifId, bridge: String) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-attach")?;
        let _held = self.inner.changing.lock().await;
        let link = self.vif_link(vif).await?;
        let bridge = self.bridge(&bridge).await?;
        let what = format!("RTM_NEWLINK {} master {}", link.name, bridge.name);
        self.inner.kernel.change(link.index, &what, |b| b.controller(bridge.index)).await?;
        self.vif_info_now(vif).await
    }

    async fn vif_detach(&self, vif: VifId) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-detach")?;
        let _held = self.inner.changing.lock().await;
        let link = self.vif_link(vif).await?;
        let what = format!("RTM_NEWLINK {} nomaster", link.name);
        self.inner.kernel.change(link.index, &what, |b| b.nocontroller()).await?;
        self.vif_info_now(vif).await
    }

    async fn vif_set_mac(&self, vif: VifId, mac: Mac) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-set-mac")?;
        if let Some(reason) = mac.unusable() {
            return Err(NetworkError::InvalidMac { mac, reason: reason.into() });
        }
        let _held = self.inner.changing.lock().await;
        let link = self.vif_link(vif).await?;
        if self.vifs().get(&vif).is_some_and(|c| c.guest_netns.is_some()) {
            self.change_guest_end(vif, "address", move |b| b.address(mac.0.to_vec())).await?;
        }
        self.vifs().entry(vif).or_insert_with(|| adopted(&link)).mac = Some(mac);
        self.inner.monitor.refresh();
        self.vif_info_now(vif).await
    }

    async fn vif_set_mtu(&self, vif: VifId, mtu: u32) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-set-mtu")?;
        check_mtu(mtu)?;
        let _held = self.inner.changing.lock().await;
        let link = self.vif_link(vif).await?;
        let what = format!("RTM_NEWLINK {} mtu {mtu}", link.name);
        self.inner.kernel.change(link.index, &what, |b| b.mtu(mtu)).await.map_err(|e| {
            match errno_of(&e) {
                Some(libc::EINVAL) => {
                    NetworkError::InvalidMtu { mtu, reason: format!("the kernel refused it: {e}") }
                }
                _ => e,
            }
        })?;
        if self.vifs().get(&vif).is_some_and(|c| c.guest_netns.is_some()) {
            self.change_guest_end(vif, "mtu", move |b| b.mtu(mtu)).await?;
        }
        self.vif_info_now(vif).await
    }

    async fn vif_set_up(&self, vif: VifId, up: bool) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-set-up")?;
        let _held = self.inner.changing.lock().await;
        let link = self.vif_link(vif).await?;
        let what = format!("RTM_NEWLINK {} {}", link.name, if up { "up" } else { "down" });
        self.inner.kernel.change(link.index, &what, |b| if up { b.up() } else { b.down() }).await?;
        self.vif_info_now(vif).await
    }

    async fn vif_set_addresses(&self, vif: VifId, addresses: Vec<IpAddr>) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-set-addresses")?;
        addresses.iter().try_for_each(check_address)?;
        if addresses.len() > 64 {
            return Err(NetworkError::TooMany { what: "addresses of a vif".into(), limit: 64 });
        }
        let mut addresses = addresses;
        addresses.sort();
        addresses.dedup();
        let _held = self.inner.changing.lock().await;
        let link = self.vif_link(vif).await?;
        self.inner.spoof.set(&link.name, &addresses).await?;
        self.vifs().entry(vif).or_insert_with(|| adopted(&link)).addresses = addresses;
        self.inner.monitor.refresh();
        self.vif_info_now(vif).await
    }

    async fn vif_set_rate(&self, vif: VifId, rate: Option<Rate>) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-set-rate")?;
        if let Some(reason) = rate.as_ref().and_then(Rate::invalid) {
            let rate = rate.map_or_else(String::new, |r| r.to_string());
            return Err(NetworkError::InvalidRate { rate, reason });
        }
        let _held = self.inner.changing.lock().await;
        let link = self.vif_link(vif).await?;
        if self.vifs().get(&vif).is_none_or(|c| c.guest_netns.is_none()) {
            return Err(NetworkError::Unsupported {
                reason: format!(
                    "a rate on {}: the limit is a queue on the guest's end of a veth vif, and this vif has none \
                     here (a tap's guest end is its device model's)",
                    link.name
                ),
            });
        }
        let guest = vif.guest_name();
        let mtu = link.mtu;
        // The rate as the kernel holds it: a burst raised to one frame shows as its interval.
        let applied = self
            .in_guest(vif, "rate", move |k| async move {
                let end = k
                    .link(&guest)
                    .await?
                    .ok_or(NetworkError::NotFound { what: "vif".into(), name: guest })?;
                match rate {
                    Some(rate) => shape::set_rate(k.handle(), end.index, mtu, rate).await?,
                    None => shape::clear_rate(k.handle(), end.index).await?,
                }
                shape::current_rate(k.handle(), end.index).await
            })
            .await?;
        if let Some(c) = self.vifs().get_mut(&vif) {
            c.rate = applied;
        }
        self.inner.monitor.refresh();
        self.vif_info_now(vif).await
    }

    async fn vif_info(&self, vif: VifId) -> Result<VifInfo, NetworkError> {
        self.require_toolstack("vif-info")?;
        self.vif_info_now(vif).await
    }

    async fn vif_list(&self, guest: Option<u32>) -> Result<Vec<VifInfo>, NetworkError> {
        self.require_toolstack("vif-list")?;
        let mut vifs = self.state().await?.vifs;
        vifs.retain(|v| guest.is_none_or(|d| v.vif.domid == d));
        Ok(vifs)
    }

    async fn vif_counters(&self, vif: VifId) -> Result<Counters, NetworkError> {
        self.require_toolstack("vif-counters")?;
        let link = self.vif_link(vif).await?;
        let spoofed_dropped =
            if self.has_rules(vif) { self.inner.spoof.dropped(&link.name).await? } else { 0 };
        Ok(Counters { spoofed_dropped, ..link.counters })
    }

    async fn events(&self) -> Events<NetworkEvent, NetworkState> {
        if let Err(e) = self.require_toolstack("events") {
            return Events::refused(std::io::ErrorKind::PermissionDenied, e.to_string());
        }
        let monitor = self.inner.monitor.clone();
        self.inner.events.events().with_snapshot(move || monitor.state())
    }
}

/// What the service keeps about a vif it did not make (made behind its back, or before its
/// start): what the kernel says of it.
fn adopted(link: &Link) -> VifConfig {
    VifConfig {
        kind: if link.kind == Some(InfoKind::Tun) { VifKind::Tap } else { VifKind::Veth },
        mac: None,
        addresses: vec![],
        rate: None,
        guest_netns: None,
    }
}
