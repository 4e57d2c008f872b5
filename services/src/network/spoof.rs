//! Anti-spoofing rules of the vifs: which source addresses a guest may send from, as nftables
//! rules on the ingress hook of each vif's end in this domain (what Xen's `vif-common.sh` does
//! with iptables when a vif has `ip=`).
//!
//! One table of the `netdev` family holds one base chain per vif, named as the vif's link and
//! hooked on that link's ingress, so that its rules see every frame the guest sends before a
//! bridge does. A vif with addresses lets through:
//! - IPv4 from those addresses, and DHCP requests (from `0.0.0.0`, UDP port 68 to 67); any
//!   other IPv4 is counted and dropped;
//! - ARP whose sender protocol address is one of those, or `0.0.0.0` (a probe); any other ARP
//!   is counted and dropped;
//! - IPv6 from those addresses, from link-local ones (`fe80::/10`) and from `::` (duplicate
//!   address detection); any other IPv6 is counted and dropped;
//! - every other ethertype, as Xen's scripts do.
//!
//! So a vif given only IPv4 addresses cannot send IPv6 beyond link-local and duplicate address
//! detection, and one given only IPv6 addresses cannot send IPv4 beyond DHCP requests, nor ARP
//! beyond probes. A vif without addresses has no chain: everything passes, as in Xen without
//! `ip=`.
//!
//! The rules are built with the `nftables` crate's typed schema and given to `nft -j -f -` as
//! one transaction. `nft` is run here rather than through the crate's helpers, which let `nft`'s
//! error text go to the daemon's own stderr and read its output without a bound: here its
//! stderr becomes the error, what is read of its output is bounded ([`MAX_OUTPUT`],
//! [`MAX_ERROR`]) and a run that takes longer than [`NFT_TIMEOUT`] is killed.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::NetworkError;

/// The most of `nft`'s output read: the listing of one vif's chain is a few kilobytes, that of
/// every chain's name in the `netdev` family some 200 bytes a vif.
const MAX_OUTPUT: u64 = 4 << 20;
/// The most of `nft`'s error text kept (the rest is read and dropped).
const MAX_ERROR: u64 = 16 << 10;
/// How long one run of `nft` may take before it is killed.
const NFT_TIMEOUT: Duration = Duration::from_secs(30);
/// The chains' priority on the ingress hook (nft's `filter`).
const PRIORITY: i32 = 0;
/// The name of the tool in errors.
const TOOL: &str = "nft";

/// Anti-spoofing rules of the vifs: one table of the `netdev` family (name given), one base
/// chain per vif on the ingress hook of the vif's backend end (the frames the guest sends).
#[derive(Debug, Clone)]
pub(crate) struct AntiSpoof {
    /// The `nft` program to run.
    nft: PathBuf,
    /// The table's name.
    table: String,
}

impl AntiSpoof {
    /// `nft` is the program to run (`nft` from `PATH` in the daemon), `table` the table's name
    /// (`dombus`). Makes nothing yet.
    pub(crate) fn new(nft: PathBuf, table: String) -> Self {
        Self { nft, table }
    }

    /// Only `allowed` may be the source address of what leaves `ifname`: replaces that vif's
    /// rules in one `nft` transaction (the table made if missing, the vif's chain deleted if
    /// present and added anew). An empty `allowed` removes the vif's rules (everything passes,
    /// as Xen does without `ip=`). Where the link does not exist, older kernels refuse the
    /// chain (an error) and newer ones keep it for a link of that name to come.
    pub(crate) async fn set(&self, ifname: &str, allowed: &[IpAddr]) -> Result<(), NetworkError> {
        if allowed.is_empty() {
            return self.clear(ifname).await;
        }
        self.apply(&self.replace_program(ifname, allowed), &format!("setting the rules of {ifname}")).await
    }

    /// Removes the vif's rules; nothing to do when it has none (also when the link is already
    /// gone).
    pub(crate) async fn clear(&self, ifname: &str) -> Result<(), NetworkError> {
        self.apply(&self.clear_program(ifname), &format!("removing the rules of {ifname}")).await
    }

    /// Packets dropped as spoofed on that vif so far (the drop rules' counters), 0 without
    /// rules.
    pub(crate) async fn dropped(&self, ifname: &str) -> Result<u64, NetworkError> {
        let args = ["-j", "list", "chain", "netdev", &self.table, ifname];
        let listing = match self.run(&args, None).await {
            Ok(out) => out,
            // `nft` tells a missing chain only by its error text: ask which chains exist.
            Err(e) if !self.has_chain(ifname).await? => {
                tracing::trace!(ifname, error = %e, "no anti-spoofing chain");
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        let listing: Nftables<'_> = serde_json::from_slice(&listing)
            .map_err(|e| failed(format!("reading the listing of {ifname}'s rules: {e}")))?;
        Ok(dropped_in(&listing, &self.table, ifname))
    }

    /// Removes the whole table (the daemon's start and stop).
    pub(crate) async fn clear_all(&self) -> Result<(), NetworkError> {
        let program = Nftables {
            objects: vec![
                NfObject::CmdObject(NfCmd::Add(NfListObject::Table(self.table()))),
                NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(self.table()))),
            ]
            .into(),
        };
        self.apply(&program, &format!("removing the table {}", self.table)).await
    }

    /// The table (`netdev` family).
    fn table(&self) -> Table<'_> {
        Table { family: NfFamily::NetDev, name: Cow::Borrowed(&self.table), handle: None }
    }

    /// The vif's chain, named after its link, as a name only (no hook: adding it leaves an
    /// existing chain as it is, and makes a regular one where there is none).
    fn chain_name<'a>(&'a self, ifname: &'a str) -> Chain<'a> {
        Chain {
            family: NfFamily::NetDev,
            table: Cow::Borrowed(&self.table),
            name: Cow::Borrowed(ifname),
            ..Chain::default()
        }
    }

    /// The commands that leave the table present and the vif without a chain, whether or not
    /// it had one or its link still exists (`nft` 1.0.6 has no `destroy`: a chain is added, so
    /// that deleting it cannot fail).
    fn clear_commands<'a>(&'a self, ifname: &'a str) -> Vec<NfObject<'a>> {
        vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(self.table()))),
            NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(self.chain_name(ifname)))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Chain(self.chain_name(ifname)))),
        ]
    }

    /// The transaction that removes the vif's rules.
    fn clear_program<'a>(&'a self, ifname: &'a str) -> Nftables<'a> {
        Nftables { objects: self.clear_commands(ifname).into() }
    }

    /// The transaction that replaces the vif's rules by those allowing `allowed`.
    fn replace_program<'a>(&'a self, ifname: &'a str, allowed: &[IpAddr]) -> Nftables<'a> {
        let mut objects = self.clear_commands(ifname);
        let base = Chain {
            _type: Some(NfChainType::Filter),
            hook: Some(NfHook::Ingress),
            prio: Some(PRIORITY),
            dev: Some(Cow::Borrowed(ifname)),
            policy: Some(NfChainPolicy::Accept),
            ..self.chain_name(ifname)
        };
        objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(base))));
        for rule in self.rules(ifname, allowed) {
            objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(rule))));
        }
        Nftables { objects: objects.into() }
    }

    /// The rules of the vif's chain for `allowed` (not empty), in order (see the module's
    /// documentation).
    fn rules<'a>(&'a self, ifname: &'a str, allowed: &[IpAddr]) -> Vec<Rule<'a>> {
        let v4: BTreeSet<Ipv4Addr> =
            allowed.iter().filter_map(|a| if let IpAddr::V4(a) = a { Some(*a) } else { None }).collect();
        let v6: BTreeSet<Ipv6Addr> =
            allowed.iter().filter_map(|a| if let IpAddr::V6(a) = a { Some(*a) } else { None }).collect();
        let rule = |expr: Vec<Statement<'static>>| Rule {
            family: NfFamily::NetDev,
            table: Cow::Borrowed(self.table.as_str()),
            chain: Cow::Borrowed(ifname),
            expr: expr.into(),
            handle: None,
            index: None,
            comment: None,
        };
        let mut rules = Vec::new();
        if !v4.is_empty() {
            rules.push(rule(vec![
                protocol("ip"),
                matches(payload("ip", "saddr"), Operator::EQ, set(v4.iter().map(|a| a.to_string()))),
                accept_verdict(),
            ]));
        }
        rules.push(rule(vec![
            protocol("ip"),
            matches(payload("ip", "saddr"), Operator::EQ, address(Ipv4Addr::UNSPECIFIED)),
            matches(meta(MetaKey::L4proto), Operator::EQ, Expression::String("udp".into())),
            matches(payload("udp", "sport"), Operator::EQ, Expression::Number(68)),
            matches(payload("udp", "dport"), Operator::EQ, Expression::Number(67)),
            accept_verdict(),
        ]));
        rules.push(rule(vec![protocol("ip"), counter(), drop_verdict()]));
        let arp_senders = v4.iter().copied().chain([Ipv4Addr::UNSPECIFIED]).collect::<BTreeSet<_>>();
        rules.push(rule(vec![
            protocol("arp"),
            matches(
                payload("arp", "saddr ip"),
                Operator::NEQ,
                set(arp_senders.iter().map(|a| a.to_string())),
            ),
            counter(),
            drop_verdict(),
        ]));
        if !v6.is_empty() {
            rules.push(rule(vec![
                protocol("ip6"),
                matches(payload("ip6", "saddr"), Operator::EQ, set(v6.iter().map(|a| a.to_string()))),
                accept_verdict(),
            ]));
        }
        // Separate from the given addresses: a link-local one among them would overlap the
        // prefix, which an interval set refuses.
        let link_local = Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(address(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0))),
            len: 10,
        }));
        rules.push(rule(vec![
            protocol("ip6"),
            matches(
                payload("ip6", "saddr"),
                Operator::EQ,
                Expression::Named(NamedExpression::Set(vec![
                    SetItem::Element(address(Ipv6Addr::UNSPECIFIED)),
                    SetItem::Element(link_local),
                ])),
            ),
            accept_verdict(),
        ]));
        rules.push(rule(vec![protocol("ip6"), counter(), drop_verdict()]));
        rules
    }

    /// Whether the vif has a chain in the table.
    async fn has_chain(&self, ifname: &str) -> Result<bool, NetworkError> {
        let out = self.run(&["-j", "list", "chains", "netdev"], None).await?;
        // Only names are read: other tables' chains may take forms the crate's schema does not
        // know (a chain on several devices).
        let listing: serde_json::Value = serde_json::from_slice(&out)
            .map_err(|e| failed(format!("reading the listing of the netdev chains: {e}")))?;
        let objects =
            listing.get("nftables").and_then(|o| o.as_array()).map(Vec::as_slice).unwrap_or_default();
        Ok(objects.iter().filter_map(|o| o.get("chain")).any(|c| {
            c.get("table").and_then(|t| t.as_str()) == Some(self.table.as_str())
                && c.get("name").and_then(|n| n.as_str()) == Some(ifname)
        }))
    }

    /// Runs `program` as one transaction; `what` says what it does, for the error.
    async fn apply(&self, program: &Nftables<'_>, what: &str) -> Result<(), NetworkError> {
        let input =
            serde_json::to_vec(program).map_err(|e| failed(format!("{what}: writing nft's input: {e}")))?;
        self.run(&["-j", "-f", "-"], Some(input)).await.map_err(|e| match e {
            NetworkError::ToolFailed { tool, message } => {
                NetworkError::ToolFailed { tool, message: format!("{what}: {message}") }
            }
            e => e,
        })?;
        Ok(())
    }

    /// Runs `nft` with `args` and `input` on its standard input, and returns its output (at
    /// most [`MAX_OUTPUT`] bytes). Its error text becomes the error when it fails.
    async fn run(&self, args: &[&str], input: Option<Vec<u8>>) -> Result<Vec<u8>, NetworkError> {
        let mut child = tokio::process::Command::new(&self.nft)
            .args(args)
            // Error texts in English, whatever the daemon's locale.
            .env("LC_ALL", "C")
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| self.cannot_run(&e))?;
        let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let write = async move {
            if let (Some(mut stdin), Some(input)) = (stdin, input) {
                // An `nft` that fails early stops reading: its error text says why.
                let _ = stdin.write_all(&input).await;
            }
            Ok(())
        };
        let read_out = async move {
            let Some(mut stdout) = stdout else { return Ok(Vec::new()) };
            let (out, whole) = read_bounded(&mut stdout, MAX_OUTPUT).await?;
            if !whole {
                return Err(failed(format!("its output exceeds {MAX_OUTPUT} bytes")));
            }
            Ok(out)
        };
        let read_err = async move {
            let Some(mut stderr) = stderr else { return Ok((Vec::new(), true)) };
            let (text, whole) = read_bounded(&mut stderr, MAX_ERROR).await?;
            if !whole {
                // Read the rest, so that `nft` is not stuck writing it.
                let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
            }
            Ok((text, whole))
        };
        let work = async {
            let ((), out, (err, err_whole)) = tokio::try_join!(write, read_out, read_err)?;
            let status =
                child.wait().await.map_err(|e| failed(format!("waiting for {}: {e}", self.nft.display())))?;
            if status.success() {
                return Ok(out);
            }
            let mut text = String::from_utf8_lossy(&err).trim().to_owned();
            if !err_whole {
                text.push_str(" […]");
            }
            if text.is_empty() {
                text = format!("{} {}", self.nft.display(), status);
            }
            Err(failed(text))
        };
        match tokio::time::timeout(NFT_TIMEOUT, work).await {
            Ok(result) => result,
            // Dropping the child kills it.
            Err(_) => Err(failed(format!("{} took longer than {NFT_TIMEOUT:?}", self.nft.display()))),
        }
    }

    /// The error of an `nft` that cannot be started.
    fn cannot_run(&self, e: &io::Error) -> NetworkError {
        if e.kind() == io::ErrorKind::NotFound {
            failed(format!(
                "cannot run {}: not found (it comes with Debian's package nftables)",
                self.nft.display()
            ))
        } else {
            failed(format!("cannot run {}: {e}", self.nft.display()))
        }
    }
}

/// An `nft` failure saying `message`.
fn failed(message: String) -> NetworkError {
    NetworkError::ToolFailed { tool: TOOL.into(), message }
}

/// Up to `limit` bytes of `from`, and whether that was all of it.
async fn read_bounded<R: AsyncRead + Unpin>(
    from: &mut R,
    limit: u64,
) -> Result<(Vec<u8>, bool), NetworkError> {
    let error = |e: io::Error| failed(format!("reading nft's output: {e}"));
    let mut buf = Vec::new();
    (&mut *from).take(limit).read_to_end(&mut buf).await.map_err(error)?;
    let mut probe = [0u8; 1];
    let more = from.read(&mut probe).await.map_err(error)?;
    Ok((buf, more == 0))
}

/// The packets counted by the drop rules of the chain `chain` of `table` in `listing`.
fn dropped_in(listing: &Nftables<'_>, table: &str, chain: &str) -> u64 {
    let rules = listing.objects.iter().filter_map(|o| match o {
        NfObject::ListObject(NfListObject::Rule(r))
            if r.family == NfFamily::NetDev && r.table == table && r.chain == chain =>
        {
            Some(r)
        }
        _ => None,
    });
    let drops = rules.filter(|r| r.expr.iter().any(|s| matches!(s, Statement::Drop(_))));
    let packets = drops.flat_map(|r| r.expr.iter()).filter_map(|s| match s {
        Statement::Counter(Counter::Anonymous(Some(c))) => c.packets,
        _ => None,
    });
    packets.fold(0u64, |sum, p| sum.saturating_add(u64::try_from(p).unwrap_or(u64::MAX)))
}

/// `meta protocol <ethertype>`.
fn protocol(ethertype: &'static str) -> Statement<'static> {
    matches(meta(MetaKey::Protocol), Operator::EQ, Expression::String(ethertype.into()))
}

/// The `meta` expression of `key`.
fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

/// The field `field` of the header `protocol`.
fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

/// An address, as nft writes it.
fn address(a: impl Into<IpAddr>) -> Expression<'static> {
    Expression::String(a.into().to_string().into())
}

/// An anonymous set of addresses.
fn set(addresses: impl Iterator<Item = String>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        addresses.map(|a| SetItem::Element(Expression::String(a.into()))).collect(),
    ))
}

/// `left op right`.
fn matches(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// An anonymous counter.
fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

/// The verdict `accept`.
fn accept_verdict() -> Statement<'static> {
    Statement::Accept(None)
}

/// The verdict `drop`.
fn drop_verdict() -> Statement<'static> {
    Statement::Drop(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;
    use std::path::Path;

    use futures::TryStreamExt;
    use rtnetlink::{LinkUnspec, LinkVeth};
    use serde_json::json;

    use super::*;
    use crate::network::netns::{GuestNamespaces, Namespace, block_on_in, run_in};
    use crate::network::testutil::{in_new_namespace, namespaces_or_skip};

    fn anti_spoof() -> AntiSpoof {
        AntiSpoof::new("nft".into(), "dombus".into())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The rules of `allowed` as nft reads them (JSON), one array of statements per rule.
    fn rules_json(allowed: &[&str]) -> Vec<serde_json::Value> {
        let allowed: Vec<IpAddr> = allowed.iter().map(|a| ip(a)).collect();
        let spoof = anti_spoof();
        let rules = spoof.rules("vif3.0", &allowed);
        for r in &rules {
            assert_eq!((r.family, &*r.table, &*r.chain), (NfFamily::NetDev, "dombus", "vif3.0"));
        }
        rules.iter().map(|r| serde_json::to_value(&r.expr).unwrap()).collect()
    }

    /// Compares rule by rule, so that a failure names the rule that differs.
    fn assert_rules(got: Vec<serde_json::Value>, want: Vec<serde_json::Value>) {
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_eq!(got, want, "rule {i} differs:\n got: {got}\nwant: {want}");
        }
        assert_eq!(got.len(), want.len(), "the number of rules");
    }

    fn proto(ethertype: &str) -> serde_json::Value {
        json!({"match": {"op": "==", "left": {"meta": {"key": "protocol"}}, "right": ethertype}})
    }

    fn saddr(protocol: &str, op: &str, right: serde_json::Value) -> serde_json::Value {
        json!({"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": "saddr"}}, "right": right}})
    }

    fn dhcp() -> serde_json::Value {
        json!([proto("ip"), saddr("ip", "==", json!("0.0.0.0")),
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": 68}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 67}},
            {"accept": null}])
    }

    fn drop_other(ethertype: &str) -> serde_json::Value {
        json!([proto(ethertype), {"counter": null}, {"drop": null}])
    }

    fn arp_drop(senders: serde_json::Value) -> serde_json::Value {
        json!([proto("arp"),
            {"match": {"op": "!=", "left": {"payload": {"protocol": "arp", "field": "saddr ip"}}, "right": {"set": senders}}},
            {"counter": null}, {"drop": null}])
    }

    fn v6_link_local() -> serde_json::Value {
        json!([proto("ip6"), saddr("ip6", "==", json!({"set": ["::", {"prefix": {"addr": "fe80::", "len": 10}}]})),
            {"accept": null}])
    }

    /// IPv4 only: its addresses (once each, sorted) and DHCP requests pass, other IPv4 and ARP
    /// from another sender are dropped, IPv6 only link-local and `::`.
    #[test]
    fn rules_for_ipv4_addresses_only() {
        assert_rules(
            rules_json(&["192.0.2.9", "192.0.2.2", "192.0.2.9"]),
            vec![
                json!([proto("ip"), saddr("ip", "==", json!({"set": ["192.0.2.2", "192.0.2.9"]})), {"accept": null}]),
                dhcp(),
                drop_other("ip"),
                arp_drop(json!(["0.0.0.0", "192.0.2.2", "192.0.2.9"])),
                v6_link_local(),
                drop_other("ip6"),
            ],
        );
    }

    /// IPv6 only: IPv4 beyond DHCP requests is dropped, and ARP beyond probes.
    #[test]
    fn rules_for_ipv6_addresses_only() {
        assert_rules(
            rules_json(&["2001:db8::7"]),
            vec![
                dhcp(),
                drop_other("ip"),
                arp_drop(json!(["0.0.0.0"])),
                json!([proto("ip6"), saddr("ip6", "==", json!({"set": ["2001:db8::7"]})), {"accept": null}]),
                v6_link_local(),
                drop_other("ip6"),
            ],
        );
    }

    /// Both families: each address in its family's rule.
    #[test]
    fn rules_for_both_families() {
        assert_rules(
            rules_json(&["2001:db8::7", "192.0.2.2", "fe80::1"]),
            vec![
                json!([proto("ip"), saddr("ip", "==", json!({"set": ["192.0.2.2"]})), {"accept": null}]),
                dhcp(),
                drop_other("ip"),
                arp_drop(json!(["0.0.0.0", "192.0.2.2"])),
                json!([proto("ip6"), saddr("ip6", "==", json!({"set": ["2001:db8::7", "fe80::1"]})), {"accept": null}]),
                v6_link_local(),
                drop_other("ip6"),
            ],
        );
    }

    /// The transaction: table, the vif's chain added and deleted (so that it is gone whether
    /// it was there or not), the base chain on the vif's ingress, its rules.
    #[test]
    fn set_is_one_transaction_that_replaces_the_chain() {
        let spoof = anti_spoof();
        let program = serde_json::to_value(spoof.replace_program("vif3.0", &[ip("192.0.2.2")])).unwrap();
        let objects = program["nftables"].as_array().unwrap();
        let chain = json!({"family": "netdev", "table": "dombus", "name": "vif3.0"});
        assert_eq!(objects[0], json!({"add": {"table": {"family": "netdev", "name": "dombus"}}}));
        assert_eq!(objects[1], json!({"add": {"chain": chain}}));
        assert_eq!(objects[2], json!({"delete": {"chain": chain}}));
        assert_eq!(
            objects[3],
            json!({"add": {"chain": {"family": "netdev", "table": "dombus", "name": "vif3.0", "type": "filter",
                "hook": "ingress", "prio": 0, "dev": "vif3.0", "policy": "accept"}}})
        );
        assert_eq!(objects.len(), 4 + spoof.rules("vif3.0", &[ip("192.0.2.2")]).len());
        assert!(objects[4..].iter().all(|o| o["add"]["rule"]["chain"] == "vif3.0"));
        assert_eq!(
            serde_json::to_value(spoof.clear_program("vif3.0")).unwrap()["nftables"],
            json!(objects[..3])
        );
    }

    /// The drop rules' counters of the one chain asked for are summed, not the accept rules'
    /// nor another chain's (a listing as nft 1.0.6 prints it).
    #[test]
    fn dropped_sums_the_drop_rules_of_the_chain() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
            {"chain": {"family": "netdev", "table": "dombus", "name": "vif3.0", "handle": 9, "type": "filter",
                "hook": "ingress", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "netdev", "table": "dombus", "chain": "vif3.0", "handle": 11, "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"set": ["10.0.0.2"]}}},
                {"counter": {"packets": 100, "bytes": 1000}}, {"accept": null}]}},
            {"rule": {"family": "netdev", "table": "dombus", "chain": "vif3.0", "handle": 12, "expr": [
                {"counter": {"packets": 3, "bytes": 120}}, {"drop": null}]}},
            {"rule": {"family": "netdev", "table": "dombus", "chain": "vif3.0", "handle": 13, "expr": [
                {"match": {"op": "!=", "left": {"payload": {"protocol": "arp", "field": "saddr ip"}}, "right": {"set": ["0.0.0.0", "10.0.0.2"]}}},
                {"counter": {"packets": 4, "bytes": 168}}, {"drop": null}]}},
            {"rule": {"family": "netdev", "table": "dombus", "chain": "vif4.0", "handle": 14, "expr": [
                {"counter": {"packets": 50, "bytes": 500}}, {"drop": null}]}}
        ]});
        let listing: Nftables<'_> = serde_json::from_value(listing).unwrap();
        assert_eq!(dropped_in(&listing, "dombus", "vif3.0"), 7);
        assert_eq!(dropped_in(&listing, "dombus", "vif9.0"), 0);
        assert_eq!(dropped_in(&listing, "other", "vif3.0"), 0);
    }

    /// A missing `nft` is an error naming the package that has it.
    #[test]
    fn a_missing_nft_names_its_package() {
        let spoof = AntiSpoof::new("/nonexistent/nft".into(), "dombus".into());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for result in [
            rt.block_on(spoof.set("vif3.0", &[ip("192.0.2.2")])),
            rt.block_on(spoof.clear("vif3.0")),
            rt.block_on(spoof.dropped("vif3.0")).map(|_| ()),
            rt.block_on(spoof.clear_all()),
        ] {
            let Err(NetworkError::ToolFailed { tool, message }) = result else { panic!("{result:?}") };
            assert_eq!(tool, "nft");
            assert!(message.contains("nftables") && message.contains("/nonexistent/nft"), "{message}");
        }
    }

    /// An `nft` that writes without end is stopped at the bound, not read whole (`yes` stands
    /// in for it), and its error text is kept.
    #[test]
    fn what_nft_writes_is_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let spoof = AntiSpoof::new("yes".into(), "dombus".into());
        let Err(NetworkError::ToolFailed { message, .. }) = rt.block_on(spoof.run(&["x"], None)) else {
            panic!()
        };
        assert!(message.contains(&format!("exceeds {MAX_OUTPUT} bytes")), "{message}");
        let spoof = AntiSpoof::new("sh".into(), "dombus".into());
        let Err(NetworkError::ToolFailed { message, .. }) =
            rt.block_on(spoof.run(&["-c", "echo 'Error: no such chain' >&2; exit 1"], None))
        else {
            panic!()
        };
        assert_eq!(message, "Error: no such chain");
    }

    /// The index of the link `name`.
    async fn index_of(handle: &rtnetlink::Handle, name: &str) -> u32 {
        let link = handle.link().get().match_name(name).execute().try_next().await.unwrap().unwrap();
        link.header.index
    }

    /// The ruleset of this namespace, as `nft list ruleset` prints it.
    fn ruleset() -> String {
        let out = std::process::Command::new("nft").args(["list", "ruleset"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Makes the veth pair `vif<n>.0` / `g<n>`, both up.
    async fn vif(handle: &rtnetlink::Handle, n: u32) {
        let (vif, guest) = (format!("vif{n}.0"), format!("g{n}"));
        handle.link().add(LinkVeth::new(&vif, &guest).build()).execute().await.unwrap();
        for name in [vif, guest] {
            let index = index_of(handle, &name).await;
            handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.unwrap();
        }
    }

    /// `set` again replaces the addresses, an empty `set` and `clear` remove the chain, `clear`
    /// of a vif without rules or without a link is Ok, `clear_all` removes the table, and `nft`'s
    /// own error text comes back.
    #[test]
    fn set_replaces_and_clear_removes() {
        if !namespaces_or_skip("set_replaces_and_clear_removes") {
            return;
        }
        in_new_namespace(|| async {
            let (conn, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(conn);
            vif(&handle, 3).await;
            vif(&handle, 4).await;
            let spoof = anti_spoof();
            let chains = |rules: &str| rules.matches("chain vif3.0 {").count();

            spoof.set("vif3.0", &[ip("10.9.0.2"), ip("2001:db8::2")]).await.unwrap();
            let rules = ruleset();
            assert!(rules.contains("10.9.0.2") && rules.contains("2001:db8::2"), "{rules}");
            assert!(rules.contains("hook ingress device \"vif3.0\""), "{rules}");
            spoof.set("vif3.0", &[ip("10.9.0.3")]).await.unwrap();
            let rules = ruleset();
            assert!(rules.contains("10.9.0.3") && !rules.contains("10.9.0.2"), "{rules}");
            assert!(!rules.contains("2001:db8::2"), "{rules}");
            assert_eq!(chains(&rules), 1, "{rules}");
            assert_eq!(spoof.dropped("vif3.0").await.unwrap(), 0);

            spoof.set("vif3.0", &[]).await.unwrap();
            assert_eq!(chains(&ruleset()), 0);
            assert_eq!(spoof.dropped("vif3.0").await.unwrap(), 0);
            spoof.clear("vif3.0").await.unwrap();
            spoof.set("vif3.0", &[ip("10.9.0.3")]).await.unwrap();
            spoof.clear("vif3.0").await.unwrap();
            assert_eq!(chains(&ruleset()), 0);
            spoof.clear("vif9.0").await.unwrap();
            assert_eq!(spoof.dropped("vif9.0").await.unwrap(), 0);

            // A vif whose link goes away with its rules still in place.
            spoof.set("vif4.0", &[ip("10.9.0.4")]).await.unwrap();
            handle.link().del(index_of(&handle, "vif4.0").await).execute().await.unwrap();
            spoof.clear("vif4.0").await.unwrap();
            assert!(!ruleset().contains("vif4.0"));

            // A name longer than any link's: the kernel refuses the chain's hook.
            let long = "vif1234567890123.0";
            let Err(NetworkError::ToolFailed { tool, message }) = spoof.set(long, &[ip("10.9.0.9")]).await
            else {
                panic!("rules set on a link whose name no link can have")
            };
            assert_eq!(tool, "nft");
            assert!(message.contains(long) && message.contains("Numerical result out of range"), "{message}");

            spoof.set("vif3.0", &[ip("10.9.0.3")]).await.unwrap();
            spoof.clear_all().await.unwrap();
            assert!(!ruleset().contains("dombus"));
            spoof.clear_all().await.unwrap();
            assert_eq!(spoof.dropped("vif3.0").await.unwrap(), 0);
        });
    }

    /// The MAC address of `vif3.0`, which the guest's side knows statically (so that the guest
    /// sends no ARP, whose sender the rules would judge too).
    const VIF_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x30];
    /// `vif3.0`'s addresses.
    const VIF_ADDRS: [&str; 2] = ["10.9.0.1", "2001:db8::1"];
    /// The guest's addresses: the ones it is allowed, and the ones it spoofs.
    const GUEST_ADDRS: [&str; 4] = ["10.9.0.2", "10.9.0.66", "2001:db8::2", "2001:db8::66"];
    /// Where `vif3.0`'s side listens.
    const PORT: u16 = 5000;

    /// The guests' namespaces of a test under `dir`, let go when the test ends, also when it
    /// fails.
    struct Guests(GuestNamespaces, PathBuf);

    impl Guests {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("dombus-spoof-{name}-{}", std::process::id()));
            Guests(GuestNamespaces::new(dir.clone()).unwrap(), dir)
        }
    }

    impl Drop for Guests {
        fn drop(&mut self) {
            let _ = self.0.remove_all();
            let _ = std::fs::remove_dir(&self.1);
        }
    }

    /// Makes the vif `vif3.0` (with [`VIF_ADDRS`]) whose guest's end `g3` (with
    /// [`GUEST_ADDRS`]) is in a namespace of its own, returned. Both ends up, IPv6 addresses
    /// without duplicate address detection, and `vif3.0`'s MAC address known statically on the
    /// guest's side, so that the guest sends no neighbour discovery of its own but what the
    /// kernel does for link-local addresses.
    async fn vif_and_guest(guests: &GuestNamespaces) -> PathBuf {
        use rtnetlink::packet_route::address::AddressHeaderFlags;

        async fn add_addresses(handle: &rtnetlink::Handle, link: u32, addrs: &[&str]) {
            for a in addrs {
                let a = ip(a);
                let mut add = handle.address().add(link, a, if a.is_ipv4() { 24 } else { 64 });
                add.message_mut().header.flags |= AddressHeaderFlags::Nodad;
                add.execute().await.unwrap();
            }
        }

        let guest = guests.ensure(3).unwrap();
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(conn);
        handle
            .link()
            .add(LinkVeth::new("vif3.0", "g3").address(VIF_MAC.to_vec()).build())
            .execute()
            .await
            .unwrap();
        let ns = std::fs::File::open(&guest).unwrap();
        handle
            .link()
            .set(LinkUnspec::new_with_name("g3").setns_by_fd(ns.as_raw_fd()).build())
            .execute()
            .await
            .unwrap();
        let vif = index_of(&handle, "vif3.0").await;
        add_addresses(&handle, vif, &VIF_ADDRS).await;
        handle.link().set(LinkUnspec::new_with_index(vif).up().build()).execute().await.unwrap();
        block_on_in(Namespace::Path(guest.clone()), || async {
            let (conn, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(conn);
            let g3 = index_of(&handle, "g3").await;
            add_addresses(&handle, g3, &GUEST_ADDRS).await;
            handle.link().set(LinkUnspec::new_with_index(g3).up().build()).execute().await.unwrap();
            for a in VIF_ADDRS {
                handle.neighbours().add(g3, ip(a)).link_layer_address(&VIF_MAC).execute().await.unwrap();
            }
        })
        .unwrap();
        guest
    }

    /// Sends one datagram from `src` (an address of `g3`) to `vif3.0`'s address of its family,
    /// inside the guest's namespace.
    fn send_from(guest: &Path, src: &str) {
        let src = ip(src);
        let to = ip(VIF_ADDRS[usize::from(src.is_ipv6())]);
        run_in(Namespace::Path(guest.to_path_buf()), move || {
            let socket = std::net::UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
            socket.send_to(b"x", SocketAddr::new(to, PORT)).unwrap();
        })
        .unwrap();
    }

    /// The sources of what `socket` receives until nothing has come for 300 ms.
    async fn received(socket: &tokio::net::UdpSocket) -> Vec<IpAddr> {
        let mut sources = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(got) = tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf)).await
        {
            sources.push(got.unwrap().1.ip());
        }
        sources
    }

    /// Sends from `src` until something comes through (the link may take a moment to carry).
    async fn wait_for_traffic(guest: &Path, socket: &tokio::net::UdpSocket, src: &str) {
        for _ in 0..20 {
            send_from(guest, src);
            if !received(socket).await.is_empty() {
                return;
            }
        }
        panic!("nothing from the allowed address {src} came through");
    }

    /// Real traffic from a guest's namespace: what comes from the allowed address passes, what
    /// comes from another is dropped and counted; `set` again allows only the new address; after
    /// `clear` everything passes.
    #[test]
    fn a_spoofed_source_is_dropped_and_counted_while_the_allowed_one_passes() {
        if !namespaces_or_skip("a_spoofed_source_is_dropped_and_counted_while_the_allowed_one_passes") {
            return;
        }
        in_new_namespace(|| async {
            let guests = Guests::new("v4");
            let guest = vif_and_guest(&guests.0).await;
            let socket = tokio::net::UdpSocket::bind((ip(VIF_ADDRS[0]), PORT)).await.unwrap();

            let spoof = anti_spoof();
            spoof.set("vif3.0", &[ip("10.9.0.2")]).await.unwrap();
            wait_for_traffic(&guest, &socket, "10.9.0.2").await;
            for _ in 0..3 {
                send_from(&guest, "10.9.0.66");
            }
            send_from(&guest, "10.9.0.2");
            assert_eq!(received(&socket).await, vec![ip("10.9.0.2")], "only the allowed source passes");
            assert_eq!(spoof.dropped("vif3.0").await.unwrap(), 3);

            spoof.set("vif3.0", &[ip("10.9.0.66")]).await.unwrap();
            send_from(&guest, "10.9.0.2");
            send_from(&guest, "10.9.0.66");
            assert_eq!(received(&socket).await, vec![ip("10.9.0.66")], "only the new address passes");
            assert_eq!(spoof.dropped("vif3.0").await.unwrap(), 1, "the counters start anew");

            spoof.clear("vif3.0").await.unwrap();
            send_from(&guest, "10.9.0.2");
            send_from(&guest, "10.9.0.66");
            assert_eq!(received(&socket).await, vec![ip("10.9.0.2"), ip("10.9.0.66")], "everything passes");
            assert_eq!(spoof.dropped("vif3.0").await.unwrap(), 0);
        });
    }

    /// The same for IPv6, the vif given an address of each family: the allowed IPv6 source
    /// passes, another is dropped and counted; the guest's IPv4 from its allowed address still
    /// passes; with only an IPv4 address given, no IPv6 passes from a global address.
    #[test]
    fn a_spoofed_ipv6_source_is_dropped_and_counted() {
        if !namespaces_or_skip("a_spoofed_ipv6_source_is_dropped_and_counted") {
            return;
        }
        in_new_namespace(|| async {
            let guests = Guests::new("v6");
            let guest = vif_and_guest(&guests.0).await;
            let v4 = tokio::net::UdpSocket::bind((ip(VIF_ADDRS[0]), PORT)).await.unwrap();
            let v6 = tokio::net::UdpSocket::bind((ip(VIF_ADDRS[1]), PORT)).await.unwrap();

            let spoof = anti_spoof();
            spoof.set("vif3.0", &[ip("10.9.0.2"), ip("2001:db8::2")]).await.unwrap();
            wait_for_traffic(&guest, &v6, "2001:db8::2").await;
            for _ in 0..2 {
                send_from(&guest, "2001:db8::66");
            }
            send_from(&guest, "2001:db8::2");
            assert_eq!(received(&v6).await, vec![ip("2001:db8::2")], "only the allowed source passes");
            send_from(&guest, "10.9.0.2");
            assert_eq!(received(&v4).await, vec![ip("10.9.0.2")]);
            assert_eq!(spoof.dropped("vif3.0").await.unwrap(), 2);

            spoof.set("vif3.0", &[ip("10.9.0.2")]).await.unwrap();
            send_from(&guest, "2001:db8::2");
            send_from(&guest, "2001:db8::66");
            assert_eq!(
                received(&v6).await,
                Vec::<IpAddr>::new(),
                "no IPv6 passes without an IPv6 address given"
            );
            assert_eq!(spoof.dropped("vif3.0").await.unwrap(), 2);
        });
    }
}
