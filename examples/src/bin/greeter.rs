//! A service author's whole program: a trait, its implementation, a server and a command-line
//! client, all from `#[dombus::service]` (docs/codegen.md walks through it).
//!
//! ```text
//! greeter serve unix:/tmp/greeter.sock &
//! greeter unix:/tmp/greeter.sock hello world --excited
//! greeter unix:/tmp/greeter.sock guests --json
//! greeter unix:/tmp/greeter.sock arrivals          # new guests as they come, until Ctrl-C
//! echo '{"name": "json", "excited": false}' | greeter unix:/tmp/greeter.sock hello --stdin
//! ```
//! Any dombus address works: `xen:1:7000` with `--sim <socket> --domid N` (the simulated
//! hypervisor; `--open-links` where no connection manager runs, as in the two-domain test) or
//! `--xen`, `vsock:CID:PORT`, `tcp:HOST:PORT`.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use dombus::rpc::cli::{self, NetArgs};
use dombus::{Address, Events, Server, ServerConfig, Topic, TopicLimits};
use serde::{Deserialize, Serialize};

/// Greets people and remembers them.
#[dombus::service(version = 1)]
pub trait Greeter {
    /// Says hello to `name`.
    #[idempotent]
    async fn hello(&self, name: String, excited: bool) -> Result<String, GreetError>;
    /// Everyone greeted so far.
    #[idempotent]
    async fn guests(&self) -> Vec<Guest>;
    /// Guests as they are first greeted (a subscription: it starts with everyone so far).
    async fn arrivals(&self) -> Events<Guest, Vec<Guest>>;
}

/// Why a greeting was refused.
#[derive(Debug, Serialize, Deserialize)]
pub enum GreetError {
    /// The name was empty or too long.
    BadName {
        /// Its length.
        length: usize,
    },
}

/// Someone greeted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Guest {
    /// Their name.
    pub name: String,
    /// Its length.
    pub letters: usize,
}

struct Host {
    guests: Arc<Mutex<BTreeSet<String>>>,
    arrivals: Topic<Guest, Vec<Guest>>,
}

impl Host {
    fn new() -> Host {
        let guests: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let all = guests.clone();
        let arrivals = Topic::with_snapshot(TopicLimits::default(), move || {
            let guests = all.lock().unwrap_or_else(|p| p.into_inner());
            guests.iter().map(|n| Guest::new(n)).collect()
        });
        Host { guests, arrivals }
    }
}

impl Guest {
    fn new(name: &str) -> Guest {
        Guest { name: name.to_string(), letters: name.chars().count() }
    }
}

impl Greeter for Host {
    async fn hello(&self, name: String, excited: bool) -> Result<String, GreetError> {
        if name.is_empty() || name.len() > 64 {
            return Err(GreetError::BadName { length: name.len() });
        }
        let greeting = format!("hello, {name}{}", if excited { "!" } else { "." });
        let mut guests = self.guests.lock().unwrap_or_else(|p| p.into_inner());
        if !guests.contains(&name) {
            // Published under the lock: a snapshot never holds a guest whose arrival comes after.
            self.arrivals.publish(Guest::new(&name));
            guests.insert(name);
        }
        Ok(greeting)
    }

    async fn guests(&self) -> Vec<Guest> {
        let guests = self.guests.lock().unwrap_or_else(|p| p.into_inner());
        guests.iter().map(|n| Guest::new(n)).collect()
    }

    async fn arrivals(&self) -> Events<Guest, Vec<Guest>> {
        self.arrivals.events()
    }
}

/// `greeter serve ADDR [--sim SOCKET --domid N | --xen]`: serves until interrupted.
async fn serve(argv: Vec<String>) -> anyhow::Result<()> {
    use clap::{Arg, Args, Command, FromArgMatches};
    let cmd = NetArgs::augment_args(Command::new("greeter serve").arg(Arg::new("addr").required(true)));
    let m = cmd.get_matches_from(argv);
    let net = NetArgs::from_arg_matches(&m)?.net()?;
    let addr: Address = m.get_one::<String>("addr").map(String::as_str).unwrap_or_default().parse()?;
    let server = Server::new(net, ServerConfig::default());
    let handle = server.serve(&addr, Host::new().into_service()).await?;
    eprintln!("greeter: serving on {}", handle.addr());
    tokio::signal::ctrl_c().await?;
    handle.stop().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("serve") {
        argv.remove(1);
        return match serve(argv).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("greeter: {e:#}");
                ExitCode::from(cli::exit::REFUSED)
            }
        };
    }
    cli::main_for::<GreeterRequest>("greeter", argv).await
}
