//! Network benchmarks on loopback (figures for BENCHMARKS.md):
//!
//! 1. blob transfer MB/s over loopback with BLAKE3 verification, against a plain file copy;
//! 2. time from an announcement until every node of a 16-node network has verified it;
//! 3. DHT lookup latency for networks of 4, 8, 16 and 32 nodes.
//!
//! `cargo run -p btm-net --example netbench [-- --blob-mib 64 --nodes 16 --dht 4,8,16,32]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use btm_net::blobs::{BlobConfig, Blobs, Provider};
use btm_net::{Identity, RecordKey};
use btm_protocol::{ContentId, test_key};
use common::*;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

async fn blob_transfer(mib: usize) {
    let bytes: Vec<u8> = (0..mib * 1_048_576)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2])
        .collect();
    let id = ContentId::of(&bytes);
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let cfg = BlobConfig {
        bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ..BlobConfig::default()
    };
    let a_id = Identity::from_key(test_key("bench a"));
    let a = Blobs::open(dirs[0].path(), &a_id, cfg.clone())
        .await
        .expect("a");
    a.add_bytes(bytes.clone()).await.expect("add");
    let b = Blobs::open(
        dirs[1].path(),
        &Identity::from_key(test_key("bench b")),
        cfg,
    )
    .await
    .expect("b");
    let t = Instant::now();
    let f = b
        .fetch(&id, &[Provider::direct(a_id.node_id(), a.addrs())])
        .await
        .expect("fetch");
    let dt = t.elapsed();
    assert_eq!(f.bytes as usize, bytes.len());
    let src = dirs[2].path().join("src.bin");
    std::fs::write(&src, &bytes).expect("write");
    let t = Instant::now();
    std::fs::copy(&src, dirs[2].path().join("dst.bin")).expect("copy");
    let copy = t.elapsed();
    let mb = bytes.len() as f64 / 1e6;
    println!(
        "blob transfer: {mib} MiB over loopback with BLAKE3 verification: {:.0} ms, {:.0} MB/s; plain file copy: {:.0} ms, {:.0} MB/s",
        dt.as_secs_f64() * 1e3,
        mb / dt.as_secs_f64(),
        copy.as_secs_f64() * 1e3,
        mb / copy.as_secs_f64()
    );
    a.shutdown().await;
    b.shutdown().await;
}

async fn announcement(n: usize) {
    let f = fixture();
    let mut net = Net::start(1).await;
    for _ in 0..n {
        net.add(|c| c).await;
    }
    let nodes = net.nodes.clone();
    wait_connected(&nodes[1..], 1).await;
    publish_world(&nodes[0]).await;
    for node in &nodes[1..] {
        if node.registry().await.ok().flatten().is_none() {
            let _ = node.sync().await;
        }
    }
    wait_registry(&nodes, 1).await;
    let trainer = &nodes[1];
    let rec = f.elm("alpha", &f.good_weights, f.good_ppl, trainer.node_id());
    let t = Instant::now();
    let env = trainer
        .announce(rec, f.good_weights.clone())
        .await
        .expect("announce");
    let mut last = Duration::ZERO;
    let mut times = Vec::new();
    for node in nodes.iter().filter(|x| x.node_id() != trainer.node_id()) {
        assert!(wait_verdict(node, env.id()).await);
        last = last.max(t.elapsed());
        times.push(t.elapsed());
    }
    println!(
        "announcement: {} verifying nodes ({} nodes with the trainer and the maintainer), all verified {:.0} ms after the announcement (weights {} KB, tiny model)",
        times.len(),
        nodes.len(),
        last.as_secs_f64() * 1e3,
        f.good_weights.len() / 1000
    );
    net.shutdown().await;
}

async fn dht(n: usize, lookups: usize) {
    let net = Net::start(n).await;
    let nodes = net.nodes.clone();
    wait_connected(&nodes[1..], 1).await;
    publish_world(&nodes[0]).await;
    for node in &nodes[1..] {
        let _ = node.client().bootstrap().await;
        if node.registry().await.ok().flatten().is_none() {
            let _ = node.sync().await;
        }
    }
    for node in &nodes {
        node.publish_addr().await.expect("addr");
    }
    let mut lat = Vec::new();
    for i in 0..lookups {
        let from = &nodes[(i * 7 + 1) % n];
        let target = &nodes[(i * 3 + 2) % n];
        let t = Instant::now();
        let got = from
            .client()
            .get_record(RecordKey::Addr(target.node_id()))
            .await
            .expect("get");
        lat.push(t.elapsed());
        assert!(got.is_some(), "lookup {i} found nothing");
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "dht lookup: {n:>2} nodes: median {:.1} ms, p90 {:.1} ms, max {:.1} ms ({lookups} lookups of address records)",
        ms(lat[lat.len() / 2]),
        ms(lat[lat.len() * 9 / 10]),
        ms(lat[lat.len() - 1])
    );
    net.shutdown().await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mib: usize = arg("--blob-mib", "64").parse().unwrap_or(64);
    let nodes: usize = arg("--nodes", "15").parse().unwrap_or(15);
    let sizes: Vec<usize> = arg("--dht", "4,8,16,32")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    blob_transfer(mib).await;
    announcement(nodes).await;
    for n in sizes {
        dht(n, 20).await;
    }
}
