//! Issue 5: a maintainer and three nodes on loopback; the registry and seed reach all nodes; a
//! blob added on one is fetched and verified on another; a claim and an announcement
//! propagate; a late joiner catches up from the DHT.

use std::time::Duration;

use btm_net::RecordKey;
use btm_protocol::Signed;

use crate::common::*;

#[test]
fn maintainer_and_three_nodes() {
    btm_testkit::run(4, async {
        let f = fixture();
        let mut net = Net::start(4).await;
        let nodes = net.nodes.clone();
        wait_connected(&nodes[1..], 1).await;
        wait_connected(&nodes[..1], 3).await;
        wait_gossip_peers(&nodes[..1], &nodes[1..]).await;
        wait_gossip_peers(&nodes[1..], &nodes[..1]).await;

        // The registry, published by the maintainer, reaches every node by gossip.
        publish_world(&nodes[0]).await;
        wait_registry(&nodes, 1).await;
        // The seed manifest is on the DHT too, validated against the registry.
        let seed = nodes[3]
            .client()
            .get_record(RecordKey::Seed)
            .await
            .expect("get seed")
            .expect("seed record");
        assert_eq!(seed, btm_protocol::Record::encode(&f.seed));

        // A blob added on node 1 is fetched (and BLAKE3-verified as it streams) by node 2.
        let blob: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let id = nodes[1].add_blob(blob.clone()).await.expect("add");
        let fetched = nodes[2].fetch_blob(id, &[]).await.expect("fetch");
        assert_eq!(fetched.from, Some(nodes[1].node_id()));
        assert_eq!(
            nodes[2].blobs().read(&id, 2_000_000).await.expect("read"),
            blob
        );

        // A claim by node 1 propagates to every other node.
        let claim = nodes[1].claim(None).await.expect("claim");
        let domain = claim.record().domain.clone();
        for n in &nodes {
            wait_claim(n, &domain, nodes[1].node_id(), Duration::from_secs(30)).await;
        }
        // Node 2 chooses among the other domains: the fewest live claims.
        let other = nodes[2].claim(None).await.expect("claim 2");
        assert_ne!(other.record().domain, domain);

        // Node 1 announces an honest ELM; every other node verifies and accepts it.
        let rec = f.elm(&domain, &f.good_weights, f.good_ppl, nodes[1].node_id());
        let envelope = nodes[1]
            .announce(rec, f.good_weights.clone())
            .await
            .expect("announce");
        for n in [&nodes[0], &nodes[2], &nodes[3]] {
            assert!(
                wait_verdict(n, envelope.id()).await,
                "{} rejected an honest ELM",
                n.node_id()
            );
        }
        // Attestations are gossiped: node 1 (the trainer) learns the verdicts of the others.
        {
            let n = nodes[1].clone();
            let elm = envelope.id();
            wait_for("attestations", Duration::from_secs(30), move || {
                let n = n.clone();
                async move {
                    n.with_store(|s| s.attestations(&elm).map(|a| a.len()))
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0)
                        >= 3
                }
            })
            .await;
        }

        // A late joiner catches up from the DHT: registry, claims, the ELM (verified).
        let late = net.add(|c| c).await;
        wait_connected(std::slice::from_ref(&late), 1).await;
        let report = late.sync().await.expect("sync");
        assert_eq!(report.registry, Some(1));
        assert!(report.claims >= 2, "{report:?}");
        assert!(report.elms >= 1, "{report:?}");
        assert!(wait_verdict(&late, envelope.id()).await);

        net.shutdown().await;
    });
}

#[test]
fn node_key_is_created_once_and_names_everything() {
    btm_testkit::run(2, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = btm_net::Node::start(config(dir.path()))
            .await
            .expect("start");
        let id = a.node_id();
        assert_eq!(btm_net::identity::node_id_of(&a.peer_id()), Some(id));
        a.shutdown().await;
        let b = btm_net::Node::start(config(dir.path()))
            .await
            .expect("restart");
        assert_eq!(b.node_id(), id);
        b.shutdown().await;
    });
}

/// The event loop never waits for SQLite: while a node's store is locked (a slow disk, a long
/// transaction), it keeps answering, and a claim gossiped meanwhile is written once the store
/// is free.
#[test]
fn a_busy_store_does_not_stall_the_event_loop() {
    btm_testkit::run(4, async {
        let net = Net::start(2).await;
        let nodes = net.nodes.clone();
        wait_connected(&nodes, 1).await;
        wait_gossip_peers(&nodes[..1], &nodes[1..]).await;
        wait_gossip_peers(&nodes[1..], &nodes[..1]).await;
        publish_world(&nodes[0]).await;
        wait_registry(&nodes, 1).await;

        let busy = nodes[1].clone();
        let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
        let holder = tokio::task::spawn_blocking(move || {
            busy.with_store(|_| {
                let _ = locked_tx.send(());
                std::thread::sleep(Duration::from_secs(4));
            })
        });
        locked_rx.await.expect("store locked");
        let claim = nodes[0].claim(None).await.expect("claim");
        // The claim reaches node 1 (loopback gossip: milliseconds) and waits for the store.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let t = std::time::Instant::now();
        for _ in 0..20 {
            nodes[1]
                .client()
                .connected_peers()
                .await
                .expect("the event loop answers");
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{:?} for 20 commands",
            t.elapsed()
        );
        assert!(!holder.is_finished(), "the store was released too early");
        holder.await.expect("join").expect("store");
        wait_claim(
            &nodes[1],
            &claim.record().domain,
            nodes[0].node_id(),
            Duration::from_secs(10),
        )
        .await;
        net.shutdown().await;
    });
}

/// mDNS on a local network: two nodes with no bootstrap address find and connect to each
/// other. They listen on all interfaces (mDNS announces the LAN addresses), so the test runs in a
/// network namespace of its own whose only non-loopback interface is a veth pair: discovery is
/// real multicast and none of it leaves the host (`netns.rs`).
#[test]
fn mdns_finds_peers_on_the_local_network() {
    match crate::netns::run_confined("multi_node::mdns_finds_peers_on_the_local_network") {
        crate::netns::Confined::Inside => {}
        crate::netns::Confined::Passed | crate::netns::Confined::Skipped => return,
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(mdns_discovery());
}

async fn mdns_discovery() {
    let (_dirs, nodes) = two_lone_nodes(|c| {
        c.swarm.mdns = true;
        c.listen = vec!["/ip4/0.0.0.0/tcp/0".parse().expect("addr")];
    })
    .await;
    let b = nodes[1].peer_id();
    // Discovery takes under a second on an idle machine: mDNS queries go out at 0, 0.5, 1.5,
    // 3.5, 7.5 and 15.5 s after a node starts (libp2p-mdns probing) until one is answered. Both
    // nodes then find each other at once; only the smaller peer id dials, because two dials
    // that meet leave no connection (`nodes_that_dial_each_other_at_once_stay_connected`).
    wait_each(
        "mDNS discovery",
        Duration::from_secs(30),
        &nodes[..1],
        |a| async move {
            a.client()
                .connected_peers()
                .await
                .is_ok_and(|p| p.contains(&b))
        },
    )
    .await;
    // The peer was found through the namespace's interface: its announced addresses include
    // the veth address (loopback is never announced by mDNS).
    let addrs = nodes[1].listen_addrs().await.expect("addrs");
    assert!(
        addrs
            .iter()
            .any(|a| a.to_string().contains(crate::netns::ADDR)),
        "listen addresses {addrs:?} lack {}",
        crate::netns::ADDR
    );
    for n in nodes {
        n.shutdown().await;
    }
}

/// Two nodes that dial each other at the same moment (as two nodes that find each other by mDNS
/// do, or two that list each other as bootstrap peers) end up connected. With one connection
/// allowed per peer, each side used to keep the connection it dialed and refuse the other's, so
/// both connections closed and neither node dialed again.
#[test]
fn nodes_that_dial_each_other_at_once_stay_connected() {
    btm_testkit::run(4, async {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        for round in 0..6 {
            let (_dirs, nodes) = two_lone_nodes(|_| {}).await;
            let tcp = |n: &btm_net::Node| {
                let n = n.clone();
                async move {
                    n.listen_addrs()
                        .await
                        .expect("addrs")
                        .into_iter()
                        .find(|a| a.to_string().contains("/tcp/"))
                        .expect("a tcp address")
                }
            };
            let (a_addr, b_addr) = (tcp(&nodes[0]).await, tcp(&nodes[1]).await);
            let (a, b) = (nodes[0].client().clone(), nodes[1].client().clone());
            let _ = tokio::join!(a.dial(b_addr), b.dial(a_addr));
            let (pa, pb) = (nodes[0].peer_id(), nodes[1].peer_id());
            let both = move || {
                let (a, b) = (a.clone(), b.clone());
                async move {
                    a.connected_peers().await.is_ok_and(|p| p.contains(&pb))
                        && b.connected_peers().await.is_ok_and(|p| p.contains(&pa))
                }
            };
            wait_for(
                &format!("round {round}: the two nodes connected"),
                Duration::from_secs(10),
                both.clone(),
            )
            .await;
            // And they stay connected (a refused duplicate must not take the survivor with it).
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(both().await, "round {round}: the connection did not last");
            for n in nodes {
                n.shutdown().await;
            }
        }
    });
}

/// Two nodes that bootstrap from no one, each in a new directory, with `tweak` applied to their
/// configs; returned once each reports an address for every listener.
async fn two_lone_nodes(
    tweak: impl Fn(&mut btm_net::NodeConfig),
) -> (Vec<tempfile::TempDir>, Vec<btm_net::Node>) {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut nodes = Vec::new();
    for d in &dirs {
        let mut c = config(d.path());
        c.bootstrap.clear();
        tweak(&mut c);
        let listeners = c.listen.len();
        let node = btm_net::Node::start(c).await.expect("start");
        let n = node.clone();
        wait_for("listen addresses", Duration::from_secs(10), move || {
            let n = n.clone();
            async move { n.listen_addrs().await.is_ok_and(|a| a.len() >= listeners) }
        })
        .await;
        nodes.push(node);
    }
    (dirs, nodes)
}

/// Issue 13, clock skew: one node's clock runs 5 minutes ahead, another's 5 minutes behind.
/// Their claims and address records are accepted by every node and theirs by them, the
/// registry is trusted everywhere, and a claim that is live by one clock and lapsed by the
/// others is refused there as a matter of state (Ignore): the node with the slow clock is not
/// penalised for it.
#[test]
fn five_minutes_of_clock_skew_either_way_keeps_claims_and_expiry_working() {
    btm_testkit::run(4, async {
        const SKEW: [i64; 4] = [0, 300, -300, 0];
        let net = Net::start_with(4, |i, mut c| {
            c.clock = btm_net::limits::Clock { skew_secs: SKEW[i] };
            c
        })
        .await;
        let nodes = net.nodes.clone();
        wait_connected(&nodes[..1], 3).await;
        publish_world(&nodes[0]).await;
        for n in &nodes[1..] {
            let _ = n.sync().await;
        }
        wait_registry(&nodes, 1).await;
        for i in 1..4 {
            let others: Vec<_> = (0..4)
                .filter(|&j| j != i)
                .map(|j| nodes[j].clone())
                .collect();
            wait_gossip_peers(&others, std::slice::from_ref(&nodes[i])).await;
        }
        for (n, domain) in nodes[1..].iter().zip(DOMAINS) {
            n.claim(Some(domain)).await.expect("claim");
            n.publish_addr().await.expect("address record");
        }
        for (n, domain) in nodes[1..].iter().zip(DOMAINS) {
            for other in &nodes {
                wait_claim(other, domain, n.node_id(), Duration::from_secs(30)).await;
            }
        }
        for n in &nodes[1..3] {
            let addr = nodes[3]
                .client()
                .get_record(btm_net::RecordKey::Addr(n.node_id()))
                .await
                .expect("lookup");
            assert!(addr.is_some(), "the skewed node's address record");
        }
        // The slow node (5 minutes behind) claims with a lease that ended 2 minutes ago by the
        // others' clocks: live by its own.
        let slow = &nodes[2];
        let mut rx = nodes[3].observe();
        let now = btm_net::limits::now_secs();
        let mut late = btm_protocol::Signed::new(btm_protocol::Claim {
            domain: DOMAINS[0].into(),
            node: slow.node_id(),
            lease_expires: now - 120,
            first_claimed: now - 290,
            progress: None,
        });
        late.sign(slow.identity().signing_key());
        assert!(matches!(
            slow.with_store(|s| s.put_claim(&late.encode(), now - 300))
                .expect("store")
                .expect("put"),
            btm_registry::Decision::Accept(_)
        ));
        slow.client()
            .publish_raw(btm_net::Topic::Claims, late.encode())
            .await
            .expect("gossip");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(btm_net::Observed::Refused {
                    what: "claim",
                    reason,
                    ..
                })) => {
                    assert!(reason.contains("lease ended"), "{reason}");
                    break;
                }
                Ok(_) => {}
                Err(_) => panic!("the lapsed claim was not refused"),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for n in [&nodes[0], &nodes[1], &nodes[3]] {
            let s = n.client().peer_score(slow.peer_id()).await.expect("score");
            assert!(
                s.is_none_or(|s| s >= 0.0),
                "{} penalised the slow clock: {s:?}",
                n.node_id()
            );
        }
        net.shutdown().await;
    });
}

/// Issue 13: partition, then heal. Group A (the maintainer's node and one more) and group B (two
/// nodes) reach each other only through a bridge peer: each group blocks the other's peers. The
/// bridge is killed; group A adopts registry v2 while group B announces and verifies an ELM; the
/// bridge restarts with its identity and data directory. Every node then converges to registry v2
/// and to the ELM, verified by itself, within 90 s of the restart (the time is printed), with
/// each node catching up as the roles do (`Node::sync`, here every 2 s).
#[test]
fn a_partition_heals_through_a_restarted_bridge() {
    btm_testkit::run(6, async {
        let f = fixture();
        let bridge_dir = tempfile::tempdir().expect("tempdir");
        let bridge = btm_testkit::start(config(bridge_dir.path())).await;
        let via_bridge = bridge.listen_addrs().await.expect("addrs");
        let mut dirs = Vec::new();
        let mut group = Vec::new();
        for _ in 0..4 {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut c = config(dir.path());
            c.bootstrap = via_bridge.clone();
            group.push(btm_testkit::start(c).await);
            dirs.push(dir);
        }
        let (a, b) = (group[..2].to_vec(), group[2..].to_vec());
        for x in &a {
            for y in &b {
                x.client()
                    .block_peer(y.peer_id(), true)
                    .await
                    .expect("block");
                y.client()
                    .block_peer(x.peer_id(), true)
                    .await
                    .expect("block");
            }
        }
        wait_gossip_peers(&group, std::slice::from_ref(&bridge)).await;
        publish_world(&a[0]).await;
        wait_registry(&group, 1).await;
        wait_registry(std::slice::from_ref(&bridge), 1).await;
        for x in &a {
            let peers = x.client().connected_peers().await.expect("peers");
            assert!(
                b.iter().all(|y| !peers.contains(&y.peer_id())),
                "the groups are connected directly"
            );
        }

        // B holds what verifying needs (the seed, its tokenizer, the data) before the split.
        for y in &b {
            for blob in [&f.seed_weights, &f.tokenizer, &f.data] {
                y.fetch_blob(btm_protocol::ContentId::of(blob), &[])
                    .await
                    .expect("fetch through the bridge");
            }
        }

        // The bridge dies. A adopts registry v2; B announces an ELM and verifies it.
        bridge.shutdown().await;
        let d = a[0]
            .publish_registry(&f.signed_registry(2, now() + 86400))
            .await
            .expect("publish v2");
        assert!(matches!(d, btm_registry::Decision::Accept(_)), "{d:?}");
        wait_registry(&a, 2).await;
        let domain = DOMAINS[0];
        b[0].claim(Some(domain)).await.expect("claim");
        let rec = f.elm(domain, &f.good_weights, f.good_ppl, b[0].node_id());
        let elm = b[0]
            .announce(rec, f.good_weights.clone())
            .await
            .expect("announce")
            .id();
        assert!(wait_verdict(&b[1], elm).await, "B rejected an honest ELM");
        // The partition held.
        for y in &b {
            assert_eq!(trusted_version(y).await, Some(1));
        }
        for x in &a {
            assert!(x.verdict(&elm).expect("verdict").is_none());
        }

        // The bridge comes back, with its identity, and dials both groups.
        let healed = std::time::Instant::now();
        let mut c = config(bridge_dir.path());
        c.bootstrap = a[0].listen_addrs().await.expect("addrs");
        c.bootstrap
            .extend(b[0].listen_addrs().await.expect("addrs"));
        let bridge = btm_testkit::start(c).await;
        let everyone: Vec<btm_net::Node> = group.iter().cloned().chain([bridge.clone()]).collect();
        let trainer = b[0].node_id();
        let converged = |n: btm_net::Node| async move {
            let v2 = trusted_version(&n).await == Some(2);
            let verified = n
                .verdict(&elm)
                .ok()
                .flatten()
                .is_some_and(|a| a.verdict == btm_protocol::Verdict::Accept);
            v2 && (verified || n.node_id() == trainer)
        };
        let deadline = healed + Duration::from_secs(90);
        loop {
            let mut done = true;
            for n in &everyone {
                if !converged(n.clone()).await {
                    done = false;
                    let _ = n.sync().await;
                }
            }
            if done {
                break;
            }
            if std::time::Instant::now() > deadline {
                let mut state = Vec::new();
                for n in &everyone {
                    let got = n.client().get_record(RecordKey::Registry).await;
                    let held = n.client().local_record(RecordKey::Registry).await;
                    let v = |b: &[u8]| {
                        Signed::<btm_protocol::Registry>::decode(b).map(|r| r.record().version)
                    };
                    eprintln!(
                        "node {}: get {:?}, held {:?}, sync {:?}, peers {:?}",
                        n.peer_id(),
                        got.map(|o| o.map(|b| v(&b))),
                        held.map(|o| o.map(|b| v(&b))),
                        n.sync().await,
                        n.client().connected_peers().await
                    );
                    state.push((
                        trusted_version(n).await,
                        n.verdict(&elm).ok().flatten().map(|a| a.verdict),
                    ));
                }
                panic!(
                    "not converged 90 s after the bridge came back: (registry, verdict) per node {state:?}"
                );
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        eprintln!(
            "partition healed: every node on registry v2 with the ELM verified {:.1} s after the bridge restarted",
            healed.elapsed().as_secs_f64()
        );
        for n in &everyone {
            n.shutdown().await;
        }
    });
}
