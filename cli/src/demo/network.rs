//! The demo's network step: the toolstack makes a bridge and two guests' vifs in the network
//! domain, the guests (network namespaces standing in for them) exchange real UDP through the
//! bridge, the counters show it, and a vif set down shows as an event.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dombus::Update;
use dombus_services::network::{NetworkClient, NetworkError, NetworkEvent, VifId, VifInfo, guest};
use futures::StreamExt as _;

use crate::host::{self, Host, context};

/// The two guests of the step: the host's guest and one more domain id, whose vifs' other ends
/// are in namespaces standing in for them.
const GUESTS: [u32; 2] = [host::GUEST.0 as u32, 7];
const DATAGRAMS: usize = 100;

/// A network event, in a few words.
fn event(e: &NetworkEvent) -> String {
    let vif = |v: &VifInfo| {
        let state = serde_json::to_value(v.state)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default();
        format!(
            "vif {} ({}) set {}, link {state}, on {}, MTU {}",
            v.vif,
            v.name,
            if v.up { "up" } else { "down" },
            v.bridge.as_deref().unwrap_or("no bridge"),
            v.mtu
        )
    };
    match e {
        NetworkEvent::BridgeAdded(b) => format!("bridge {} added, MTU {}", b.name, b.mtu),
        NetworkEvent::BridgeChanged(b) => format!("bridge {} now has {:?}", b.name, b.members),
        NetworkEvent::BridgeRemoved { name } => format!("bridge {name} removed"),
        NetworkEvent::VifAdded(v) => format!("added {}", vif(v)),
        NetworkEvent::VifChanged(v) => format!("changed: {}", vif(v)),
        NetworkEvent::VifRemoved { vif } => format!("vif {vif} removed"),
    }
}

/// Sends `n` datagrams from `from` to `to` and answers how many arrived within `wait`, and how
/// long they took.
fn exchange(from: &UdpSocket, to: &UdpSocket, n: usize, wait: Duration) -> anyhow::Result<(usize, Duration)> {
    let target = to.local_addr()?;
    let t = Instant::now();
    to.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut got = 0;
    let mut buf = [0u8; 1500];
    for i in 0..n {
        from.send_to(format!("datagram {i} from {}", from.local_addr()?).as_bytes(), target)?;
    }
    while got < n && t.elapsed() < wait {
        if to.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    Ok((got, t.elapsed()))
}

fn refused<T>(what: &str, r: Result<T, NetworkError>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what}: the network domain refused: {e}"))
}

/// Step 6: the network domain, when the host has one.
pub async fn run(host: &Host) -> anyhow::Result<serde_json::Value> {
    let Some(addr) = host.manifest.service_addr("network") else {
        println!(
            "\n6. The network domain: not started on this host ({})",
            host::network_namespaces_possible().err().unwrap_or_default()
        );
        return Ok(serde_json::Value::Null);
    };
    let net = host.net.clone().context("the host has no toolstack connection")?;
    println!("\n6. The toolstack calls the network domain (domain {}) at {addr}", host::NETWORK);
    let network =
        NetworkClient::connect(net, addr.clone()).await.context("connecting to the network service")?;
    let d = Duration::from_secs(30);

    // Watch the network while changing it.
    let mut events = network.events().wait(Duration::from_secs(2));
    match tokio::time::timeout(d, events.next()).await {
        Ok(Some(Ok(Update::Resync { .. }))) => {}
        other => bail!("the network events subscription did not start: {other:?}"),
    }
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        while let Some(u) = events.next().await {
            if let Ok(Update::Event { event: e, .. }) = u {
                println!("    event: {}", event(&e));
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });

    let br = refused("bridge_create", network.bridge_create(context(d), "xenbr0".into(), None).await?)?;
    println!("  bridge_create(\"xenbr0\")        ok: MTU {}", br.mtu);
    let mut sockets = Vec::new();
    for domid in GUESTS {
        let vif = VifId { domid, devid: 0 };
        let v = refused(
            "vif_create",
            network.vif_create(context(d), vif, None, Some("xenbr0".into()), None, None).await?,
        )?;
        let ns = PathBuf::from(v.guest_netns.clone().context("a veth vif without a guest namespace")?);
        println!(
            "  vif_create({vif}, bridge xenbr0)  ok: {} on xenbr0, guest's end eth0 ({}) in {}",
            v.name,
            v.mac.map(|m| m.to_string()).unwrap_or_default(),
            ns.display()
        );
        // What the guest does itself: an address on its end, and a socket.
        let ip: IpAddr = format!("10.0.0.{domid}").parse()?;
        let ns2 = ns.clone();
        tokio::task::spawn_blocking(move || guest::configure(&ns2, "eth0", ip, 24))
            .await?
            .with_context(|| format!("configuring guest {domid}'s end"))?;
        sockets.push(guest::udp_socket(&ns, SocketAddr::new(ip, 7000))?);
    }
    // The guests' sockets block: they are used off the runtime's thread.
    let sockets = std::sync::Arc::new(sockets);
    let both = sockets.clone();
    let ((ab, t_ab), (ba, t_ba)) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let (a, b) = (&both[0], &both[1]);
        Ok((exchange(a, b, DATAGRAMS, d)?, exchange(b, a, DATAGRAMS, d)?))
    })
    .await??;
    println!(
        "  UDP through the bridge: guest {} → guest {}: {ab}/{DATAGRAMS} in {:.1} ms; back: {ba}/{DATAGRAMS} in {:.1} ms",
        GUESTS[0],
        GUESTS[1],
        t_ab.as_secs_f64() * 1e3,
        t_ba.as_secs_f64() * 1e3
    );
    if ab != DATAGRAMS || ba != DATAGRAMS {
        bail!("datagrams were lost between two guests on one bridge ({ab} and {ba} of {DATAGRAMS})");
    }
    let mut counters = Vec::new();
    for domid in GUESTS {
        let c = refused("vif_counters", network.vif_counters(context(d), VifId { domid, devid: 0 }).await?)?;
        println!(
            "  vif_counters({domid}.0)          from the guest {} packets, {} bytes; to it {} packets, {} bytes",
            c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes
        );
        if c.rx_packets < DATAGRAMS as u64 || c.tx_packets < DATAGRAMS as u64 {
            bail!("the counters of vif {domid}.0 missed the datagrams: {c:?}");
        }
        counters.push(c);
    }

    let down = VifId { domid: GUESTS[1], devid: 0 };
    refused("vif_set_up", network.vif_set_up(context(d), down, false).await?)?;
    println!("  vif_set_up({down}, down)        ok");
    let seen_down = async {
        while let Some(e) = seen.recv().await {
            if matches!(&e, NetworkEvent::VifChanged(v) if v.vif == down && !v.up) {
                return true;
            }
        }
        false
    };
    if !tokio::time::timeout(Duration::from_secs(5), seen_down).await.unwrap_or(false) {
        bail!("no event showed vif {down} down within 5 s");
    }
    let (lost, _) = tokio::task::spawn_blocking(move || {
        exchange(&sockets[0], &sockets[1], 5, Duration::from_millis(300))
    })
    .await??;
    println!("  UDP to guest {} with its vif down: {lost}/5 arrive", GUESTS[1]);
    if lost != 0 {
        bail!("datagrams crossed a vif set down");
    }
    for domid in GUESTS {
        refused("vif_delete", network.vif_delete(context(d), VifId { domid, devid: 0 }).await?)?;
    }
    refused("bridge_delete", network.bridge_delete(context(d), "xenbr0".into()).await?)?;
    println!("  vif_delete × 2, bridge_delete(\"xenbr0\")  ok");
    let gone = async {
        while let Some(e) = seen.recv().await {
            if matches!(&e, NetworkEvent::BridgeRemoved { name } if name == "xenbr0") {
                return true;
            }
        }
        false
    };
    let removed = tokio::time::timeout(Duration::from_secs(5), gone).await.unwrap_or(false);
    watcher.abort();
    if !removed {
        bail!("no event showed the bridge removed within 5 s");
    }
    Ok(serde_json::json!({
        "udp": { "sent": DATAGRAMS, "a_to_b": ab, "b_to_a": ba },
        "counters": counters,
    }))
}
