//! A vif's rate limit: the kernel's token-bucket queue (`tbf`) as the root qdisc of the
//! guest's end, set, read back and removed over netlink (`RTM_NEWQDISC`, `RTM_GETQDISC`,
//! `RTM_DELQDISC`).
//!
//! Netback's `rate` key limits what a guest sends to a credit of `rate × interval` bytes per
//! interval. A veth vif's guest end (`eth<devid>`) stands for the guest, so what it sends is
//! that end's egress, and a tbf there holds it to the rate: its bucket is the credit, refilled
//! continuously at the rate. The kernel counts a frame's bytes with its Ethernet header and
//! without the preamble or checksum, as netback counts a packet's bytes.

mod tbf;

use futures::StreamExt;
use rtnetlink::packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload, Nla,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};

use super::kernel_error::kernel_error;
use super::{NetworkError, Rate};

/// Sets the root qdisc of the link `ifindex` (reached through `handle`, a netlink connection
/// of the link's namespace) to a tbf limiting it to `rate`, replacing any root qdisc.
///
/// The bucket holds `rate.burst_bytes()` but at least one full frame (`mtu` + 14), since the
/// kernel drops a packet larger than its bucket; the queue holds one burst, at least 64 KiB and
/// at most 16 MiB (what the guest sends beyond its credit waits at most about one interval, as
/// it waits in netback's ring, and what this domain holds for a guest stays bounded).
pub(crate) async fn set_rate(
    handle: &rtnetlink::Handle,
    ifindex: u32,
    mtu: u32,
    rate: Rate,
) -> Result<(), NetworkError> {
    if let Some(reason) = rate.invalid() {
        return Err(NetworkError::InvalidRate { rate: rate.to_string(), reason });
    }
    let mut message = TcMessage::with_index(link_index(ifindex)?);
    message.header.parent = TcHandle::ROOT;
    let options = tbf::Tbf::for_rate(rate, mtu)
        .attributes()
        .into_iter()
        .map(|(kind, value)| TcOption::Other(DefaultNla::new(kind, value)))
        .collect();
    message.attributes = vec![TcAttribute::Kind(tbf::KIND.into()), TcAttribute::Options(options)];
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    acked(handle, request).await.map_err(|e| kernel_error(&format!("RTM_NEWQDISC tbf on {ifindex}"), e))
}

/// Removes the link's root qdisc, if it is a tbf (the link goes back to its default); Ok when
/// it has none, or another kind, or the link is gone.
pub(crate) async fn clear_rate(handle: &rtnetlink::Handle, ifindex: u32) -> Result<(), NetworkError> {
    let Some(root) = root_qdisc(handle, ifindex).await? else { return Ok(()) };
    if kind(&root) != Some(tbf::KIND) {
        return Ok(());
    }
    let mut message = TcMessage::with_index(root.header.index);
    message.header.parent = TcHandle::ROOT;
    message.header.handle = root.header.handle;
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::DelQueueDiscipline(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    match acked(handle, request).await.map_err(|e| kernel_error(&format!("RTM_DELQDISC tbf on {ifindex}"), e))
    {
        // Gone since it was read: what was asked is done.
        Err(NetworkError::Kernel { errno, .. }) if errno == libc::ENOENT || errno == libc::ENODEV => Ok(()),
        other => other,
    }
}

/// The rate the link's root qdisc applies, if it is a tbf (None for another qdisc, none, or no
/// such link); its interval as [`tbf::parse`] reads it from the bucket's time. A tbf whose
/// options cannot be read is a [`NetworkError::Kernel`] with errno `EPROTO`.
pub(crate) async fn current_rate(
    handle: &rtnetlink::Handle,
    ifindex: u32,
) -> Result<Option<Rate>, NetworkError> {
    let Some(root) = root_qdisc(handle, ifindex).await? else { return Ok(None) };
    if kind(&root) != Some(tbf::KIND) {
        return Ok(None);
    }
    let options = root.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(o) => Some(o),
        _ => None,
    });
    // netlink-packet-route keeps the options of a qdisc it does not know as one attribute:
    // TCA_OPTIONS whole, whose value is the tbf's own attributes.
    let bytes = match options.map(Vec::as_slice) {
        Some([TcOption::Other(nla)]) => {
            let mut v = vec![0; nla.value_len()];
            nla.emit_value(&mut v);
            v
        }
        _ => Vec::new(),
    };
    tbf::parse(&bytes).map(Some).map_err(|e| NetworkError::Kernel {
        operation: format!("RTM_GETQDISC on {ifindex}"),
        errno: libc::EPROTO,
        message: format!("an unreadable tbf: {e}"),
    })
}

/// The kernel's `int` for a link's index; one beyond it names no link.
fn link_index(ifindex: u32) -> Result<i32, NetworkError> {
    i32::try_from(ifindex)
        .map_err(|_| NetworkError::NotFound { what: "link".into(), name: format!("ifindex {ifindex}") })
}

/// The qdisc's kind (`TCA_KIND`).
fn kind(message: &TcMessage) -> Option<&str> {
    message.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })
}

/// The root qdisc of the link `ifindex`, from a dump of the namespace's qdiscs (the kernel
/// dumps every link's: this keeps the link's root, read through to the end of the dump).
async fn root_qdisc(handle: &rtnetlink::Handle, ifindex: u32) -> Result<Option<TcMessage>, NetworkError> {
    let index = link_index(ifindex)?;
    let operation = || format!("RTM_GETQDISC on {ifindex}");
    let mut request =
        NetlinkMessage::from(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::with_index(index)));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut answers = handle.clone().request(request).map_err(|e| kernel_error(&operation(), e))?;
    let mut root = None;
    while let Some(answer) = answers.next().await {
        match answer.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewQueueDiscipline(m))
                if root.is_none() && m.header.index == index && m.header.parent == TcHandle::ROOT =>
            {
                root = Some(m);
            }
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(kernel_error(&operation(), rtnetlink::Error::NetlinkError(e)));
            }
            _ => {}
        }
    }
    Ok(root)
}

/// Sends `request` and waits for the kernel's acknowledgement (or its error).
async fn acked(
    handle: &rtnetlink::Handle,
    request: NetlinkMessage<RouteNetlinkMessage>,
) -> Result<(), rtnetlink::Error> {
    let mut answers = handle.clone().request(request)?;
    while let Some(answer) = answers.next().await {
        match answer.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => return Err(rtnetlink::Error::NetlinkError(e)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs::File;
    use std::net::{IpAddr, Ipv4Addr, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use futures::TryStreamExt;
    use rtnetlink::{Handle, LinkUnspec, LinkVeth};

    use super::*;
    use crate::network::netns::{self, Namespace};
    use crate::network::testutil::{in_new_namespace, namespaces_or_skip};

    /// Waits for `work`, at most 10 s.
    async fn within<T>(what: &str, work: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .unwrap_or_else(|_| panic!("{what} took more than 10 s"))
    }

    /// A netlink connection of this thread's namespace.
    fn connect() -> Handle {
        let (connection, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(connection);
        handle
    }

    async fn index_of(handle: &Handle, name: &str) -> u32 {
        let mut links = handle.link().get().match_name(name.to_owned()).execute();
        within("RTM_GETLINK", links.try_next()).await.unwrap().unwrap().header.index
    }

    /// A veth pair `a`–`b`, both up: their indexes.
    async fn veth(handle: &Handle, a: &str, b: &str) -> (u32, u32) {
        within("RTM_NEWLINK veth", handle.link().add(LinkVeth::new(a, b).build()).execute()).await.unwrap();
        let (ia, ib) = (index_of(handle, a).await, index_of(handle, b).await);
        for i in [ia, ib] {
            within("link up", handle.link().set(LinkUnspec::new_with_index(i).up().build()).execute())
                .await
                .unwrap();
        }
        (ia, ib)
    }

    /// The link's qdiscs as `tc` shows them, where `tc` is installed.
    fn tc_show(link: &str) -> Option<String> {
        let out = std::process::Command::new("tc").args(["qdisc", "show", "dev", link]).output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Set reads back as set, RATE64 and intervals included; a set replaces; a bucket raised
    /// to a full frame reads back as that frame's time; clear leaves no rate, twice.
    #[test]
    fn set_reads_back_replaces_and_clears() {
        if !namespaces_or_skip("set_reads_back_replaces_and_clears") {
            return;
        }
        in_new_namespace(|| async {
            let handle = connect();
            let (guest, _) = veth(&handle, "eth0", "vif1.0").await;
            assert_eq!(within("get", current_rate(&handle, guest)).await.unwrap(), None);
            for r in ["4M/s@50ms", "100K/s@20ms", "10M/s@1234us", "1G/s@2ms", "5G/s@10ms", "3G/s@1000ms"] {
                let rate: Rate = r.parse().unwrap();
                within("set", set_rate(&handle, guest, 1500, rate)).await.unwrap();
                assert_eq!(within("get", current_rate(&handle, guest)).await.unwrap(), Some(rate), "{r}");
            }
            if let Some(shown) = tc_show("eth0") {
                // 3 GiB/s = 25,769,803,776 bit/s, beyond 32 bits of bytes/s in bits.
                assert!(shown.contains("qdisc tbf") && shown.contains("rate 25769Mbit"), "tc shows {shown}");
            }
            let slow: Rate = "1K/s@50ms".parse().unwrap();
            within("set", set_rate(&handle, guest, 1500, slow)).await.unwrap();
            let floored = Some("1K/s@1479ms".parse().unwrap());
            assert_eq!(within("get", current_rate(&handle, guest)).await.unwrap(), floored);
            within("clear", clear_rate(&handle, guest)).await.unwrap();
            assert_eq!(within("get", current_rate(&handle, guest)).await.unwrap(), None);
            within("clear again", clear_rate(&handle, guest)).await.unwrap();
            if let Some(shown) = tc_show("eth0") {
                assert!(!shown.contains("tbf"), "tc shows {shown}");
            }
            let bad = Rate { bytes_per_sec: 100, interval_us: 50_000 };
            assert!(matches!(
                within("set", set_rate(&handle, guest, 1500, bad)).await,
                Err(NetworkError::InvalidRate { .. })
            ));
        });
    }

    /// A root qdisc of another kind is no rate and is not cleared, and a rate replaces it.
    #[test]
    fn another_root_qdisc_is_no_rate_and_is_replaced() {
        if !namespaces_or_skip("another_root_qdisc_is_no_rate_and_is_replaced") {
            return;
        }
        in_new_namespace(|| async {
            let handle = connect();
            let (guest, _) = veth(&handle, "eth0", "vif1.0").await;
            let root_kind = async |handle: &Handle| {
                let root = within("dump", root_qdisc(handle, guest)).await.unwrap().unwrap();
                kind(&root).unwrap().to_owned()
            };
            let mut pfifo = TcMessage::with_index(i32::try_from(guest).unwrap());
            pfifo.header.parent = TcHandle::ROOT;
            pfifo.attributes.push(TcAttribute::Kind("pfifo".into()));
            let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(pfifo));
            request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
            within("pfifo", acked(&handle, request)).await.unwrap();
            assert_eq!(root_kind(&handle).await, "pfifo");
            assert_eq!(within("get", current_rate(&handle, guest)).await.unwrap(), None);
            within("clear", clear_rate(&handle, guest)).await.unwrap();
            assert_eq!(root_kind(&handle).await, "pfifo");
            let rate = "2M/s@20ms".parse().unwrap();
            within("set", set_rate(&handle, guest, 1500, rate)).await.unwrap();
            assert_eq!(root_kind(&handle).await, "tbf");
            assert_eq!(within("get", current_rate(&handle, guest)).await.unwrap(), Some(rate));
            within("clear", clear_rate(&handle, guest)).await.unwrap();
            // A veth's default: no queue.
            assert_eq!(root_kind(&handle).await, "noqueue");
        });
    }

    /// The kernel's refusal is named with its operation and errno.
    #[test]
    fn a_link_that_does_not_exist_is_the_kernels_enodev() {
        if !namespaces_or_skip("a_link_that_does_not_exist_is_the_kernels_enodev") {
            return;
        }
        in_new_namespace(|| async {
            let handle = connect();
            let rate = "1M/s".parse().unwrap();
            let e = within("set", set_rate(&handle, 4242, 1500, rate)).await.unwrap_err();
            let NetworkError::Kernel { operation, errno, .. } = &e else { panic!("not the kernel's: {e:?}") };
            assert_eq!((operation.as_str(), *errno), ("RTM_NEWQDISC tbf on 4242", libc::ENODEV), "{e}");
            assert_eq!(within("get", current_rate(&handle, 4242)).await.unwrap(), None);
            within("clear", clear_rate(&handle, 4242)).await.unwrap();
            assert!(matches!(
                within("set", set_rate(&handle, u32::MAX, 1500, rate)).await,
                Err(NetworkError::NotFound { .. })
            ));
        });
    }

    /// The payload of each datagram; on the link a frame is 42 bytes more (UDP, IPv4, Ethernet).
    const PAYLOAD: usize = 1400;
    const FRAME: u64 = PAYLOAD as u64 + 42;

    /// Sends from `tx` at `pace` bytes/s (frames) for `secs`, and returns the frame bytes `rx`
    /// received within that time (what still arrives for 300 ms after is read and not counted).
    fn blast(tx: &UdpSocket, rx: &UdpSocket, secs: Duration, pace: u64) -> u64 {
        let rx = rx.try_clone().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let start = Instant::now();
        let (end, drained) = (start + secs, start + secs + Duration::from_millis(300));
        let receiver = std::thread::spawn(move || {
            let (mut buf, mut counted) = (vec![0u8; 2048], 0u64);
            while Instant::now() < drained {
                if rx.recv(&mut buf).is_ok() && Instant::now() < end {
                    counted += FRAME;
                }
            }
            counted
        });
        let (payload, mut sent) = ([0x5a_u8; PAYLOAD], 0u64);
        while Instant::now() < end {
            let due = u64::try_from(start.elapsed().as_micros()).unwrap() * pace / 1_000_000;
            if sent < due {
                // A full queue drops the datagram (ENOBUFS at most): what is counted is what
                // arrives.
                let _ = tx.send(&payload);
                sent += FRAME;
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        receiver.join().unwrap()
    }

    /// 4M/s@50ms on the guest's end holds a blast of 10 times as much to the rate (and the
    /// first burst) within 20 %; without it, the same blast moves more than 3 times as much.
    #[test]
    fn a_rate_holds_on_real_traffic() {
        if !namespaces_or_skip("a_rate_holds_on_real_traffic") {
            return;
        }
        in_new_namespace(|| async {
            // This namespace is the guest's; the domain's end goes into one of its own.
            let handle = connect();
            let (guest, domain_end) = veth(&handle, "eth0", "vif1.0").await;
            let domain_ns: File =
                netns::run_in(Namespace::New, || File::open("/proc/thread-self/ns/net")).unwrap().unwrap();
            let to_domain = LinkUnspec::new_with_index(domain_end).setns_by_fd(domain_ns.as_raw_fd()).build();
            within("setns", handle.link().set(to_domain).execute()).await.unwrap();
            let (guest_ip, domain_ip) = (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 1));
            within("address", handle.address().add(guest, IpAddr::V4(guest_ip), 24).execute()).await.unwrap();
            let domain_path = PathBuf::from(format!("/proc/self/fd/{}", domain_ns.as_raw_fd()));
            let rx = netns::block_on_in(Namespace::Path(domain_path), move || async move {
                let handle = connect();
                let end = index_of(&handle, "vif1.0").await;
                within("address", handle.address().add(end, IpAddr::V4(domain_ip), 24).execute())
                    .await
                    .unwrap();
                within("up", handle.link().set(LinkUnspec::new_with_index(end).up().build()).execute())
                    .await
                    .unwrap();
                UdpSocket::bind((domain_ip, 0)).unwrap()
            })
            .unwrap();
            let tx = UdpSocket::bind((guest_ip, 0)).unwrap();
            tx.connect(rx.local_addr().unwrap()).unwrap();

            // The path works (and the neighbour is known) before anything is measured.
            rx.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut buf = [0u8; 16];
            let reached = (0..50).any(|_| tx.send(b"hello").is_ok() && rx.recv(&mut buf).is_ok());
            assert!(reached, "no datagram crossed the veth in 5 s");

            let rate: Rate = "4M/s@50ms".parse().unwrap();
            let secs = Duration::from_secs(2);
            let pace = rate.bytes_per_sec * 10;
            within("set", set_rate(&handle, guest, 1500, rate)).await.unwrap();
            let limited = blast(&tx, &rx, secs, pace);
            within("clear", clear_rate(&handle, guest)).await.unwrap();
            let free = blast(&tx, &rx, secs, pace);

            // The bucket starts full: one burst, then the rate.
            let expected = rate.burst_bytes() + rate.bytes_per_sec * secs.as_secs();
            let ratio = limited as f64 / expected as f64;
            eprintln!("limited: {limited} B ({ratio:.3} of {expected}), free: {free} B");
            assert!((0.8..=1.2).contains(&ratio), "{limited} bytes passed, {expected} expected (±20 %)");
            assert!(
                free > 3 * rate.bytes_per_sec * secs.as_secs(),
                "only {free} bytes passed without a rate"
            );
        });
    }
}
