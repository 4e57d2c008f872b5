//! Command-line glue: `#[dombus::service]` implements [`ServiceCli`] (a clap subcommand per
//! method, the request built from its arguments); this module holds the shared part — argument
//! parsing, arguments as JSON from stdin, and printing results as JSON or readable text.
//! Built with the `cli` feature.
//!
//! On the command line, the first argument of a method is positional (unless it is a `bool` or
//! an `Option`), the others are `--kebab-case` flags; `bool` arguments are switches, `Option`
//! arguments may be left out. A value is read as JSON when it parses as the argument's type
//! (`42`, `true`, `[1,2]`, `{"a":1}`) and otherwise as a string, so `--name disk0` and
//! `--size 10` both work. `--stdin` reads all the arguments as one JSON object instead, for
//! types that are awkward to type.
//!
//! Text output is for people: byte counts ([`crate::size`]) as `10G`, a service's error as its
//! `Display` sentence, a method's help as the first sentence of its doc comment. `--json` output
//! is for scripts: serde's form, exactly (integers, error variants and fields).

use dombus_transport_xen::types::DomId;
use std::fmt::Display;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tarpc::client::RpcError;
use tarpc::client::stub::Stub;

use futures::StreamExt;

use crate::client::{Client, ClientConfig, RawClient};
use crate::events::{self, Cursor, Subscription, Update};
use crate::wire::{Request, ServiceDescriptor};
use crate::{Address, Net};

mod people;

/// Exit statuses of command-line calls, so that scripts can tell failures apart.
pub mod exit {
    /// The call succeeded.
    pub const OK: u8 = 0;
    /// The service answered with its error (the method's `Err`).
    pub const FAILED: u8 = 1;
    /// The command line was wrong.
    pub const USAGE: u8 = 2;
    /// Refused or denied before any call: nothing listening, no such service, not allowed,
    /// incompatible server.
    pub const REFUSED: u8 = 3;
    /// The call itself failed: deadline passed, connection lost, server error.
    pub const CALL: u8 = 4;
}

/// How a command-line tool reaches `xen:` addresses (other addresses need nothing).
#[derive(Debug, Clone, Args)]
#[command(about = None, long_about = None)]
pub struct NetArgs {
    /// Attach this process to the simulated hypervisor listening on SOCKET, as its domain's
    /// agent (instead of going through the domain's agent).
    #[arg(long, value_name = "SOCKET", global = true, env = "DOMBUS_SIM")]
    pub sim: Option<PathBuf>,
    /// Our domain id on the simulated hypervisor (0: the toolstack's domain).
    #[arg(long, value_name = "DOMID", default_value_t = DomId::DOM0, global = true)]
    pub domid: DomId,
    /// Attach this process to real Xen (/dev/xen/*, xenstored) as its domain's agent.
    #[arg(long, global = true, conflicts_with = "sim")]
    pub xen: bool,
    /// The backend domain (what xen:backend:PORT names), with --sim or --xen.
    #[arg(long, value_name = "DOMID", default_value_t = DomId::DOM0, global = true)]
    pub backend_domain: DomId,
    /// With --sim or --xen: no connection manager on this host, any domain may ask any other
    /// for a link (two domains of a test, a host without a backend domain's manager).
    #[arg(long, global = true)]
    pub open_links: bool,
    /// The domain's agent, which xen: addresses go through [default: $DOMBUS_AGENT, else
    /// /run/dombus/agent.sock for root, else $XDG_RUNTIME_DIR/dombus/agent.sock].
    #[arg(long, value_name = "PATH", global = true, env = "DOMBUS_AGENT")]
    pub agent: Option<PathBuf>,
    /// With --sim or --xen: also be the agent of the domain's other processes, on this socket.
    #[arg(long, value_name = "PATH", global = true)]
    pub serve_agent: Option<PathBuf>,
    /// How long a call (including connecting) may take, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0, global = true)]
    pub timeout: f64,
}

impl NetArgs {
    /// Through the domain's agent at `agent` (`None`: the default socket), with `timeout`.
    pub fn through_agent(agent: Option<PathBuf>, timeout: Duration) -> NetArgs {
        NetArgs {
            sim: None,
            domid: DomId::DOM0,
            xen: false,
            backend_domain: DomId::DOM0,
            open_links: false,
            agent,
            serve_agent: None,
            timeout: timeout.as_secs_f64(),
        }
    }

    /// The transports these options give: `xen:` through the domain's agent, or, with `--sim` or
    /// `--xen`, through this process attached as its domain (serving the domain's other
    /// processes too with `--serve-agent`).
    pub fn net(&self) -> std::io::Result<Net> {
        use dombus_agent::attach::{Attach, Hypervisor};
        let hypervisor = match (&self.sim, self.xen) {
            (Some(sock), _) => Some(Hypervisor::Sim(sock.clone())),
            (None, true) => Some(Hypervisor::Xen),
            (None, false) => None,
        };
        let mut net = match hypervisor {
            Some(hypervisor) => {
                let links = if self.open_links {
                    dombus_transport_xen::vsock::LinkSetUp::Open
                } else {
                    dombus_transport_xen::vsock::LinkSetUp::Introduced
                };
                let attach =
                    Attach { hypervisor, domid: self.domid, backend_domain: self.backend_domain, links };
                let sockets = attach.start()?;
                let serving = match &self.serve_agent {
                    Some(path) => Some(dombus_agent::Agent::serve(
                        sockets.clone(),
                        dombus_agent::AgentConfig::new(path.clone()),
                    )?),
                    None => None,
                };
                Net::new().with_domain(sockets, serving)
            }
            None => {
                if self.serve_agent.is_some() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "--serve-agent needs --sim or --xen (this process attaches as its domain)",
                    ));
                }
                let agent = self.agent.clone().unwrap_or_else(dombus_agent::default_socket);
                Net::new().with_agent(dombus_agent::AgentClient::new(agent))
            }
        };
        net.xen_connect_wait = Some(self.timeout());
        Ok(net)
    }

    /// The `--timeout`.
    pub fn timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.timeout).unwrap_or(Duration::from_secs(30))
    }

    /// A call context with the `--timeout` as deadline.
    pub fn context(&self) -> tarpc::context::Context {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + self.timeout();
        ctx
    }
}

/// The id of the `--stdin` flag every method subcommand has.
pub const STDIN: &str = "dombus-stdin";

/// Generated by `#[dombus::service]` for `<Trait>Request`.
pub trait ServiceCli: Request {
    /// The service's command: one subcommand per method.
    fn command() -> Command;
    /// The request described by a method subcommand (`name` and its matches).
    fn request(method: &str, matches: &ArgMatches) -> Result<Self, CliError>;
    /// The response for scripts and for people: what the method returned, or its error.
    fn outcome(response: Self::Response) -> Result<Outcome, CliError>;
    /// For a stream method's request, its subscription through `raw` (from `from`, or from
    /// the current state), its updates shown; any other request back.
    fn subscribe(self, raw: &RawClient, from: Option<Cursor>) -> Result<Updates, Self>;
}

/// A subscription's updates for the command line ([`ServiceCli::subscribe`]).
pub type Updates = futures::stream::BoxStream<'static, Result<ShownUpdate, RpcError>>;

/// One update of a subscription, for scripts and for people.
#[derive(Debug, Clone, PartialEq)]
pub struct ShownUpdate {
    /// Where the subscription stands after it.
    pub cursor: Cursor,
    /// Whether it is an event (not a resync).
    pub is_event: bool,
    /// `{"cursor": …, "event": …}` or `{"cursor": …, "resync": {"reason": …, "snapshot": …}}`.
    pub json: Value,
    /// For people: the cursor and the event on one line (a resync's snapshot on the lines
    /// after it).
    pub text: String,
}

/// [`Updates`] of a subscription (generated code calls this).
pub fn updates<T, S>(subscription: Subscription<T, S>, from: Option<Cursor>) -> Updates
where
    T: serde::Serialize + DeserializeOwned + Send + Unpin + 'static,
    S: serde::Serialize + DeserializeOwned + Send + Unpin + 'static,
{
    let subscription = match from {
        Some(cursor) => subscription.from(cursor),
        None => subscription,
    };
    Box::pin(subscription.map(|r| r.map(|u| show_update(&u))))
}

fn show_update<T: serde::Serialize, S: serde::Serialize>(update: &Update<T, S>) -> ShownUpdate {
    let cursor = update.cursor();
    let json_of =
        |v: &dyn erased::Json| v.json().unwrap_or_else(|e| Value::String(format!("(cannot show: {e})")));
    match update {
        Update::Event { event, .. } => {
            let people =
                people::to_value(event).unwrap_or_else(|e| Value::String(format!("(cannot show: {e})")));
            ShownUpdate {
                cursor,
                is_event: true,
                json: serde_json::json!({ "cursor": cursor.to_string(), "event": json_of(event) }),
                text: format!("{cursor}  {}", one_line(&people)),
            }
        }
        Update::Resync { reason, snapshot, .. } => {
            let mut text = format!("{cursor}  -- resync: {reason}");
            if let Some(snapshot) = snapshot {
                let people = people::to_value(snapshot)
                    .unwrap_or_else(|e| Value::String(format!("(cannot show: {e})")));
                for line in render(&people).lines() {
                    text.push_str("\n    ");
                    text.push_str(line);
                }
            }
            let snapshot = snapshot.as_ref().map_or(Value::Null, |s| json_of(s));
            ShownUpdate {
                cursor,
                is_event: false,
                json: serde_json::json!({
                    "cursor": cursor.to_string(),
                    "resync": { "reason": json_of(reason), "snapshot": snapshot },
                }),
                text,
            }
        }
    }
}

/// Serialization to JSON through a trait object (for [`show_update`]'s one closure).
mod erased {
    pub trait Json {
        fn json(&self) -> serde_json::Result<serde_json::Value>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Result<serde_json::Value> {
            serde_json::to_value(self)
        }
    }
}

/// An event on one line: `Variant: key=value, …` for an enum, `key=value, …` for a struct.
fn one_line(v: &Value) -> String {
    match v {
        Value::Object(map) if map.len() == 1 => render_error(v),
        Value::Object(map) => {
            map.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect::<Vec<_>>().join(", ")
        }
        other => cell(other),
    }
}

/// The id of a stream subcommand's `--from` option.
pub const FROM: &str = "dombus-from";
/// The id of a stream subcommand's `--count` option.
pub const COUNT: &str = "dombus-count";

/// The subcommand of one stream method: its arguments as for [`method_command`], and `--from
/// CURSOR` (resume) and `--count N` (end after N events).
pub fn stream_command(name: &'static str, doc: &'static str, args: &[ArgSpec]) -> Command {
    method_command(name, doc, args)
        .arg(Arg::new(FROM).long("from").value_name("CURSOR").help(
            "Resume after this cursor (EPOCH:SEQ, as printed) instead of starting with the current state",
        ))
        .arg(
            Arg::new(COUNT)
                .long("count")
                .value_name("N")
                .value_parser(clap::value_parser!(u64))
                .help("End after N events (default: until interrupted)"),
        )
}

/// Runs the method subcommand in `matches` through `client` and prints what it answers (`json`:
/// as JSON): a call's outcome, or a stream's updates as they arrive, until `--count` events,
/// Ctrl-C (status 0) or an error that ends the subscription. Answers the exit status.
pub async fn run<Req: ServiceCli>(
    client: &Client<Req>,
    ctx: tarpc::context::Context,
    matches: &ArgMatches,
    json: bool,
) -> Result<u8, CliError> {
    let (command, m) = matches.subcommand().ok_or_else(|| CliError::Usage("no method given".into()))?;
    let request = Req::request(&command.replace('-', "_"), m)?;
    if !request.is_stream() {
        let response = Stub::call(client, ctx, request).await?;
        return Ok(print_outcome(&Req::outcome(response)?, json));
    }
    let from = match m.try_get_one::<String>(FROM) {
        Ok(Some(s)) => Some(s.parse::<Cursor>().map_err(|e| CliError::Usage(format!("--from: {e}")))?),
        _ => None,
    };
    let count = m.try_get_one::<u64>(COUNT).ok().flatten().copied();
    let updates = Req::subscribe(request, client.raw(), from)
        .map_err(|r| CliError::Usage(format!("{} is not a stream", r.method())))?;
    watch(updates, json, count).await
}

/// Prints updates as they arrive (see [`run`]).
pub async fn watch(mut updates: Updates, json: bool, count: Option<u64>) -> Result<u8, CliError> {
    if count == Some(0) {
        return Ok(exit::OK);
    }
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    let mut events = 0u64;
    let mut cursor: Option<Cursor> = None;
    loop {
        let next = tokio::select! {
            _ = &mut interrupted => return Ok(exit::OK),
            next = updates.next() => next,
        };
        match next {
            None => return Ok(exit::OK),
            Some(Ok(update)) => {
                if json {
                    println!("{}", update.json);
                } else {
                    println!("{}", update.text);
                }
                cursor = Some(update.cursor);
                if update.is_event {
                    events += 1;
                    if Some(events) == count {
                        return Ok(exit::OK);
                    }
                }
            }
            Some(Err(e)) if events::is_final(&e) => return Err(CliError::Call(e)),
            Some(Err(e)) => {
                let at = cursor.map_or_else(|| "the start".to_string(), |c| c.to_string());
                eprintln!("warning: {} (polling again from {at})", crate::error_text(&e));
            }
        }
    }
}

/// What a call answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The method's result (for a `Result`, its `Ok` value).
    Ok(Shown),
    /// The `Err` of a method returning a `Result`: the service refused or failed.
    Failed(Shown),
}

/// One answer, for scripts and for people.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    /// As serde gives it (`--json`): every variant, field and integer exactly.
    pub json: Value,
    /// For people: [`render`]ed with byte counts as sizes, an error as its sentence.
    pub text: String,
}

impl Outcome {
    /// A method's result.
    pub fn ok<T: serde::Serialize + ?Sized>(value: &T) -> Result<Outcome, CliError> {
        let people = people::to_value(value).map_err(|e| CliError::Output(e.to_string()))?;
        Ok(Outcome::Ok(Shown { json: to_json(value)?, text: render(&people) }))
    }

    /// A service's error, and its text (from [`ErrorText`]).
    pub fn failed<E: serde::Serialize + ?Sized>(error: &E, text: String) -> Result<Outcome, CliError> {
        Ok(Outcome::Failed(Shown { json: to_json(error)?, text }))
    }
}

/// A service's error for people: its `Display` (the sentence the service wrote) if it has one,
/// else its serde form on one line ([`render_error`]). Generated code calls
/// `(&ErrorText(&e)).text()` with [`ViaDisplay`] and [`ViaSerde`] in scope; for a concrete
/// type, method lookup finds [`ViaDisplay`] first (on `ErrorText`, no reference added) and
/// falls back to [`ViaSerde`] (on `&ErrorText`) only when the error is not `Display`.
pub struct ErrorText<'a, E: ?Sized>(pub &'a E);

/// [`ErrorText`] of an error that is `Display`.
pub trait ViaDisplay {
    /// The error's sentence.
    fn text(&self) -> String;
}

impl<E: Display + ?Sized> ViaDisplay for ErrorText<'_, E> {
    fn text(&self) -> String {
        self.0.to_string()
    }
}

/// [`ErrorText`] of an error that is only `Serialize`.
pub trait ViaSerde {
    /// The error's variant and fields on one line.
    fn text(&self) -> String;
}

impl<E: serde::Serialize + ?Sized> ViaSerde for &ErrorText<'_, E> {
    fn text(&self) -> String {
        match people::to_value(self.0) {
            Ok(v) => render_error(&v),
            Err(e) => format!("(cannot show the error: {e})"),
        }
    }
}

/// Why a command-line call did not produce an [`Outcome`].
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line (or the JSON on stdin) is wrong.
    #[error("{0}")]
    Usage(String),
    /// The call failed before the service answered.
    #[error(transparent)]
    Call(#[from] RpcError),
    /// The result could not be shown.
    #[error("cannot show the result: {0}")]
    Output(String),
}

/// How a method argument appears on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// Must be given (positional if it is the method's first argument).
    Required,
    /// An `Option`: may be left out.
    Optional,
    /// A `bool`: `--name` sets it.
    Switch,
}

/// One method argument, for [`method_command`].
#[derive(Debug, Clone, Copy)]
pub struct ArgSpec {
    /// The argument's name in the trait.
    pub name: &'static str,
    /// Its type, as written in the trait.
    pub ty: &'static str,
    /// How it is given.
    pub kind: ArgKind,
}

/// The subcommand of one method (named in kebab case: `snapshot_create` → `snapshot-create`).
pub fn method_command(name: &'static str, doc: &'static str, args: &[ArgSpec]) -> Command {
    let mut cmd = Command::new(kebab(name)).about(summary(doc)).long_about(doc.trim().to_string());
    let mut ids = Vec::new();
    for (i, a) in args.iter().enumerate() {
        let mut arg = Arg::new(a.name).value_name(a.name.to_uppercase()).help(a.ty.to_string());
        arg = match a.kind {
            ArgKind::Switch => arg.long(kebab(a.name)).action(ArgAction::SetTrue),
            ArgKind::Optional => arg.long(kebab(a.name)),
            ArgKind::Required if i == 0 => arg.required_unless_present(STDIN),
            ArgKind::Required => arg.long(kebab(a.name)).required_unless_present(STDIN),
        };
        ids.push(a.name);
        cmd = cmd.arg(arg);
    }
    cmd.arg(
        Arg::new(STDIN)
            .long("stdin")
            .action(ArgAction::SetTrue)
            .conflicts_with_all(ids)
            .help("Read the arguments as one JSON object from stdin"),
    )
}

fn kebab(name: &str) -> String {
    name.replace('_', "-")
}

/// The one-line summary of a doc comment: its first sentence, whole — the first paragraph's
/// lines joined, up to the first `. ` (or the paragraph's end).
pub fn summary(doc: &str) -> String {
    let paragraph: Vec<&str> =
        doc.trim().lines().map(str::trim).take_while(|line| !line.is_empty()).collect();
    let joined = paragraph.join(" ");
    match joined.find(". ") {
        Some(end) => joined[..=end].to_string(),
        None => joined,
    }
}

/// Parses one command-line value as `T`: as JSON if that fits `T`, else as a JSON string.
pub fn parse_value<T: DeserializeOwned>(s: &str) -> Result<T, String> {
    if let Ok(v) = serde_json::from_str::<T>(s) {
        return Ok(v);
    }
    serde_json::from_value::<T>(Value::String(s.to_string())).map_err(|e| e.to_string())
}

fn value<T: DeserializeOwned>(m: &ArgMatches, name: &str) -> Result<Option<T>, CliError> {
    match m.try_get_one::<String>(name) {
        Ok(Some(s)) => {
            parse_value(s).map(Some).map_err(|e| CliError::Usage(format!("--{}: {e}", kebab(name))))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(CliError::Usage(e.to_string())),
    }
}

/// A required argument.
pub fn required<T: DeserializeOwned>(m: &ArgMatches, name: &str) -> Result<T, CliError> {
    value(m, name)?.ok_or_else(|| CliError::Usage(format!("missing argument --{}", kebab(name))))
}

/// An `Option` argument.
pub fn optional<T: DeserializeOwned>(m: &ArgMatches, name: &str) -> Result<Option<T>, CliError> {
    value(m, name)
}

/// A `bool` argument.
pub fn switch(m: &ArgMatches, name: &str) -> bool {
    m.try_get_one::<bool>(name).ok().flatten().copied().unwrap_or(false)
}

/// The arguments as one JSON object from stdin, if `--stdin` was given.
pub fn from_stdin<T: DeserializeOwned>(m: &ArgMatches) -> Result<Option<T>, CliError> {
    if !switch(m, STDIN) {
        return Ok(None);
    }
    let mut text = String::new();
    std::io::stdin()
        .take(64 << 20)
        .read_to_string(&mut text)
        .map_err(|e| CliError::Usage(format!("reading the arguments from stdin: {e}")))?;
    serde_json::from_str(&text).map(Some).map_err(|e| CliError::Usage(format!("the arguments on stdin: {e}")))
}

/// Serializes a result for [`Outcome`].
pub fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<Value, CliError> {
    serde_json::to_value(v).map_err(|e| CliError::Output(e.to_string()))
}

/// Runs the method subcommand in `matches` (the service command's matches) through `client`.
pub async fn call<Req: ServiceCli>(
    client: &Client<Req>,
    ctx: tarpc::context::Context,
    matches: &ArgMatches,
) -> Result<Outcome, CliError> {
    let (command, m) = matches.subcommand().ok_or_else(|| CliError::Usage("no method given".into()))?;
    // Subcommands are the methods' names in kebab case (`snapshot-create`); method names are
    // snake-case identifiers, so this is exact.
    let request = Req::request(&command.replace('-', "_"), m)?;
    if request.is_stream() {
        return Err(CliError::Usage(format!("{command} is a stream: subscribe to it (cli::run)")));
    }
    let response = Stub::call(client, ctx, request).await?;
    Req::outcome(response)
}

/// The exit status for a failed call: refused before calling, or failed during it.
pub fn call_error_status(e: &CliError) -> u8 {
    match e {
        CliError::Usage(_) => exit::USAGE,
        CliError::Call(RpcError::Send(_)) => exit::REFUSED,
        CliError::Call(_) | CliError::Output(_) => exit::CALL,
    }
}

/// Prints what a call answered (its JSON with `json`, else its text; a service error's text on
/// stderr) and gives the exit status.
pub fn print_outcome(outcome: &Outcome, json: bool) -> u8 {
    match outcome {
        Outcome::Ok(v) if json => println!("{}", v.json),
        Outcome::Ok(v) => println!("{}", v.text),
        Outcome::Failed(e) if json => println!("{}", serde_json::json!({ "error": e.json })),
        Outcome::Failed(e) => eprintln!("error: {}", e.text),
    }
    match outcome {
        Outcome::Ok(_) => exit::OK,
        Outcome::Failed(_) => exit::FAILED,
    }
}

/// A service's error (an enum, as serde puts it in JSON) on one line, for an error type without
/// `Display`: `NotFound: name=disk0`.
pub fn render_error(e: &Value) -> String {
    match e {
        Value::Object(map) if map.len() == 1 => {
            let (variant, inner) = map.iter().next().map(|(k, v)| (k.clone(), v)).unwrap_or_default();
            match inner {
                Value::Object(fields) => {
                    let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect();
                    format!("{variant}: {}", parts.join(", "))
                }
                other => format!("{variant}: {}", cell(other)),
            }
        }
        other => cell(other),
    }
}

/// Descriptors for people: each service, then one line per method.
pub fn render_descriptors(services: &[ServiceDescriptor]) -> String {
    let mut out = Vec::new();
    for s in services {
        let doc = summary(&s.doc);
        out.push(format!(
            "{} (version {}){}",
            s.name,
            s.version,
            if doc.is_empty() { String::new() } else { format!(": {doc}") }
        ));
        for m in &s.methods {
            let args: Vec<String> = m.args.iter().map(|a| format!("{}: {}", a.name, a.ty)).collect();
            let idem = if m.idempotent { "  [idempotent]" } else { "" };
            let kind = if m.stream { "stream " } else { "" };
            out.push(format!("  {kind}{}({}) -> {}{idem}", m.name, args.join(", "), m.result));
            let doc = summary(&m.doc);
            if !doc.is_empty() {
                out.push(format!("      {doc}"));
            }
        }
    }
    out.join("\n")
}

/// A whole command-line client for one service: `PROG [--json] [--sim SOCKET --domid N |
/// --xen] ADDR METHOD [ARGS]`, printing the result and exiting with an [`exit`] status. The
/// glue a service author's own tool needs (see `docs/codegen.md`).
pub async fn main_for<Req: ServiceCli>(prog: &'static str, argv: Vec<String>) -> ExitCode {
    let about = summary(&Req::descriptor().doc);
    let cmd = NetArgs::augment_args(Req::command().name(prog))
        .about(about)
        .arg(
            Arg::new("addr")
                .value_name("ADDR")
                .required(true)
                .help("Where the service listens (xen:CID:PORT, vsock:CID:PORT, unix:PATH, tcp:HOST:PORT)"),
        )
        .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).global(true).help("Print JSON"));
    let matches = match cmd.try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    let json = switch(&matches, "json");
    let status = match run_from_matches::<Req>(&matches, json).await {
        Ok(status) => status,
        Err(e) => {
            eprintln!("error: {}", cli_error_text(&e));
            call_error_status(&e)
        }
    };
    ExitCode::from(status)
}

/// A [`CliError`] for people (with what the server said; see [`crate::error_text`]).
pub fn cli_error_text(e: &CliError) -> String {
    match e {
        CliError::Call(rpc) => crate::error_text(rpc),
        other => other.to_string(),
    }
}

async fn run_from_matches<Req: ServiceCli>(matches: &ArgMatches, json: bool) -> Result<u8, CliError> {
    let net_args = NetArgs::from_arg_matches(matches).map_err(|e| CliError::Usage(e.to_string()))?;
    let addr: Address = matches
        .get_one::<String>("addr")
        .ok_or_else(|| CliError::Usage("no address".into()))?
        .parse()
        .map_err(|e: crate::AddressError| CliError::Usage(e.to_string()))?;
    let net = net_args.net().map_err(|e| CliError::Call(RpcError::Send(Box::new(e))))?;
    let client = Client::<Req>::connect(net, addr, ClientConfig::default(), net_args.timeout())
        .await
        .map_err(|e| CliError::Call(RpcError::Send(Box::new(e))))?;
    run(&client, net_args.context(), matches, json).await
}

/// `value` for people: scalars as they are, objects as aligned `key: value` lines, lists of
/// objects as a table, other lists one item per line; `null` (a method returning nothing) as
/// `ok`.
pub fn render(value: &Value) -> String {
    match value {
        Value::Null => "ok".to_string(),
        Value::Array(items) if items.is_empty() => "(none)".to_string(),
        Value::Array(items) if items.iter().all(Value::is_object) => table(items),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join("\n"),
        Value::Object(map) => {
            let width = map.keys().map(|k| k.chars().count()).max().unwrap_or(0);
            map.iter().map(|(k, v)| format!("{k:<width$}  {}", cell(v))).collect::<Vec<_>>().join("\n")
        }
        scalar => cell(scalar),
    }
}

/// One value on one line.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(rows: &[Value]) -> String {
    let mut columns: Vec<&str> = Vec::new();
    for row in rows {
        for k in row.as_object().into_iter().flat_map(|o| o.keys()) {
            if !columns.contains(&k.as_str()) {
                columns.push(k);
            }
        }
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|c| row.get(*c).map(cell).unwrap_or_else(|| "-".into())).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let line = |items: Vec<String>| {
        let padded: Vec<String> = items.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(columns.iter().map(|c| c.to_uppercase()).collect())];
    out.extend(cells.into_iter().map(line));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_parse_as_json_when_that_fits_the_type_else_as_strings() {
        assert_eq!(parse_value::<u64>("42"), Ok(42));
        assert_eq!(parse_value::<String>("42"), Ok("42".to_string()));
        assert_eq!(parse_value::<String>("disk0"), Ok("disk0".to_string()));
        assert_eq!(parse_value::<Vec<u32>>("[1,2]"), Ok(vec![1, 2]));
        assert_eq!(parse_value::<Option<u8>>("null"), Ok(None));
        assert!(parse_value::<u64>("10G").is_err());
        assert!(parse_value::<u8>("300").is_err());
    }

    #[test]
    fn descriptors_show_streams() {
        let method = |name: &str, stream| crate::wire::MethodDescriptor {
            name: name.into(),
            args: vec![],
            result: if stream { "Events<u64>".into() } else { "u64".into() },
            idempotent: false,
            stream,
            doc: String::new(),
        };
        let d = ServiceDescriptor {
            name: "counter".into(),
            version: 1,
            doc: String::new(),
            methods: vec![method("add", false), method("changes", true)],
        };
        assert_eq!(
            render_descriptors(&[d]),
            "counter (version 1)\n  add() -> u64\n  stream changes() -> Events<u64>"
        );
    }

    #[test]
    fn updates_show_on_one_line_and_as_json() {
        #[derive(serde::Serialize)]
        enum Ev {
            Created { name: String, size: crate::Size },
        }
        let cursor = Cursor { epoch: 0xab, seq: 3 };
        let u: Update<Ev, Vec<u64>> =
            Update::Event { cursor, event: Ev::Created { name: "d0".into(), size: crate::Size(10 << 30) } };
        let shown = show_update(&u);
        assert_eq!(shown.text, "00000000000000ab:3  Created: name=d0, size=10G");
        assert_eq!(
            shown.json,
            json!({"cursor": "00000000000000ab:3", "event": {"Created": {"name": "d0", "size": 10u64 << 30}}})
        );
        assert!(shown.is_event);
        let r: Update<Ev, Vec<u64>> = Update::Resync {
            cursor,
            reason: events::ResyncReason::Missed { count: 2 },
            snapshot: Some(vec![1, 2]),
        };
        let shown = show_update(&r);
        assert_eq!(
            shown.text,
            "00000000000000ab:3  -- resync: 2 events missed (fell behind the server's ring)\n    1\n    2"
        );
        assert_eq!(
            shown.json,
            json!({"cursor": "00000000000000ab:3", "resync": {"reason": {"Missed": {"count": 2}}, "snapshot": [1, 2]}})
        );
        assert!(!shown.is_event);
    }

    #[test]
    fn rendering() {
        assert_eq!(render(&json!(null)), "ok");
        assert_eq!(render(&json!("hi")), "hi");
        assert_eq!(render(&json!({"name": "d0", "size": 10})), "name  d0\nsize  10");
        assert_eq!(
            render(&json!([{"name": "a", "size": 1}, {"name": "bbbb", "extra": true}])),
            "NAME  SIZE  EXTRA\na     1     -\nbbbb  -     true"
        );
        assert_eq!(render(&json!([1, "x"])), "1\nx");
        assert_eq!(render(&json!([])), "(none)");
    }

    #[test]
    fn summaries_are_whole_first_sentences() {
        assert_eq!(summary("Creates a disk.\n\nMore words."), "Creates a disk.");
        assert_eq!(
            summary("Creates an image (qcow2 unless `format` says otherwise),\noptionally a clone. More."),
            "Creates an image (qcow2 unless `format` says otherwise), optionally a clone."
        );
        assert_eq!(summary("Ends the line.\nNext sentence."), "Ends the line.");
        assert_eq!(summary("  No full stop\n  at all\n\nSecond paragraph."), "No full stop at all");
        assert_eq!(summary("Version 1.2 of it."), "Version 1.2 of it.");
        assert_eq!(summary(""), "");
    }

    #[derive(serde::Serialize)]
    enum Sentence {
        Exists { name: String },
    }

    impl std::fmt::Display for Sentence {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let Sentence::Exists { name } = self;
            write!(f, "an image named {name} already exists")
        }
    }

    #[derive(serde::Serialize)]
    enum Bare {
        TooBig { limit: crate::size::Size },
    }

    #[test]
    // The borrow is what generated code writes: without `Display`, `ViaSerde` (on `&ErrorText`)
    // is the one found.
    #[allow(clippy::needless_borrow)]
    fn errors_show_their_display_else_their_serde_form() {
        let e = Sentence::Exists { name: "disk0".into() };
        assert_eq!((&ErrorText(&e)).text(), "an image named disk0 already exists");
        let e = Bare::TooBig { limit: crate::size::Size(1 << 30) };
        assert_eq!((&ErrorText(&e)).text(), "TooBig: limit=1G");

        let e = Sentence::Exists { name: "disk0".into() };
        let Outcome::Failed(shown) = Outcome::failed(&e, (&ErrorText(&e)).text()).unwrap() else {
            panic!("not a failure")
        };
        assert_eq!(shown.json, json!({"Exists": {"name": "disk0"}}));
        assert_eq!(shown.text, "an image named disk0 already exists");
    }

    #[test]
    fn results_show_sizes_for_people_and_exact_json() {
        #[derive(serde::Serialize)]
        struct Disk {
            name: &'static str,
            #[serde(with = "crate::size")]
            size: u64,
        }
        let Outcome::Ok(shown) = Outcome::ok(&[Disk { name: "disk0", size: 10 << 30 }]).unwrap() else {
            panic!("not a result")
        };
        assert_eq!(shown.json, json!([{"name": "disk0", "size": 10737418240u64}]));
        assert_eq!(shown.text, "NAME   SIZE\ndisk0  10G");
    }

    #[test]
    fn method_commands_parse() {
        let cmd = method_command(
            "create",
            "Creates a disk.\n\nMore words.",
            &[
                ArgSpec { name: "name", ty: "String", kind: ArgKind::Required },
                ArgSpec { name: "size_mb", ty: "u64", kind: ArgKind::Required },
                ArgSpec { name: "backing", ty: "Option<String>", kind: ArgKind::Optional },
                ArgSpec { name: "force", ty: "bool", kind: ArgKind::Switch },
            ],
        );
        let m = cmd.clone().try_get_matches_from(["create", "d0", "--size-mb", "10", "--force"]).unwrap();
        assert_eq!(required::<String>(&m, "name").unwrap(), "d0");
        assert_eq!(required::<u64>(&m, "size_mb").unwrap(), 10);
        assert_eq!(optional::<String>(&m, "backing").unwrap(), None);
        assert!(switch(&m, "force"));
        assert!(cmd.clone().try_get_matches_from(["create", "d0"]).is_err(), "--size-mb is required");
        let m = cmd.clone().try_get_matches_from(["create", "--stdin"]).unwrap();
        assert!(switch(&m, STDIN));
        let m = cmd.try_get_matches_from(["create", "d0", "--size-mb", "x"]).unwrap();
        let e = required::<u64>(&m, "size_mb").unwrap_err().to_string();
        assert!(e.starts_with("--size-mb: "), "{e}");
    }
}
