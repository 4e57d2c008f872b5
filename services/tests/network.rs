//! The network service on the real kernel, each test in network namespaces it makes: bridges,
//! vifs (veth and tap), every method and error, real traffic through a bridge both ways,
//! anti-spoofing on real packets, a rate limit measured on real traffic, events for changes
//! made through the service and behind its back, and who may call.
//!
//! The tests check what the service did with the kernel's own tools (`ip`, `nsenter`), never
//! with the service's answers alone.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TempDir, missing_prerequisite, sim_net};
use dombus::rpc::events::is_final;
use dombus::sim::SimHypervisor;
use dombus::{Address, ResyncReason, Server, ServerConfig, Subscription, Update};
use dombus_services::network::netns::{Namespace, block_on_in};
use dombus_services::network::{
    Mac, Netlink, Network, NetworkClient, NetworkConfig, NetworkError, NetworkEvent, NetworkState, OperState,
    Rate, VifId, VifInfo, VifKind, guest,
};
use dombus_services::ports;
use futures::StreamExt as _;

fn vif(domid: u32, devid: u32) -> VifId {
    VifId { domid, devid }
}

/// The network domain of one test: the service started in a new namespace, its guests'
/// namespaces under a directory of the test's (let go however the test ends).
struct Domain {
    net: Netlink,
    _dir: TempDir,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = self.net.guests().remove_all();
    }
}

/// Runs `test` in a new network namespace with a network service of its own; false (the test
/// did not run) where this machine cannot make namespaces or lacks `nft` (a failure in CI).
fn in_network_domain<F, Fut>(name: &'static str, test: F) -> bool
where
    F: FnOnce(Domain) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    in_network_domain_with(name, |_| {}, test)
}

/// [`in_network_domain`], with the service's configuration changed by `configure`.
fn in_network_domain_with<F, Fut>(
    name: &'static str,
    configure: impl FnOnce(&mut NetworkConfig) + Send + 'static,
    test: F,
) -> bool
where
    F: FnOnce(Domain) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if let Err(e) = block_on_in(Namespace::New, || async {}) {
        missing_prerequisite(name, &format!("cannot make a network namespace ({e}): run as root"));
        return false;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        missing_prerequisite(name, "nft is not installed (apt-get install nftables)");
        return false;
    }
    block_on_in(Namespace::New, move || async move {
        let dir = TempDir::new(name);
        let mut config = NetworkConfig { guest_netns_dir: dir.path("netns"), ..NetworkConfig::default() };
        configure(&mut config);
        let net = Netlink::start(config).await.unwrap();
        test(Domain { net, _dir: dir }).await;
    })
    .unwrap();
    true
}

/// What `ip -j -d link show NAME` says of a link in this thread's namespace (or the one at
/// `ns`), or `None` when there is no such link.
fn ip_link(ns: Option<&Path>, name: &str) -> Option<serde_json::Value> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    let out = cmd.args(["-j", "-d", "link", "show", name]).output().unwrap();
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.get(0).cloned()
}

/// Runs `ip ARGS` in this thread's namespace: a change behind the service's back.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn kernel_says(link: &serde_json::Value, key: &str) -> serde_json::Value {
    link.get(key).cloned().unwrap_or(serde_json::Value::Null)
}

fn guest_ns(info: &VifInfo) -> PathBuf {
    PathBuf::from(info.guest_netns.as_ref().expect("a veth vif has a guest namespace"))
}

/// Every bridge method and error, checked against the kernel.
#[test]
fn bridges_are_made_listed_and_deleted_with_every_error() {
    in_network_domain("bridges_are_made_listed_and_deleted_with_every_error", |d| async move {
        let n = &d.net;
        let br = n.bridge_create("xenbr0".into(), Some(9000)).await.unwrap();
        assert_eq!((br.name.as_str(), br.mtu, br.up, br.members.len()), ("xenbr0", 9000, true, 0));
        let k = ip_link(None, "xenbr0").expect("the kernel has the bridge");
        assert_eq!(kernel_says(&k, "mtu"), 9000);
        assert_eq!(k["linkinfo"]["info_kind"], "bridge");
        assert!(k["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
        assert_eq!(n.bridge_create("br1".into(), None).await.unwrap().mtu, 1500);
        let names: Vec<String> = n.bridge_list().await.unwrap().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["br1", "xenbr0"]);

        assert!(matches!(
            n.bridge_create("xenbr0".into(), None).await,
            Err(NetworkError::AlreadyExists { .. })
        ));
        // A name taken by a link of another kind is taken too.
        assert!(matches!(n.bridge_create("lo".into(), None).await, Err(NetworkError::AlreadyExists { .. })));
        for bad in ["", "sixteen-bytes-xx", "a b", "vif3.0", "br/0"] {
            let r = n.bridge_create(bad.into(), None).await;
            assert!(matches!(r, Err(NetworkError::InvalidName { .. })), "{bad:?}: {r:?}");
        }
        for mtu in [0, 67, 65536] {
            let r = n.bridge_create("br2".into(), Some(mtu)).await;
            assert!(matches!(r, Err(NetworkError::InvalidMtu { .. })), "{mtu}: {r:?}");
        }
        assert!(ip_link(None, "br2").is_none());

        // A bridge with a member is busy; without, it goes.
        n.vif_create(vif(3, 0), None, Some("xenbr0".into()), None, None).await.unwrap();
        match n.bridge_delete("xenbr0".into()).await {
            Err(NetworkError::Busy { name, members }) => {
                assert_eq!((name.as_str(), members), ("xenbr0", vec!["vif3.0".into()]))
            }
            other => panic!("deleting a bridge with a member: {other:?}"),
        }
        n.vif_detach(vif(3, 0)).await.unwrap();
        n.bridge_delete("xenbr0".into()).await.unwrap();
        assert!(ip_link(None, "xenbr0").is_none());
        assert!(matches!(n.bridge_delete("xenbr0".into()).await, Err(NetworkError::NotFound { .. })));
        // `lo` is no bridge.
        assert!(matches!(n.bridge_delete("lo".into()).await, Err(NetworkError::NotFound { .. })));
    });
}

/// A veth vif's whole life: both ends as asked (checked in both namespaces), every change,
/// every error, and the guest's namespace let go with its last vif.
#[test]
fn a_veth_vifs_every_method_and_error() {
    in_network_domain("a_veth_vifs_every_method_and_error", |d| async move {
        let n = &d.net;
        n.bridge_create("xenbr0".into(), Some(1400)).await.unwrap();
        n.bridge_create("xenbr1".into(), None).await.unwrap();
        let mac: Mac = "00:16:3e:01:02:03".parse().unwrap();
        let v = n.vif_create(vif(3, 0), None, Some("xenbr0".into()), Some(mac), None).await.unwrap();
        assert_eq!(
            (v.name.as_str(), v.kind, v.mac, v.mtu, v.bridge.as_deref(), v.up),
            ("vif3.0", VifKind::Veth, Some(mac), 1400, Some("xenbr0"), true)
        );
        let ns = guest_ns(&v);
        assert!(ns.ends_with("dom3"), "{}", ns.display());
        // This domain's end: Xen's backend address, the bridge's MTU, on the bridge, up.
        let k = ip_link(None, "vif3.0").unwrap();
        assert_eq!(k["address"], "fe:ff:ff:ff:ff:ff");
        assert_eq!(k["mtu"], 1400);
        assert_eq!(k["master"], "xenbr0");
        assert!(k["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
        // The guest's end, in the guest's namespace: the guest's address and the MTU.
        let g = ip_link(Some(&ns), "eth0").expect("the guest's end is in its namespace");
        assert_eq!((g["address"].as_str(), g["mtu"].as_u64()), (Some("00:16:3e:01:02:03"), Some(1400)));
        assert!(ip_link(None, "eth0").is_none(), "the guest's end is not in the network domain");
        // The bridge keeps its own address with Xen's backend address on a port.
        assert_ne!(ip_link(None, "xenbr0").unwrap()["address"], "fe:ff:ff:ff:ff:ff");

        // Errors of creation.
        let r = n.vif_create(vif(3, 0), None, None, None, None).await;
        assert!(matches!(r, Err(NetworkError::AlreadyExists { .. })), "{r:?}");
        let r = n.vif_create(vif(3, 1), None, Some("nobridge".into()), None, None).await;
        assert!(matches!(r, Err(NetworkError::NotFound { ref what, .. }) if what == "bridge"), "{r:?}");
        let r = n.vif_create(vif(3, 1), None, None, Some("01:00:5e:00:00:01".parse().unwrap()), None).await;
        assert!(matches!(r, Err(NetworkError::InvalidMac { .. })), "{r:?}");
        let r = n.vif_create(vif(3, 1), None, None, Some(Mac([0; 6])), None).await;
        assert!(matches!(r, Err(NetworkError::InvalidMac { .. })), "{r:?}");
        let r = n.vif_create(vif(3, 1), None, None, None, Some(20)).await;
        assert!(matches!(r, Err(NetworkError::InvalidMtu { .. })), "{r:?}");
        assert!(ip_link(None, "vif3.1").is_none(), "a refused vif leaves no link");
        // A second vif of the guest: its namespace is shared; without a bridge, MTU 1500 and
        // a random address of Xen's range.
        let v1 = n.vif_create(vif(3, 1), None, None, None, None).await.unwrap();
        assert_eq!((v1.mtu, v1.bridge.clone(), guest_ns(&v1)), (1500, None, ns.clone()));
        assert_eq!(v1.mac.unwrap().0[..3], [0x00, 0x16, 0x3e]);

        // Attach, move, detach.
        let moved = n.vif_attach(vif(3, 0), "xenbr1".into()).await.unwrap();
        assert_eq!(moved.bridge.as_deref(), Some("xenbr1"));
        assert_eq!(ip_link(None, "vif3.0").unwrap()["master"], "xenbr1");
        let detached = n.vif_detach(vif(3, 0)).await.unwrap();
        assert_eq!(detached.bridge, None);
        assert!(ip_link(None, "vif3.0").unwrap().get("master").is_none());
        let r = n.vif_attach(vif(3, 0), "nobridge".into()).await;
        assert!(matches!(r, Err(NetworkError::NotFound { .. })), "{r:?}");
        n.vif_attach(vif(3, 0), "xenbr0".into()).await.unwrap();

        // MTU on both ends; the kernel's own refusal named.
        assert_eq!(n.vif_set_mtu(vif(3, 0), 1300).await.unwrap().mtu, 1300);
        assert_eq!(ip_link(None, "vif3.0").unwrap()["mtu"], 1300);
        assert_eq!(ip_link(Some(&ns), "eth0").unwrap()["mtu"], 1300);
        let r = n.vif_set_mtu(vif(3, 0), 10).await;
        assert!(matches!(r, Err(NetworkError::InvalidMtu { .. })), "{r:?}");
        // The guest's MAC address is its end's.
        let mac2: Mac = "00:16:3e:0a:0b:0c".parse().unwrap();
        assert_eq!(n.vif_set_mac(vif(3, 0), mac2).await.unwrap().mac, Some(mac2));
        assert_eq!(ip_link(Some(&ns), "eth0").unwrap()["address"], "00:16:3e:0a:0b:0c");
        let r = n.vif_set_mac(vif(3, 0), "ff:ff:ff:ff:ff:ff".parse().unwrap()).await;
        assert!(matches!(r, Err(NetworkError::InvalidMac { .. })), "{r:?}");
        // Down and up.
        let down = n.vif_set_up(vif(3, 0), false).await.unwrap();
        assert_eq!((down.up, down.state), (false, OperState::Down));
        assert!(!ip_link(None, "vif3.0").unwrap()["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
        assert!(n.vif_set_up(vif(3, 0), true).await.unwrap().up);
        // Addresses and rates refused before anything is changed.
        for bad in ["224.0.0.1", "0.0.0.0", "255.255.255.255", "ff02::1", "::"] {
            let r = n.vif_set_addresses(vif(3, 0), vec![bad.parse().unwrap()]).await;
            assert!(matches!(r, Err(NetworkError::InvalidAddress { .. })), "{bad}: {r:?}");
        }
        let r = n.vif_set_rate(vif(3, 0), Some(Rate { bytes_per_sec: 100, interval_us: 50_000 })).await;
        assert!(matches!(r, Err(NetworkError::InvalidRate { .. })), "{r:?}");

        // Info and lists.
        assert_eq!(n.vif_info(vif(3, 0)).await.unwrap().mac, Some(mac2));
        let ids: Vec<VifId> = n.vif_list(None).await.unwrap().iter().map(|v| v.vif).collect();
        assert_eq!(ids, [vif(3, 0), vif(3, 1)]);
        assert_eq!(n.vif_list(Some(3)).await.unwrap().len(), 2);
        assert!(n.vif_list(Some(4)).await.unwrap().is_empty());

        // Deletion: both ends; the namespace goes with the guest's last vif.
        n.vif_delete(vif(3, 0)).await.unwrap();
        assert!(ip_link(None, "vif3.0").is_none() && ip_link(Some(&ns), "eth0").is_none());
        assert!(d.net.guests().exists(3), "vif 3.1 still uses the namespace");
        n.vif_delete(vif(3, 1)).await.unwrap();
        assert!(!d.net.guests().exists(3) && !ns.exists(), "the guest's last vif lets its namespace go");

        // Every method on a vif that is not there.
        let gone = vif(3, 0);
        let not_found = |r: Result<VifInfo, NetworkError>| matches!(r, Err(NetworkError::NotFound { .. }));
        assert!(matches!(n.vif_delete(gone).await, Err(NetworkError::NotFound { .. })));
        assert!(not_found(n.vif_info(gone).await));
        assert!(not_found(n.vif_attach(gone, "xenbr0".into()).await));
        assert!(not_found(n.vif_detach(gone).await));
        assert!(not_found(n.vif_set_mac(gone, mac).await));
        assert!(not_found(n.vif_set_mtu(gone, 1500).await));
        assert!(not_found(n.vif_set_up(gone, true).await));
        assert!(not_found(n.vif_set_addresses(gone, vec![]).await));
        assert!(not_found(n.vif_set_rate(gone, None).await));
        assert!(matches!(n.vif_counters(gone).await, Err(NetworkError::NotFound { .. })));
    });
}

/// A tap vif: made persistent and down by tun, then as a veth's end here; no guest namespace,
/// so no rate; deleted.
#[test]
fn a_tap_vif() {
    in_network_domain("a_tap_vif", |d| async move {
        let n = &d.net;
        n.bridge_create("xenbr0".into(), None).await.unwrap();
        let mac: Mac = "00:16:3e:00:00:05".parse().unwrap();
        let t = n
            .vif_create(vif(5, 0), Some(VifKind::Tap), Some("xenbr0".into()), Some(mac), Some(1450))
            .await
            .unwrap();
        assert_eq!(
            (t.kind, t.mac, t.mtu, t.bridge.as_deref(), t.guest_netns.clone()),
            (VifKind::Tap, Some(mac), 1450, Some("xenbr0"), None)
        );
        let k = ip_link(None, "vif5.0").unwrap();
        assert_eq!(k["linkinfo"]["info_kind"], "tun");
        assert_eq!(k["linkinfo"]["info_data"]["type"], "tap");
        assert_eq!(k["linkinfo"]["info_data"]["persist"], true);
        assert_eq!(
            (k["address"].as_str(), k["mtu"].as_u64(), k["master"].as_str()),
            (Some("fe:ff:ff:ff:ff:ff"), Some(1450), Some("xenbr0"))
        );
        // Nobody has the tap open: up, without carrier.
        assert_eq!(t.state, OperState::Down);
        let r = n.vif_set_rate(vif(5, 0), Some("1M/s".parse().unwrap())).await;
        assert!(matches!(r, Err(NetworkError::Unsupported { .. })), "{r:?}");
        assert!(matches!(
            n.vif_create(vif(5, 0), Some(VifKind::Tap), None, None, None).await,
            Err(NetworkError::AlreadyExists { .. })
        ));
        n.vif_delete(vif(5, 0)).await.unwrap();
        assert!(ip_link(None, "vif5.0").is_none());
    });
}

/// Two guests on one bridge, each with its address: `count` UDP datagrams from `from` to `to`
/// (guests 3 and 4, at 10.0.0.3 and 10.0.0.4), and how many arrived within `wait`.
fn udp_delivered(from: &UdpSocket, to: &UdpSocket, count: usize, wait: Duration) -> usize {
    let target = to.local_addr().unwrap();
    for i in 0..count {
        from.send_to(format!("datagram {i}").as_bytes(), target).unwrap();
    }
    to.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + wait;
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while got < count && Instant::now() < deadline {
        if let Ok((_, src)) = to.recv_from(&mut buf) {
            if src == from.local_addr().unwrap() {
                got += 1;
            }
        }
    }
    got
}

/// Two guests on `xenbr0` with addresses 10.0.0.<domid>/24, and a UDP socket in each.
async fn two_guests(n: &Netlink) -> (UdpSocket, UdpSocket) {
    n.bridge_create("xenbr0".into(), None).await.unwrap();
    let mut sockets = Vec::new();
    for domid in [3, 4] {
        let v = n.vif_create(vif(domid, 0), None, Some("xenbr0".into()), None, None).await.unwrap();
        let ns = guest_ns(&v);
        let addr: IpAddr = format!("10.0.0.{domid}").parse().unwrap();
        guest::configure(&ns, "eth0", addr, 24).unwrap();
        sockets.push(guest::udp_socket(&ns, SocketAddr::new(addr, 7000)).unwrap());
    }
    let b = sockets.pop().unwrap();
    (sockets.pop().unwrap(), b)
}

/// Real UDP between two guests' namespaces through the bridge, both ways, and the vifs'
/// counters count it.
#[test]
fn traffic_crosses_the_bridge_both_ways_and_is_counted() {
    in_network_domain("traffic_crosses_the_bridge_both_ways_and_is_counted", |d| async move {
        let n = &d.net;
        let (g3, g4) = two_guests(n).await;
        let before = n.vif_counters(vif(3, 0)).await.unwrap();
        assert_eq!(udp_delivered(&g3, &g4, 50, Duration::from_secs(10)), 50, "guest 3 to guest 4");
        assert_eq!(udp_delivered(&g4, &g3, 50, Duration::from_secs(10)), 50, "guest 4 to guest 3");
        let after = n.vif_counters(vif(3, 0)).await.unwrap();
        // vif3.0 received what guest 3 sent (50 datagrams, and ARP), and sent it what guest 4 did.
        assert!(after.rx_packets >= before.rx_packets + 50, "{before:?} → {after:?}");
        assert!(after.tx_packets >= before.tx_packets + 50, "{before:?} → {after:?}");
        assert!(after.rx_bytes >= before.rx_bytes + 50 * 50);
        // A vif set down carries nothing; up again, it does.
        n.vif_set_up(vif(4, 0), false).await.unwrap();
        assert_eq!(udp_delivered(&g3, &g4, 5, Duration::from_millis(500)), 0, "through a vif set down");
        n.vif_set_up(vif(4, 0), true).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while udp_delivered(&g3, &g4, 1, Duration::from_millis(300)) == 0 {
            assert!(Instant::now() < deadline, "the vif set up again carries nothing");
        }
    });
}

/// With addresses given, a datagram from an allowed source passes and one from another source
/// is dropped (and counted); without them, both pass.
#[test]
fn only_allowed_source_addresses_leave_a_vif() {
    in_network_domain("only_allowed_source_addresses_leave_a_vif", |d| async move {
        let n = &d.net;
        let (g3, g4) = two_guests(n).await;
        let ns3 = guest_ns(&n.vif_info(vif(3, 0)).await.unwrap());
        // Guest 3 takes a second address it was not given.
        guest::configure(&ns3, "eth0", "10.0.0.99".parse().unwrap(), 24).unwrap();
        let spoofer = guest::udp_socket(&ns3, "10.0.0.99:7001".parse().unwrap()).unwrap();
        // Learn the neighbours first, so that only the IP rule can stop what follows.
        assert_eq!(udp_delivered(&g3, &g4, 1, Duration::from_secs(10)), 1);
        assert_eq!(
            udp_delivered(&spoofer, &g4, 1, Duration::from_secs(10)),
            1,
            "no rules yet: every source passes"
        );

        let info = n.vif_set_addresses(vif(3, 0), vec!["10.0.0.3".parse().unwrap()]).await.unwrap();
        assert_eq!(info.addresses, ["10.0.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(udp_delivered(&g3, &g4, 20, Duration::from_secs(10)), 20, "the allowed source passes");
        assert_eq!(
            udp_delivered(&spoofer, &g4, 20, Duration::from_millis(700)),
            0,
            "the spoofed source is dropped"
        );
        let c = n.vif_counters(vif(3, 0)).await.unwrap();
        assert!(c.spoofed_dropped >= 20, "{c:?}");
        // Guest 4 has no rules: anything it sends passes.
        assert_eq!(udp_delivered(&g4, &g3, 5, Duration::from_secs(10)), 5);

        // Lifted: both pass again.
        assert!(n.vif_set_addresses(vif(3, 0), vec![]).await.unwrap().addresses.is_empty());
        assert_eq!(udp_delivered(&spoofer, &g4, 20, Duration::from_secs(10)), 20, "rules lifted");
    });
}

/// A rate limit measured on real traffic: a guest sending as fast as it can gets through at
/// the rate within 25 % (its burst counted); without the limit, the same sender moves more
/// than three times as much.
#[test]
fn a_rate_limit_holds_on_real_traffic() {
    in_network_domain("a_rate_limit_holds_on_real_traffic", |d| async move {
        let n = &d.net;
        let (g3, g4) = two_guests(n).await;
        assert_eq!(udp_delivered(&g3, &g4, 1, Duration::from_secs(10)), 1);
        let rate: Rate = "2M/s@50ms".parse().unwrap();
        let window = Duration::from_millis(1500);
        let unlimited = blast(&g3, &g4, window);
        let info = n.vif_set_rate(vif(3, 0), Some(rate)).await.unwrap();
        assert_eq!(info.rate, Some(rate));
        let limited = blast(&g3, &g4, window);
        let expected = rate.bytes_per_sec as f64 * window.as_secs_f64() + rate.burst_bytes() as f64;
        let ratio = limited as f64 / expected;
        assert!(
            (0.75..=1.25).contains(&ratio),
            "{limited} bytes through a limit of {rate} in {window:?}: {ratio:.2} of {expected:.0}"
        );
        assert!(
            unlimited as f64 > 3.0 * expected,
            "without the limit only {unlimited} bytes moved (the limit's {expected:.0})"
        );
        // Lifted: fast again.
        assert_eq!(n.vif_set_rate(vif(3, 0), None).await.unwrap().rate, None);
        let lifted = blast(&g3, &g4, window);
        assert!(lifted as f64 > 3.0 * expected, "after lifting the limit only {lifted} bytes moved");
    });
}

/// Sends 1 KiB datagrams from `from` to `to` as fast as it can for `window`, and returns the
/// bytes `to` received in it.
fn blast(from: &UdpSocket, to: &UdpSocket, window: Duration) -> u64 {
    let target = to.local_addr().unwrap();
    let payload = [0x5au8; 1024];
    let from = from.try_clone().unwrap();
    from.set_nonblocking(true).unwrap();
    let sender = std::thread::spawn(move || {
        let end = Instant::now() + window;
        while Instant::now() < end {
            // A full queue refuses some: that is the limit at work.
            let _ = from.send_to(&payload, target);
        }
    });
    to.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let end = Instant::now() + window;
    let mut got = 0u64;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        if let Ok(len) = to.recv(&mut buf) {
            got += len as u64;
        }
    }
    sender.join().unwrap();
    // What is still queued arrived late: drain it uncounted.
    to.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while to.recv(&mut buf).is_ok() {}
    got
}

/// The next update of `sub` within 20 s (failed polls retried), or a panic.
async fn next_update(
    sub: &mut Subscription<NetworkEvent, NetworkState>,
) -> Update<NetworkEvent, NetworkState> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("an update within 20 s")
        {
            Some(Ok(u)) => return u,
            Some(Err(e)) => assert!(!is_final(&e), "the subscription ended: {e}"),
            None => panic!("the subscription ended"),
        }
    }
}

/// The events of `sub` until one matches `wanted` (at most 20 s), with those before it.
async fn until(
    sub: &mut Subscription<NetworkEvent, NetworkState>,
    wanted: impl Fn(&NetworkEvent) -> bool,
) -> Vec<NetworkEvent> {
    let mut seen = Vec::new();
    loop {
        match next_update(sub).await {
            Update::Event { event, .. } => {
                let done = wanted(&event);
                seen.push(event);
                if done {
                    return seen;
                }
            }
            Update::Resync { reason, .. } => panic!("a resync ({reason:?}) after {seen:?}"),
        }
    }
}

fn ctx() -> dombus::context::Context {
    let mut c = dombus::context::current();
    c.deadline = Instant::now() + Duration::from_secs(30);
    c
}

/// Over link sockets between simulated domains: the toolstack's domain subscribes and sees,
/// after a snapshot of the state, every change once — the service's and those made behind its
/// back with `ip` — and a guest's domain is refused every call and the stream.
#[test]
fn events_follow_every_change_and_only_the_toolstack_may_call() {
    in_network_domain("events_follow_every_change_and_only_the_toolstack_may_call", |d| async move {
        const TOOLSTACK: u16 = 0;
        const NETWORK: u16 = 4;
        const GUEST: u16 = 7;
        let dir = TempDir::new("network-events");
        let sock = dir.path("simxen.sock");
        let _hv = SimHypervisor::spawn(&sock).unwrap();
        let server = Server::new(sim_net(&sock, NETWORK), ServerConfig::default());
        let addr: Address = format!("xen:{NETWORK}:{}", ports::NETWORK).parse().unwrap();
        let _serving = server.serve(&addr, d.net.clone().into_service()).await.unwrap();
        d.net.bridge_create("xenbr0".into(), None).await.unwrap();

        // A guest's domain may not manage the network, nor watch it.
        let guest = NetworkClient::connect(sim_net(&sock, GUEST), addr.clone()).await.unwrap();
        match guest.bridge_create(ctx(), "evil".into(), None).await.unwrap() {
            Err(NetworkError::PermissionDenied { operation, reason }) => {
                assert_eq!(operation, "bridge-create");
                assert!(reason.contains("domain 7 is not the toolstack"), "{reason}");
            }
            other => panic!("a guest created a bridge: {other:?}"),
        }
        assert!(matches!(
            guest.vif_list(ctx(), None).await.unwrap(),
            Err(NetworkError::PermissionDenied { .. })
        ));
        assert!(matches!(
            guest.vif_create(ctx(), vif(7, 0), None, None, None, None).await.unwrap(),
            Err(NetworkError::PermissionDenied { .. })
        ));
        assert!(ip_link(None, "evil").is_none() && ip_link(None, "vif7.0").is_none());
        let mut refused = guest.events();
        match tokio::time::timeout(Duration::from_secs(20), refused.next()).await.unwrap() {
            Some(Err(e)) => {
                assert!(is_final(&e), "{e:?}");
                let dombus::RpcError::Server(s) = e else { panic!("not the server's refusal: {e:?}") };
                assert_eq!(s.kind, std::io::ErrorKind::PermissionDenied, "{s:?}");
                assert!(s.detail.contains("domain 7 is not the toolstack"), "{s:?}");
            }
            other => panic!("a guest watched the network: {other:?}"),
        }

        let ts = NetworkClient::connect(sim_net(&sock, TOOLSTACK), addr.clone()).await.unwrap();
        let mut sub = ts.events().wait(Duration::from_millis(500));
        match next_update(&mut sub).await {
            Update::Resync { reason: ResyncReason::Start, snapshot: Some(s), .. } => {
                assert_eq!(s.bridges.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["xenbr0"]);
                assert!(s.vifs.is_empty());
            }
            other => panic!("first update: {other:?}"),
        }

        // Through the service.
        ts.vif_create(ctx(), vif(3, 0), None, Some("xenbr0".into()), None, None).await.unwrap().unwrap();
        // The vif appears, and the bridge gains it as a member: one or two changes, as the kernel
        // announced them, so in either order.
        let added = |e: &NetworkEvent| matches!(e, NetworkEvent::VifAdded(_));
        let member =
            |e: &NetworkEvent| matches!(e, NetworkEvent::BridgeChanged(b) if b.members == ["vif3.0"]);
        let mut seen = until(&mut sub, |e| added(e) || member(e)).await;
        if !seen.iter().any(added) {
            seen.extend(until(&mut sub, added).await);
        } else if !seen.iter().any(member) {
            seen.extend(until(&mut sub, member).await);
        }
        let vifs: Vec<&VifInfo> = seen
            .iter()
            .filter_map(|e| if let NetworkEvent::VifAdded(v) = e { Some(v) } else { None })
            .collect();
        assert_eq!(vifs.len(), 1, "{seen:?}");
        assert_eq!((vifs[0].vif, vifs[0].kind), (vif(3, 0), VifKind::Veth), "{seen:?}");
        assert!(vifs[0].guest_netns.is_some(), "the vif is whole in its first event: {seen:?}");
        ts.vif_set_addresses(ctx(), vif(3, 0), vec!["10.0.0.3".parse().unwrap()]).await.unwrap().unwrap();
        until(&mut sub, |e| matches!(e, NetworkEvent::VifChanged(v) if v.addresses.len() == 1)).await;
        ts.vif_set_up(ctx(), vif(3, 0), false).await.unwrap().unwrap();
        until(&mut sub, |e| matches!(e, NetworkEvent::VifChanged(v) if !v.up)).await;

        // Behind its back.
        ip(&["link", "set", "vif3.0", "up"]);
        until(&mut sub, |e| matches!(e, NetworkEvent::VifChanged(v) if v.up)).await;
        ip(&["link", "set", "vif3.0", "mtu", "1400"]);
        until(&mut sub, |e| matches!(e, NetworkEvent::VifChanged(v) if v.mtu == 1400)).await;
        ip(&["link", "add", "br9", "type", "bridge"]);
        until(&mut sub, |e| matches!(e, NetworkEvent::BridgeAdded(b) if b.name == "br9")).await;
        ip(&["link", "set", "vif3.0", "master", "br9"]);
        let moved = until(
            &mut sub,
            |e| matches!(e, NetworkEvent::VifChanged(v) if v.bridge.as_deref() == Some("br9")),
        )
        .await;
        assert!(
            !moved.iter().any(|e| matches!(e, NetworkEvent::VifRemoved { .. } | NetworkEvent::VifAdded(_))),
            "a vif moved between bridges is changed, not removed and added: {moved:?}"
        );
        ip(&["link", "del", "vif3.0"]);
        until(&mut sub, |e| matches!(e, NetworkEvent::VifRemoved { vif: v } if *v == vif(3, 0))).await;
        // What the service kept of it goes with the next call that finds it gone.
        assert!(d.net.guests().exists(3));
        assert!(matches!(ts.vif_delete(ctx(), vif(3, 0)).await.unwrap(), Err(NetworkError::NotFound { .. })));
        assert!(
            !d.net.guests().exists(3),
            "the guest's namespace of a vif deleted behind the service's back"
        );
        // The same when the next call is another vif's creation.
        ts.vif_create(ctx(), vif(3, 1), None, None, None, None).await.unwrap().unwrap();
        ip(&["link", "del", "vif3.1"]);
        until(&mut sub, |e| matches!(e, NetworkEvent::VifRemoved { vif: v } if *v == vif(3, 1))).await;
        assert!(d.net.guests().exists(3));
        ts.vif_create(ctx(), vif(6, 0), None, None, None, None).await.unwrap().unwrap();
        assert!(
            !d.net.guests().exists(3),
            "a vif deleted behind the service's back is forgotten at the next creation"
        );
        ts.vif_delete(ctx(), vif(6, 0)).await.unwrap().unwrap();
        until(&mut sub, |e| matches!(e, NetworkEvent::VifRemoved { vif: v } if *v == vif(6, 0))).await;
        ip(&["link", "del", "br9"]);
        until(&mut sub, |e| matches!(e, NetworkEvent::BridgeRemoved { name } if name == "br9")).await;
        // A vif made behind its back is a vif too.
        ip(&["link", "add", "vif9.1", "type", "veth", "peer", "name", "p9"]);
        until(
            &mut sub,
            |e| matches!(e, NetworkEvent::VifAdded(v) if v.vif == vif(9, 1) && v.guest_netns.is_none()),
        )
        .await;
        assert_eq!(ts.vif_list(ctx(), Some(9)).await.unwrap().unwrap().len(), 1);

        // A new subscriber starts from the state now.
        let mut late = ts.events();
        match next_update(&mut late).await {
            Update::Resync { snapshot: Some(s), .. } => {
                assert_eq!(s.bridges.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["xenbr0"]);
                assert_eq!(s.vifs.iter().map(|v| v.vif).collect::<Vec<_>>(), [vif(9, 1)]);
            }
            other => panic!("a late subscriber's first update: {other:?}"),
        }
    });
}

/// Without nft the service runs: vifs are made, counted and deleted; only anti-spoofing is
/// refused, saying what to install.
#[test]
fn without_nft_only_anti_spoofing_is_refused() {
    in_network_domain_with(
        "without_nft_only_anti_spoofing_is_refused",
        |c| c.nft = "/nonexistent/nft".into(),
        |d| async move {
            let n = &d.net;
            n.vif_create(vif(3, 0), None, None, None, None).await.unwrap();
            assert_eq!(n.vif_counters(vif(3, 0)).await.unwrap().spoofed_dropped, 0);
            match n.vif_set_addresses(vif(3, 0), vec!["10.0.0.3".parse().unwrap()]).await {
                Err(NetworkError::ToolFailed { tool, message }) => {
                    assert_eq!(tool, "nft");
                    assert!(message.contains("nftables"), "{message}");
                }
                other => panic!("anti-spoofing without nft: {other:?}"),
            }
            assert!(
                n.vif_info(vif(3, 0)).await.unwrap().addresses.is_empty(),
                "a refused call changes nothing"
            );
            n.vif_delete(vif(3, 0)).await.unwrap();
        },
    );
}
