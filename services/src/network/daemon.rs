//! `dombus-netd`: hosts the network service of a network driver domain, in a network
//! namespace of its own.
//!
//! The daemon changes the links of the namespace it runs in, so it refuses the machine's own
//! namespace unless told so (`--allow-root-netns`); `--unshare-netns` makes it a new, empty one
//! first (what `dombus host up` and the tests use).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;
use dombus::rpc::cli::NetArgs;
use dombus::{Address, Server, ServerConfig};

use super::netns;
use super::{DEFAULT_MAX_BRIDGES, DEFAULT_MAX_VIFS, Netlink, Network, NetworkConfig};

/// How the network daemon runs.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Where to serve (repeatable): xen:<this domain>:5200 between domains, unix:PATH locally.
    #[arg(long = "listen", value_name = "ADDR", required = true)]
    pub listen: Vec<Address>,
    /// Where the guests' network namespaces are held (`DIR/dom<domid>`).
    #[arg(long, value_name = "DIR", default_value = "/run/dombus/netns")]
    pub guest_netns_dir: PathBuf,
    /// Run in a new, empty network namespace made at start (the daemon's links go with it).
    #[arg(long)]
    pub unshare_netns: bool,
    /// Run in the machine's own network namespace, changing the machine's links. Without it the
    /// daemon refuses to start there.
    #[arg(long, conflicts_with = "unshare_netns")]
    pub allow_root_netns: bool,
    /// The nft program the anti-spoofing rules are loaded with.
    #[arg(long, value_name = "PATH", default_value = "nft")]
    pub nft: PathBuf,
    /// A domain that is the toolstack (repeatable; default 0): the only domains whose calls may
    /// manage the network. Callers over Unix or TCP are the toolstack too.
    #[arg(long = "toolstack-domain", value_name = "N", default_values_t = [0u32])]
    pub toolstack_domain: Vec<u32>,
    /// Most bridges the service makes.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_BRIDGES)]
    pub max_bridges: usize,
    /// Most vifs the service makes.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_VIFS)]
    pub max_vifs: usize,
    /// How to reach xen: addresses.
    #[command(flatten)]
    pub net: NetArgs,
}

impl DaemonArgs {
    /// The service's configuration these arguments ask for.
    pub fn config(&self) -> NetworkConfig {
        NetworkConfig {
            guest_netns_dir: self.guest_netns_dir.clone(),
            nft: self.nft.clone(),
            toolstack_domains: self.toolstack_domain.clone(),
            max_bridges: self.max_bridges,
            max_vifs: self.max_vifs,
            ..NetworkConfig::default()
        }
    }
}

/// Puts this thread where the daemon may run: a new namespace with `--unshare-netns`; else
/// anywhere but the machine's own namespace, unless `--allow-root-netns`. Call it before any
/// runtime starts, so that every thread of the daemon is in that namespace.
pub fn enter_namespace(args: &DaemonArgs) -> anyhow::Result<()> {
    if args.unshare_netns {
        netns::unshare().context("making the daemon's network namespace (--unshare-netns needs root)")?;
        return Ok(());
    }
    let root = netns::in_root_namespace().context("finding which network namespace this is")?;
    if root && !args.allow_root_netns {
        bail!(
            "refusing to run in the machine's own network namespace: the network service changes the links \
             of the namespace it runs in. Start it in a namespace of its own (`--unshare-netns`, or `ip netns exec`), \
             or pass --allow-root-netns to manage this machine's network"
        );
    }
    Ok(())
}

/// Serves the network service on every `--listen` address until SIGTERM or SIGINT, then stops
/// accepting, lets the guests' namespaces go and returns. The thread must already be in the
/// daemon's namespace ([`enter_namespace`]).
pub async fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let network = Netlink::start(args.config()).await.context("starting the network service")?;
    let net = args.net.net().context("transports")?;
    let server = Server::new(net, ServerConfig::default());
    let guests = args.guest_netns_dir.display().to_string();
    let served = crate::serve_until_stopped(&server, &args.listen, network.clone().into_service(), |h| {
        tracing::info!(addr = %h.addr(), %guests, "network service ready");
    })
    .await;
    network.shut_down().await;
    tracing::info!("stopped");
    served
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;
    use crate::network::netns::{Namespace, run_in};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: DaemonArgs,
    }

    fn args(extra: &[&str]) -> DaemonArgs {
        let base = ["dombus-netd", "--listen", "unix:/run/n.sock"];
        Cli::try_parse_from(base.iter().chain(extra)).unwrap().args
    }

    /// The daemon refuses the machine's own namespace unless told so, runs in another one, and
    /// makes its own with --unshare-netns.
    #[test]
    fn the_machines_own_namespace_is_refused_unless_allowed() {
        if !crate::network::testutil::namespaces_or_skip(
            "the_machines_own_namespace_is_refused_unless_allowed",
        ) {
            return;
        }
        let refused =
            run_in(Namespace::Path("/proc/self/ns/net".into()), || enter_namespace(&args(&[]))).unwrap();
        if netns::in_root_namespace().unwrap() {
            let e = refused.unwrap_err().to_string();
            assert!(e.contains("refusing to run in the machine's own network namespace"), "{e}");
            run_in(Namespace::Path("/proc/self/ns/net".into()), || {
                enter_namespace(&args(&["--allow-root-netns"]))
            })
            .unwrap()
            .unwrap();
        }
        run_in(Namespace::New, || enter_namespace(&args(&[]))).unwrap().unwrap();
        let own = run_in(Namespace::Path("/proc/self/ns/net".into()), || {
            enter_namespace(&args(&["--unshare-netns"])).unwrap();
            netns::in_root_namespace().unwrap()
        });
        assert!(!own.unwrap());
        assert!(
            Cli::try_parse_from(["n", "--listen", "unix:/x", "--unshare-netns", "--allow-root-netns"])
                .is_err()
        );
        assert_eq!(args(&[]).config(), NetworkConfig::default());
        let c = args(&[
            "--guest-netns-dir",
            "/g",
            "--nft",
            "/x/nft",
            "--max-bridges",
            "3",
            "--max-vifs",
            "5",
            "--toolstack-domain",
            "4",
        ])
        .config();
        let want = NetworkConfig {
            guest_netns_dir: "/g".into(),
            nft: "/x/nft".into(),
            toolstack_domains: vec![4],
            max_bridges: 3,
            max_vifs: 5,
            ..NetworkConfig::default()
        };
        assert_eq!(c, want);
    }
}
