//! The manager's side of its protocol with the agents ([`dombus_agent::manager`]): one session
//! per domain, registered under the domain the link names and the name the toolstack gave it.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dombus::transport::types::DomId;
use dombus::transport::vsock::mux::VsockStream;
use dombus_agent::PortListener;
use dombus_agent::manager::{
    Answer, Call, FromManager, MAX_REPORTED_LINKS, Peer, ToManager, VERSION, read_message, valid_name,
    write_message,
};
use tokio::sync::mpsc;

use crate::core::{AgentRec, Core, MAX_AGENTS};
use crate::watch::ManagerEvent;

/// How long an agent has to say hello.
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// Notices queued for one agent before it counts as not reading them.
const NOTICES: usize = 1024;
/// Most service names one domain registers.
const MAX_SERVICES: usize = 256;
/// Decisions one domain may ask for in a second (and at once, in a burst). Past it a call is
/// answered `Failed` without a decision: a domain cannot flood the manager, nor push other
/// domains' decisions out of the audit trail.
pub const DECISIONS_PER_SECOND: u32 = 256;

/// Accepts agents' sessions on the manager's port until the listener ends.
pub(crate) async fn accept(core: Arc<Core>, mut listener: Box<dyn PortListener>) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                tokio::spawn(serve(core.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the connection manager's listener ended");
                return;
            }
        }
    }
}

/// One agent's session.
async fn serve(core: Arc<Core>, stream: VsockStream) {
    let dom = stream.peer_domain();
    match session(&core, dom, stream).await {
        Ok(()) => tracing::debug!(domain = %dom, "agent session ended"),
        Err(e) => tracing::info!(domain = %dom, error = %e, "agent session ended"),
    }
}

async fn session(core: &Arc<Core>, dom: DomId, stream: VsockStream) -> io::Result<()> {
    let mut stopping = core.stopping.subscribe();
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = Counting { inner: rd, core: core.clone() };
    let hello = tokio::time::timeout(HELLO_WAIT, read_message::<_, ToManager>(&mut rd))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello"))??;
    match hello {
        Some(ToManager::Hello { version }) if version == VERSION => {}
        Some(ToManager::Hello { version }) => {
            let reason = format!("protocol version {version}; this manager speaks {VERSION}");
            write_message(&mut wr, &FromManager::Refused { reason: reason.clone() }).await?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "the first message was not a hello")),
    }
    if dom == core.me {
        write_message(
            &mut wr,
            &FromManager::Refused { reason: "the backend domain is the manager's own".into() },
        )
        .await?;
        return Ok(());
    }
    // The name the toolstack gave the domain: the only one it goes by.
    let name = core.ops.domain_name(dom).filter(|n| valid_name(n));
    let (tx, mut notices) = mpsc::channel(NOTICES);
    let serial = core.next_session.fetch_add(1, Ordering::Relaxed);
    let generation = {
        let mut st = core.state();
        if !st.agents.contains_key(&dom) && st.agents.len() >= MAX_AGENTS {
            None
        } else {
            // A newer session of the same domain replaces the older (whose notices then end).
            st.register(
                dom,
                AgentRec {
                    session: serial,
                    name: name.clone(),
                    tx: tx.clone(),
                    services: BTreeMap::new(),
                    links: Vec::new(),
                },
            );
            core.registered(&st, dom);
            Some(st.generation)
        }
    };
    let Some(generation) = generation else {
        let reason = format!("the manager serves at most {MAX_AGENTS} domains");
        write_message(&mut wr, &FromManager::Refused { reason: reason.clone() }).await?;
        return Err(io::Error::other(reason));
    };
    tracing::info!(domain = %dom, name = name.as_deref().unwrap_or("-"), "domain registered");
    let welcome = FromManager::Welcome { domid: dom.0, name, generation };
    let result = async {
        write_message(&mut wr, &welcome).await?;
        let writer = async {
            while let Some(m) = notices.recv().await {
                write_message(&mut wr, &m).await?;
            }
            Ok::<(), io::Error>(())
        };
        let reader = async {
            let mut budget = Budget::new(DECISIONS_PER_SECOND);
            loop {
                let Some(m) = read_message::<_, ToManager>(&mut rd).await? else { return Ok(()) };
                match m {
                    ToManager::Call { id, call } => {
                        let decides = matches!(call, Call::Introduce { .. } | Call::Check { .. });
                        let answer = if decides && !budget.take() {
                            if budget.warn() {
                                tracing::warn!(domain = %dom, "more than {DECISIONS_PER_SECOND} decisions a second asked: calls answered without one");
                            }
                            Answer::Failed {
                                reason: format!("more than {DECISIONS_PER_SECOND} decisions a second from this domain: slow down"),
                            }
                        } else {
                            handle(core, dom, call).await
                        };
                        if id != 0 && tx.send(FromManager::Reply { id, answer }).await.is_err() {
                            return Ok(());
                        }
                    }
                    ToManager::Links(links) => {
                        let mut st = core.state();
                        if let Some(a) = st.agents.get_mut(&dom).filter(|a| a.session == serial) {
                            a.links = links.into_iter().take(MAX_REPORTED_LINKS).collect();
                        }
                    }
                    ToManager::Hello { .. } => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "a second hello"));
                    }
                }
            }
        };
        tokio::select! {
            r = writer => r,
            r = reader => r,
            _ = stopping.wait_for(|s| *s) => Ok(()),
        }
    }
    .await;
    {
        let mut st = core.state();
        let name = st.agents.get(&dom).filter(|a| a.session == serial).and_then(|a| a.name.clone());
        if st.unregister(dom, serial) {
            tracing::info!(domain = %dom, "domain unregistered (its agent's session ended)");
            core.events.publish(ManagerEvent::DomainGone { domid: dom.0, name });
        }
    }
    result
}

/// Answers one call of domain `dom`'s agent.
async fn handle(core: &Arc<Core>, dom: DomId, call: Call) -> Answer {
    match call {
        Call::Introduce { target, port, link } => {
            if let Peer::Name(n) = &target
                && !valid_name(n)
            {
                return Answer::Failed { reason: format!("{n:?} is not a domain name") };
            }
            let d = core.decide(dom, &target, port);
            let Some(peer) = d.target.filter(|_| d.allowed) else {
                return Answer::Denied { decision: d.id };
            };
            let rendezvous = if link && peer != core.me {
                match core.introduce(dom, peer, port, d.id) {
                    Ok(path) => Some(path),
                    Err(e) => {
                        tracing::error!(a = %dom, b = %peer, error = %e, "cannot make a rendezvous");
                        return Answer::Failed {
                            reason: format!("the manager could not make a rendezvous: {e}"),
                        };
                    }
                }
            } else {
                None
            };
            Answer::Allowed { decision: d.id, peer: peer.0, rendezvous }
        }
        Call::Check { source, port } => {
            let d = core.decide(DomId(source), &Peer::Id(dom.0), port);
            if d.allowed {
                Answer::Allowed { decision: d.id, peer: source, rendezvous: None }
            } else {
                Answer::Denied { decision: d.id }
            }
        }
        Call::Service { port, name } => {
            if let Some(n) = name.as_deref()
                && !valid_name(n)
            {
                return Answer::Failed { reason: format!("{n:?} is not a service name") };
            }
            let mut st = core.state();
            let generation = st.generation;
            let Some(a) = st.agents.get_mut(&dom) else {
                return Answer::Failed { reason: "not registered".into() };
            };
            match name {
                Some(n) if a.services.len() < MAX_SERVICES || a.services.contains_key(&port) => {
                    a.services.insert(port, n);
                }
                Some(_) => return Answer::Failed { reason: format!("at most {MAX_SERVICES} service names") },
                None => {
                    a.services.remove(&port);
                }
            }
            // Rules may name services: the domain's own decisions cached for its ports no
            // longer hold (a domain names its ports when it starts listening, before others
            // connect to them).
            let _ = a.tx.try_send(FromManager::PolicyChanged { generation });
            Answer::Done
        }
    }
}

/// A session's reading half, counting what it carries into [`Core::received`].
struct Counting<R> {
    inner: R,
    core: Arc<Core>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counting<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.core.received.fetch_add(n as u64, Ordering::Relaxed);
        poll
    }
}

/// A token bucket of decisions: `rate` a second, at most `rate` at once.
struct Budget {
    rate: u32,
    tokens: f64,
    at: tokio::time::Instant,
    warned: Option<tokio::time::Instant>,
}

impl Budget {
    fn new(rate: u32) -> Budget {
        Budget { rate, tokens: f64::from(rate), at: tokio::time::Instant::now(), warned: None }
    }

    /// Takes one decision's token, if there is one.
    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let rate = f64::from(self.rate);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether to log the overflow now (once a second at most).
    fn warn(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let due = self.warned.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1));
        if due {
            self.warned = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_at_its_rate_up_to_its_burst() {
        let mut b = Budget::new(4);
        assert_eq!((0..6).filter(|_| b.take()).count(), 4);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..6).filter(|_| b.take()).count(), 2);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!((0..6).filter(|_| b.take()).count(), 4);
        assert!(b.warn());
        assert!(!b.warn());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.warn());
    }
}
