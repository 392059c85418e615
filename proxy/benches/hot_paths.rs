//! Micro-benchmarks of the proxy's per-connection hot paths that need no socket, so a
//! regression shows without a cluster (`cargo bench -p tendril-proxy`): the startup-packet
//! parser, the routing-table load every accept does, a kernel-path direction's step and
//! settle, and the path choice.

use std::hint::black_box;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use tendril_control_model::Generation;
use tendril_proxy::kernel::direction::{
    self, DirState, End, Flow, Mode, Outcome, PairFacts, ReplyFacts,
};
use tendril_proxy::kernel::path;
use tendril_proxy::pgwire::{Parse, parse_first_packet};
use tendril_proxy::routing::{Backend, RoutingTable};

/// A startup packet as psql sends it.
fn startup_packet() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", "app"),
        ("database", "orders"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

fn startup(c: &mut Criterion) {
    let packet = startup_packet();
    assert!(matches!(parse_first_packet(&packet), Parse::Done(..)));
    c.bench_function("pgwire/startup_packet", |b| {
        b.iter(|| parse_first_packet(black_box(&packet)))
    });
    let ssl = [0, 0, 0, 8, 4, 210, 22, 47];
    c.bench_function("pgwire/ssl_request", |b| {
        b.iter(|| parse_first_packet(black_box(&ssl)))
    });
}

fn routing(c: &mut Criterion) {
    let backend = Backend {
        db_uid: "db1".into(),
        addr: "10.0.0.2:5432".parse().expect("an address"),
        role: tendril_proxy::routing::Role::Master,
    };
    let table = ArcSwap::from_pointee(RoutingTable {
        epoch: 7,
        generation: Generation(3),
        backend: Ok(backend.clone()),
        hold: false,
        draining: None,
        standbys: Vec::new(),
    });
    let table = Arc::new(table);
    // What a worker does per accept: load the table, take the backend, and after the
    // connect look again for a fence published meanwhile.
    c.bench_function("routing/load_per_accept", |b| {
        b.iter(|| {
            let t = table.load_full();
            let chosen = t.backend().cloned();
            let now = table.load();
            black_box((chosen, now.epoch != t.epoch && now.fences(&backend)))
        })
    });
}

fn steps(c: &mut Criterion) {
    let steady = PairFacts {
        mode: Mode::Kernel,
        held: 0,
        passed: 0,
        forwarded: 0,
        redirected: 1 << 20,
        base: 100,
        written: Some((1 << 20) + 100),
        received: None,
        base_recv: 90,
        last: None,
    };
    let running = DirState::START;
    c.bench_function("direction/pair_step_kernel", |b| {
        b.iter(|| direction::pair_step(black_box(running), black_box(&steady)))
    });
    let ending = DirState::Live {
        flow: Flow::Kernel,
        end: Some(End::Fin),
        eof_read: false,
    };
    let fin = PairFacts {
        received: Some((1 << 20) - 90),
        ..steady
    };
    c.bench_function("direction/pair_step_fin", |b| {
        b.iter(|| direction::pair_step(black_box(ending), black_box(&fin)))
    });
    let paused = ReplyFacts {
        mode: Mode::User,
        held: 4096,
        passed: 1 << 16,
        forwarded: 1 << 15,
        allow: 1 << 16,
        fin: false,
        delivered: false,
        backlog_delivered: None,
        last: Some(Outcome::Empty),
    };
    let reading = DirState::Live {
        flow: Flow::Reading,
        end: None,
        eof_read: false,
    };
    c.bench_function("direction/replies_step_paused", |b| {
        b.iter(|| direction::replies_step(black_box(reading), black_box(&paused)))
    });
    let shut = [DirState::Shut(End::Fin), DirState::Shut(End::Fin)];
    c.bench_function("direction/settle", |b| {
        b.iter(|| direction::settle(black_box(shut), Some(0), false, || false))
    });
    let facts = path::Facts {
        programs: true,
        on_host: true,
        server_keyed: true,
        ..path::Facts::default()
    };
    c.bench_function("path/choose", |b| {
        b.iter(|| path::choose(black_box(&facts)))
    });
}

criterion_group!(benches, startup, routing, steps);
criterion_main!(benches);
