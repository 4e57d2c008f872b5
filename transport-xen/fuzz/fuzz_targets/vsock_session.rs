//! Fuzz target: a session fed arbitrary packets from a hostile peer, interleaved with local
//! calls (connect, accept, send, recv, shutdown, close, a larger receive buffer). Packets arrive whole (`handle`), as
//! a decoded header and a payload in its own buffer (`handle_owned`), as the shell passes large
//! ones, or partly read straight into a reader's buffer (`handle_direct`) where
//! `direct_receiver` allows it. The session's queue is drained as the writer task does
//! (`poll_transmit`), after part of it sometimes went out as a connection's task writes it
//! (`transmit_direct`, the link taking a few packets).
//!
//! Invariants: nothing panics; once `handle` reports a violation the link is considered closed
//! (the target stops); an `RST` from the peer is never answered (with anything); every packet
//! the session emits decodes cleanly to exactly the header it was encoded from (so its flags
//! suit its op) and its payload matches its length, and advertises a receive buffer between the
//! default and the most a connection may have; a connection's emitted data never exceeds
//! the credit the peer advertised. Queue bounds: the peer's packets are fed only while the
//! session wants input (as the shell reads), and the session is drained only now and then: the
//! queued control packets never exceed the bound by more than one packet and the local side's
//! own (at most four per connection), queued data never exceeds
//! `max_transmit_bytes`, and no two `RST`s for one pair or two `CREDIT_UPDATE`s for one
//! connection leave in one drain.
#![no_main]

use std::collections::{HashMap, HashSet};

use arbitrary::Unstructured;
use dombus_transport_xen::vsock::packet::{HEADER_LEN, Header, Op};
use dombus_transport_xen::vsock::session::{ConnId, Event, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let cfg = SessionConfig {
        buf_alloc: 8192,
        max_buf_alloc: 32768,
        max_connections: 16,
        rx_budget: 12 * 8192,
        max_transmit_bytes: 8192,
        max_queued_control: 40,
    };
    let bound = cfg.control_bound() + 1 + 4 * cfg.connection_limit();
    let mut s = Session::new(cfg.clone());
    // What the hostile peer has advertised per connection (buf_alloc, fwd_cnt), and what we sent.
    let mut credit: HashMap<ConnId, (u32, u32, u32)> = HashMap::new();
    let mut buf = [0u8; 300];
    for _ in 0..200 {
        let Ok(choice) = u.int_in_range(0u8..=8) else { break };
        let port = |u: &mut Unstructured| u.int_in_range(0u32..=3).unwrap_or(0);
        match choice {
            0 | 1 => {
                // A packet from the peer: mostly well-formed headers with random fields.
                let op = Op::from_byte(u.int_in_range(1u8..=7).unwrap_or(5)).unwrap_or(Op::Rw);
                let mut h = Header::new(op, port(&mut u), port(&mut u));
                h.flags = u.arbitrary().unwrap_or(0);
                h.len = u.int_in_range(0u32..=9000).unwrap_or(0);
                h.buf_alloc = u.arbitrary().unwrap_or(0);
                h.fwd_cnt = u.arbitrary().unwrap_or(0);
                let mut bytes = h.encode().to_vec();
                if choice == 1 {
                    // Raw garbage header bytes instead.
                    for b in bytes.iter_mut() {
                        *b = u.arbitrary().unwrap_or(0);
                    }
                }
                // Mostly the length the header announces; sometimes not.
                let n = if u.arbitrary::<bool>().unwrap_or(true) {
                    h.len as usize
                } else {
                    u.int_in_range(0usize..=9000).unwrap_or(0)
                };
                bytes.extend(std::iter::repeat_n(0xA5, n));
                let id = ConnId { local: h.dst_port, peer: h.src_port };
                let known = s.connections();
                if !s.wants_input() {
                    // The shell does not read the link now.
                    continue;
                }
                let queued = s.stats().queued_bytes;
                // Half the packets come as the shell hands over large ones: the header decoded
                // first, the payload in a buffer of its own (which may join a receive queue).
                let handled = match Header::decode(&bytes) {
                    // Some go straight into the reader's buffer, all or part of the payload,
                    // where the session allows it (the rest joins the queue).
                    Ok(h) if s.direct_receiver(&h).is_some() && u.arbitrary::<bool>().unwrap_or(false) =>
                    {
                        let payload = &bytes[HEADER_LEN..];
                        let read = u.int_in_range(0..=payload.len()).unwrap_or(0);
                        s.handle_direct(&h, read, payload[read..].to_vec())
                    }
                    Ok(h) if u.arbitrary::<bool>().unwrap_or(false) => {
                        let mut payload = s.payload_buffer(h.len as usize);
                        payload.clear();
                        payload.extend_from_slice(&bytes[HEADER_LEN..]);
                        s.handle_owned(&h, payload)
                    }
                    _ => s.handle(&bytes),
                };
                if handled.is_err() {
                    return;
                }
                if let Ok(ok) = Header::decode(&bytes) {
                    if ok.op == Op::Rst {
                        assert_eq!(s.stats().queued_bytes, queued, "the session answered an RST");
                    }
                    match ok.op {
                        // A new incarnation starts from nothing sent (an existing pair is reset
                        // instead, and sends nothing more).
                        Op::Request if !known.contains(&id) => {
                            credit.insert(id, (ok.buf_alloc, ok.fwd_cnt, 0));
                        }
                        Op::Request | Op::Rst => {}
                        _ => {
                            let sent = credit.get(&id).map_or(0, |c| c.2);
                            credit.insert(id, (ok.buf_alloc, ok.fwd_cnt, sent));
                        }
                    }
                }
            }
            2 => {
                let id = ConnId { local: port(&mut u), peer: port(&mut u) };
                if s.connect(id).is_ok() {
                    credit.insert(id, (0, 0, 0));
                }
            }
            3 => {
                while let Some(e) = s.poll_event() {
                    if let Event::Requested(id) = e {
                        let _ = s.accept(id);
                    }
                }
            }
            4 => {
                let id = ConnId { local: port(&mut u), peer: port(&mut u) };
                let len = u.int_in_range(0usize..=buf.len()).unwrap_or(0);
                // Checked when sent: the peer may change its advertisement before it leaves.
                if let Ok(n @ 1..) = s.send(id, &buf[..len]) {
                    let (alloc, fwd, sent) = credit.get(&id).copied().unwrap_or((0, 0, 0));
                    let sent = sent.wrapping_add(n as u32);
                    assert!(sent.wrapping_sub(fwd) <= alloc, "sent beyond the peer's credit");
                    credit.insert(id, (alloc, fwd, sent));
                }
            }
            5 => {
                let id = ConnId { local: port(&mut u), peer: port(&mut u) };
                let _ = s.recv(id, &mut buf);
            }
            6 => {
                let _ = s.shutdown_send(ConnId { local: port(&mut u), peer: port(&mut u) });
            }
            8 => {
                let id = ConnId { local: port(&mut u), peer: port(&mut u) };
                let _ = s.set_buf_alloc(id, u.int_in_range(0u32..=40_000).unwrap_or(0));
            }
            _ => s.close(ConnId { local: port(&mut u), peer: port(&mut u) }),
        }
        let st = s.stats();
        assert!(st.queued_control <= bound, "{st:?}");
        assert!(st.queued_bytes <= cfg.max_transmit_bytes + 24 * (bound + 4 * cfg.max_connections), "{st:?}");
        assert!(s.len() <= 12, "{} connections past the budget", s.len());
        // Drain only now and then, so that answers pile up between drains.
        if !u.arbitrary::<bool>().unwrap_or(true) {
            continue;
        }
        let (mut rsts, mut updates) = (HashSet::new(), HashSet::new());
        let mut emitted = |header: &Header, payload: &[u8]| {
            let pair = (header.src_port, header.dst_port);
            match header.op {
                Op::Rst => assert!(rsts.insert(pair), "two RSTs for {pair:?} in one drain"),
                Op::CreditUpdate => assert!(updates.insert(pair), "two updates for {pair:?} in one drain"),
                _ => {}
            }
            let mut wire = header.encode().to_vec();
            wire.extend_from_slice(payload);
            let h = Header::decode(&wire).expect("the session emitted an invalid header");
            assert_eq!(&h, header, "the emitted header does not decode to itself");
            assert_eq!(h.len as usize, payload.len(), "{h:?}");
            if h.op != Op::Rst {
                assert!((cfg.buf_alloc..=cfg.max_buf_alloc).contains(&h.buf_alloc), "{h:?}");
            }
        };
        // Some of the queue first goes to the link as the shell's connection tasks write it,
        // the link taking only a few packets.
        if u.arbitrary::<bool>().unwrap_or(false) {
            let mut room = u.int_in_range(0usize..=4).unwrap_or(0);
            s.transmit_direct(|header, payload| {
                if room == 0 {
                    return false;
                }
                room -= 1;
                let h = Header::decode(header).expect("the session offered an invalid header");
                emitted(&h, payload);
                true
            });
        }
        while let Some(t) = s.poll_transmit() {
            emitted(&t.header, &t.payload);
        }
    }
});
