//! Fence latency: the time from a cluster-data write that moves the master to the moment the
//! last client connection to the old master is closed, measured at the clients, over many
//! moves. Backends are trivial accept-and-hold servers, so only the proxy's path is measured.
//!
//! `cargo xtask bench fence` builds and runs it (release); prints p50/p99/max.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use tendril_control_model::{ClusterData, ClusterSpec, Generation, Keys, ProxyRoute, encode};
use tendril_control_store::{EtcdStore, Store, StoreConfig};
use tendril_testkit::{EtcdServer, free_port};

const CLIENTS: usize = 20;
const MOVES: usize = 100;

fn hold(listener: TcpListener) {
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
            // Forget connections the proxy closed, so the process does not run out of fds.
            if held.len() > 4 * CLIENTS {
                held.drain(..CLIENTS);
            }
        }
    });
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let bin = tendril_e2e::bin_dir();
    let etcd = EtcdServer::start();
    let store = EtcdStore::connect(&StoreConfig::new([etcd.endpoint()]))
        .await
        .expect("etcd");
    let keys = Keys::new("fence").expect("keys");
    let backends: Vec<u16> = (0..2)
        .map(|_| {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = l.local_addr().expect("addr").port();
            hold(l);
            port
        })
        .collect();
    let mut cd = ClusterData::new("c", ClusterSpec::default(), SystemTime::now());
    let write = async |cd: &mut ClusterData, i: usize| {
        cd.generation = cd.generation.next();
        cd.proxy.generation = Generation(cd.proxy.generation.0 + 1);
        cd.proxy.master = Some(ProxyRoute {
            db_uid: format!("db{}", i % 2),
            address: "127.0.0.1".into(),
            port: backends[i % 2],
        });
        store
            .put(&keys.cluster_data(), encode(cd), None)
            .await
            .expect("put");
    };
    write(&mut cd, 0).await;
    let port = free_port();
    let mut proxy = std::process::Command::new(bin.join("tendril-proxy"))
        .env("TENDRIL_CLUSTER_NAME", "fence")
        .env("TENDRIL_STORE_ENDPOINTS", etcd.endpoint())
        .env("TENDRIL_LOG", "warn")
        .args([
            "--listen-address",
            &format!("127.0.0.1:{port}"),
            "--uid",
            "bench",
        ])
        .spawn()
        .expect("start the proxy");
    std::thread::sleep(Duration::from_secs(1));
    let mut samples = Vec::with_capacity(MOVES);
    for i in 1..=MOVES {
        let clients: Vec<TcpStream> = (0..CLIENTS)
            .map(|_| {
                let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                s
            })
            .collect();
        // Let the proxy connect them to the backend.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let put = Instant::now();
        write(&mut cd, i).await;
        let mut last = Duration::ZERO;
        for mut c in clients {
            let mut b = [0u8; 1];
            let _ = c.read(&mut b);
            last = last.max(put.elapsed());
        }
        samples.push(last);
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    samples.sort();
    let pct =
        |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    println!(
        "fence: cluster data write -> last of {CLIENTS} old-master connections closed, {MOVES} moves: p50 {:?}, p99 {:?}, max {:?}",
        pct(0.50),
        pct(0.99),
        samples[samples.len() - 1]
    );
}
