//! Rows of THREATS.md, tried against real nodes on loopback: each test checks that nothing wrong
//! was stored, forwarded or used, and that the sender was penalised where the row says so.

use std::time::Duration;

use btm_net::blobs::{BlobConfig, Blobs, Provider};
use btm_net::{DhtKey, Identity, Node, Observed, RecordKey, Topic};
use btm_protocol::{Claim, ContentId, Record, Root, Signed, test_key};
use tokio::sync::broadcast;

use crate::common::*;

fn blob_config() -> BlobConfig {
    BlobConfig {
        bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        connect_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(2),
        ..BlobConfig::default()
    }
}

/// `len` pseudo-random bytes (a multiplicative hash of the position).
fn noise(len: usize, mul: u32, shift: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(mul) >> shift) as u8)
        .collect()
}

/// A blob store on loopback, with the identity, directory and settings it opens again with.
struct Store {
    id: Identity,
    dir: tempfile::TempDir,
    config: BlobConfig,
    blobs: Blobs,
}

impl Store {
    async fn open(label: &str) -> Store {
        Store::open_with(label, blob_config()).await
    }

    async fn open_with(label: &str, config: BlobConfig) -> Store {
        let id = Identity::from_key(test_key(label));
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Blobs::open(dir.path(), &id, config.clone())
            .await
            .expect(label);
        Store {
            id,
            dir,
            config,
            blobs,
        }
    }

    /// A store that holds `blob`.
    async fn holding(label: &str, config: BlobConfig, blob: &[u8]) -> Store {
        let s = Store::open_with(label, config).await;
        s.blobs.add_bytes(blob.to_vec()).await.expect("add");
        s
    }

    /// Closes the store and opens it again from its directory.
    async fn reopen(mut self) -> Store {
        self.blobs.shutdown().await;
        self.blobs = Blobs::open(self.dir.path(), &self.id, self.config.clone())
            .await
            .expect("reopen");
        self
    }

    fn provider(&self) -> Provider {
        Provider::direct(self.id.node_id(), self.blobs.addrs())
    }

    /// A store holding `blob` whose data file has byte `at` altered under the same hash.
    async fn tampered(label: &str, blob: &[u8], at: usize, xor: u8) -> Store {
        let s = Store::holding(label, blob_config(), blob).await;
        s.blobs.shutdown().await;
        let id = ContentId::of(blob);
        let data = s.dir.path().join("data").join(format!("{id}.data"));
        let mut bytes = std::fs::read(&data).expect("data file");
        bytes[at] ^= xor;
        std::fs::write(&data, bytes).expect("tamper");
        s.reopen().await
    }
}

/// THREATS: "weights whose bytes do not match their content id" and "a slow or stalled peer".
#[test]
fn bad_bytes_abort_the_download_and_another_provider_completes_it() {
    btm_testkit::run(2, async {
        let blob = noise(1_048_576, 2654435761, 11);
        let id = ContentId::of(&blob);
        let honest = Store::holding("honest", blob_config(), &blob).await;
        // The liar stores the blob, then its data file is altered under the same hash.
        let liar = Store::tampered("liar", &blob, 600_000, 0xff).await;
        let me = Store::open("me").await;
        let (honest_id, liar_id) = (&honest.id, &liar.id);
        let (liar_p, honest_p) = (liar.provider(), honest.provider());
        let me = &me.blobs;
        let err = me
            .fetch(&id, std::slice::from_ref(&liar_p))
            .await
            .expect_err("a lying provider");
        assert!(
            matches!(err, btm_net::blobs::BlobError::Download { .. }),
            "{err}"
        );
        assert!(
            !me.has(&id).await,
            "a blob with a bad chunk was stored as complete"
        );
        assert!(me.read(&id, u64::MAX).await.is_err());
        assert_eq!(me.errors_of(&liar_id.node_id()), 1);

        // Retried from the honest provider, resuming after the verified prefix.
        let fetched = me
            .fetch(&id, &[liar_p.clone(), honest_p.clone()])
            .await
            .expect("retry");
        assert_eq!(fetched.from, Some(honest_id.node_id()));
        assert_eq!(fetched.failures.len(), 1);
        // Verified chunks of the failed attempt may be kept (then the retry only asks for the
        // rest) or dropped; either way only verified bytes are stored.
        assert!(fetched.bytes <= blob.len() as u64);
        assert_eq!(me.read(&id, u64::MAX).await.expect("read"), blob);
        // The honest provider counts what it sent (the transfer's payload and its hashes)
        // once the transfer has ended on its side; a node that served nothing counts nothing.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while honest.blobs.bytes_served() < fetched.bytes && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            honest.blobs.bytes_served() >= fetched.bytes,
            "served {} < fetched {}",
            honest.blobs.bytes_served(),
            fetched.bytes
        );
        assert!(honest.blobs.bytes_served() < 2 * blob.len() as u64);
        assert_eq!(me.bytes_served(), 0);

        // The liar has spent its error budget (3): it is no longer asked.
        let _ = me
            .fetch(&ContentId::of(b"other"), std::slice::from_ref(&liar_p))
            .await;
        let err = me
            .fetch(&ContentId::of(b"other"), std::slice::from_ref(&liar_p))
            .await
            .expect_err("budget");
        assert!(err.to_string().contains("budget"), "{err}");

        for b in [&honest.blobs, &liar.blobs, me] {
            b.shutdown().await;
        }
    });
}

/// THREATS: "a transfer cut off part-way" (and a node restarted in between). The verified
/// prefix of a failed download stays in the store across a restart; the retry asks only for
/// what is missing.
#[test]
fn an_interrupted_download_resumes_after_a_restart() {
    btm_testkit::run(2, async {
        const SIZE: usize = 4 << 20;
        let blob = noise(SIZE, 2246822519, 9);
        let id = ContentId::of(&blob);
        let honest = Store::holding("resume honest", blob_config(), &blob).await;
        // A provider whose copy breaks near the end: the transfer stops there, as a cut
        // connection would, after ~3.9 MB of verified data.
        let cut = Store::tampered("resume cut", &blob, 3_900_000, 0x5a).await;
        let me = Store::open("resume me").await;
        me.blobs
            .fetch(&id, &[cut.provider()])
            .await
            .expect_err("cut off");
        assert!(!me.blobs.has(&id).await);

        // Restart: the verified prefix is still there.
        let me = me.reopen().await;
        let honest_id = &honest.id;
        let (honest, cut, me) = (&honest.blobs, &cut.blobs, &me.blobs);
        let status = me.status(&id).await.expect("status");
        assert!(
            matches!(status, iroh_blobs::api::blobs::BlobStatus::Partial { .. }),
            "{status:?}"
        );
        let fetched = me
            .fetch(
                &id,
                &[Provider::direct(honest_id.node_id(), honest.addrs())],
            )
            .await
            .expect("resumed");
        assert_eq!(fetched.from, Some(honest_id.node_id()));
        // Measured: 1,310,720 bytes (iroh-blobs keeps what it had written to disk when the
        // transfer failed, not every verified byte received).
        assert!(
            fetched.bytes <= SIZE as u64 / 2,
            "the retry downloaded {} of {SIZE} bytes",
            fetched.bytes
        );
        assert_eq!(me.read(&id, u64::MAX).await.expect("read"), blob);
        for b in [honest, cut, me] {
            b.shutdown().await;
        }
    });
}

/// Relays are off unless configured. With a relay (a real iroh relay server on loopback, its
/// self-signed certificate added as a trust anchor), a provider given by its relay URL alone,
/// with no direct address, serves a blob; a node without relays cannot reach it that way.
#[test]
fn a_blob_is_fetched_through_a_configured_relay() {
    btm_testkit::run(2, async {
        use iroh_relay::server::{CertConfig, RelayConfig, Server, ServerConfig, TlsConfig};
        let (certs, tls) = iroh_relay::server::testing::self_signed_tls_certs_and_config();
        let mut relay = RelayConfig::new((std::net::Ipv4Addr::LOCALHOST, 0));
        relay.tls = Some(TlsConfig::new(
            (std::net::Ipv4Addr::LOCALHOST, 0),
            CertConfig::Manual { server_config: tls },
        ));
        let mut server_config = ServerConfig::default();
        server_config.relay = Some(relay);
        let server = Server::spawn(server_config).await.expect("relay server");
        let url: iroh::RelayUrl = format!("https://{}", server.https_addr().expect("https"))
            .parse()
            .expect("url");
        let with_relay = || BlobConfig {
            relays: vec![url.clone()],
            relay_roots: certs.clone(),
            ..blob_config()
        };

        let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let id = ContentId::of(&blob);
        let provider = Store::holding("relay provider", with_relay(), &blob).await;
        let (provider_id, provider) = (&provider.id, &provider.blobs);
        assert!(
            provider.wait_relay(Duration::from_secs(20)).await,
            "no home relay"
        );
        assert_eq!(provider.relay_urls(), vec![url.clone()]);
        let via_relay = Provider {
            node: provider_id.node_id(),
            addrs: vec![],
            relays: provider.relay_urls(),
        };

        // Without relays configured, a relay-only provider is unreachable.
        let direct_only = Store::open("relay none").await;
        let direct_only = &direct_only.blobs;
        direct_only
            .fetch(&id, std::slice::from_ref(&via_relay))
            .await
            .expect_err("relays are disabled");

        let me = Store::open_with("relay me", with_relay()).await;
        let me = &me.blobs;
        let fetched = me
            .fetch(&id, std::slice::from_ref(&via_relay))
            .await
            .expect("fetched through the relay");
        assert_eq!(fetched.from, Some(provider_id.node_id()));
        assert_eq!(me.read(&id, u64::MAX).await.expect("read"), blob);
        for b in [provider, direct_only, me] {
            b.shutdown().await;
        }
        let _ = server.shutdown().await;
    });
}

/// A bare iroh endpoint with `id`'s key on loopback, speaking the blobs ALPN (for providers
/// that misbehave).
async fn blob_endpoint(id: &Identity) -> iroh::Endpoint {
    iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .secret_key(id.iroh_secret())
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .expect("addr")
        .alpns(vec![iroh_blobs::ALPN.to_vec()])
        .bind()
        .await
        .expect("bind")
}

/// A stalled provider: accepts the connection and never answers.
#[derive(Debug, Clone)]
struct Stall;

impl iroh::protocol::ProtocolHandler for Stall {
    async fn accept(
        &self,
        connection: iroh::endpoint::Connection,
    ) -> Result<(), iroh::protocol::AcceptError> {
        connection.closed().await;
        Ok(())
    }
}

#[test]
fn a_stalled_provider_times_out_and_another_is_tried() {
    btm_testkit::run(2, async {
        let blob = vec![7u8; 100_000];
        let id = ContentId::of(&blob);
        let honest = Store::holding("honest 2", blob_config(), &blob).await;
        let (honest_id, honest) = (&honest.id, &honest.blobs);
        let stall_id = Identity::from_key(test_key("staller"));
        let ep = blob_endpoint(&stall_id).await;
        let stall_addrs: Vec<_> = ep.bound_sockets();
        let router = iroh::protocol::Router::builder(ep)
            .accept(iroh_blobs::ALPN, Stall)
            .spawn();
        let me = Store::open("me 2").await;
        let me = &me.blobs;
        let started = std::time::Instant::now();
        let fetched = me
            .fetch(
                &id,
                &[
                    Provider::direct(stall_id.node_id(), stall_addrs),
                    Provider::direct(honest_id.node_id(), honest.addrs()),
                ],
            )
            .await
            .expect("fetch");
        assert_eq!(fetched.from, Some(honest_id.node_id()));
        assert_eq!(fetched.failures.len(), 1, "{:?}", fetched.failures);
        assert!(
            fetched.failures[0].1.contains("timed out"),
            "{:?}",
            fetched.failures
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        let _ = router.shutdown().await;
        honest.shutdown().await;
        me.shutdown().await;
    });
}

async fn wait_observed(
    rx: &mut broadcast::Receiver<Observed>,
    what: &str,
    pred: impl Fn(&Observed) -> bool,
) -> Observed {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => panic!("timed out waiting for {what}"),
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(e)) => panic!("observer closed: {e}"),
            Ok(Ok(o)) if pred(&o) => return o,
            Ok(Ok(_)) => {}
        }
    }
}

/// A network of a maintainer and two honest nodes, with an attacker dialled into every one.
async fn network_with_attacker(
    tweak: impl Fn(usize, btm_net::NodeConfig) -> btm_net::NodeConfig + Copy,
) -> (Net, Vec<Node>, Node) {
    let mut net = Net::start_with(3, tweak).await;
    let honest = net.nodes.clone();
    wait_connected(&honest[..1], 2).await;
    publish_world(&honest[0]).await;
    for n in &honest[1..] {
        if n.registry().await.ok().flatten().is_none() {
            let _ = n.sync().await;
        }
    }
    wait_registry(&honest, 1).await;
    let attacker = add_attacker(&mut net).await;
    (net, honest, attacker)
}

/// Adds a node dialled into each of the first three (honest) nodes, with the registry and
/// gossip subscriptions known both ways.
async fn add_attacker(net: &mut Net) -> Node {
    let honest: Vec<Node> = net.nodes[..3].to_vec();
    let attacker = net.add(|c| c).await;
    for n in &honest[1..] {
        let addr = n.listen_addrs().await.expect("addrs").remove(0);
        attacker.client().dial(addr).await.expect("dial");
    }
    attacker.sync().await.expect("sync");
    wait_registry(std::slice::from_ref(&attacker), 1).await;
    // Gossip reaches a peer once both sides know the other's subscriptions.
    wait_gossip_peers(std::slice::from_ref(&attacker), &honest).await;
    wait_gossip_peers(&honest, std::slice::from_ref(&attacker)).await;
    attacker
}

async fn scores_drop(honest: &[Node], attacker: &Node) {
    let p = attacker.peer_id();
    wait_clients("the attacker's score to drop", honest, |c| async move {
        c.peer_score(p)
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s < 0.0)
    })
    .await;
}

/// THREATS: bad signature, unknown domain, wrong shapes, NaN, false quality claim, worse than
/// the seed. Every honest node rejects each; the sender's gossip score drops.
#[test]
fn bad_elm_records_are_rejected_by_every_honest_node() {
    btm_testkit::run(4, async {
        let f = fixture();
        // The store's collector runs every second, so that rejected weights go quickly.
        let (mut net, honest, attacker) = network_with_attacker(|_, mut c| {
            c.blobs.gc_interval = Duration::from_secs(1);
            c
        })
        .await;
        let key = attacker.identity().signing_key().clone();
        let me = attacker.node_id();

        // Step 1 failures, refused before anything is downloaded: a signature by another key, an
        // unknown domain.
        let mut rx: Vec<_> = honest.iter().map(Node::observe).collect();
        let mut forged = Signed::new(f.elm("alpha", &f.good_weights, f.good_ppl, me));
        forged.sign(&test_key("not the trainer"));
        let mut unknown = Signed::new(f.elm("nope", &f.good_weights, f.good_ppl, me));
        unknown.sign(&key);
        for env in [&forged, &unknown] {
            gossip(&attacker, Topic::Elms, env.encode()).await;
        }
        for r in rx.iter_mut() {
            for _ in 0..2 {
                wait_observed(r, "a refused ELM record", |o| {
                matches!(o, Observed::Refused { what: "elm record", from: Some(p), .. } if *p == attacker.peer_id())
            })
            .await;
            }
        }

        // Steps 3-5: the record is fine, the weights or the claim are not.
        // Transposed token embeddings: the size the architecture determines, the wrong shape.
        let wrong_shape = f.edited_weights(|t| {
            for x in t.iter_mut().filter(|t| t.name == "wte.weight") {
                x.shape.swap(0, 1);
            }
        });
        assert_eq!(wrong_shape.len(), f.good_weights.len());
        let nan = f.edited_weights(|t| t[0].values[3] = f32::NAN);
        let worse = f.worse_weights();
        let worse_ppl = f.measure(&worse).expect("measure worse").ppl;
        let cases: Vec<(&str, Vec<u8>, f64)> = vec![
            ("wrong shapes", wrong_shape, f.good_ppl),
            ("NaN weights", nan, f.good_ppl),
            (
                "false perplexity claim",
                f.good_weights.clone(),
                f.good_ppl * 0.5,
            ),
            ("worse than the seed", worse, worse_ppl),
        ];
        // Each from its own sybil: three rejections graylist a peer, after which gossipsub drops
        // what it sends unread (also a rejection, but one that leaves no verdict to check).
        let mut sybils = Vec::new();
        for (what, weights, ppl) in cases {
            let sybil = add_attacker(&mut net).await;
            sybil.blobs().add_bytes(weights.clone()).await.expect("add");
            let mut rec = f.elm("beta", &weights, ppl, sybil.node_id());
            // The record states the size the seed's architecture determines, as an honest one must
            // (a record stating another size is refused before any download: see
            // `an_oversized_elm_costs_honest_nodes_at_most_64_kib`).
            rec.weights_size = f.good_weights.len() as u64;
            let mut env = Signed::new(rec);
            env.sign(sybil.identity().signing_key());
            sybil.announce_signed(&env).await.expect("announce");
            for n in &honest {
                assert!(
                    !wait_verdict(n, env.id()).await,
                    "{what}: accepted by {}",
                    n.node_id()
                );
            }
            // Nobody offers the rejected weights onward: a node provides an ELM's weights only
            // after its own acceptance.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let providers = sybil
                .client()
                .providers(btm_net::ProviderKey::Blob(env.record().weights))
                .await
                .unwrap_or_default();
            for n in &honest {
                assert!(
                    !providers.contains(&n.peer_id()),
                    "{what}: {} provides weights it rejected",
                    n.node_id()
                );
            }
            // And nobody keeps them: rejected weights are deleted from the blob store.
            let weights = env.record().weights;
            wait_each(
                "the rejected weights deleted",
                Duration::from_secs(15),
                &honest,
                |n| async move { !n.blobs().has(&weights).await },
            )
            .await;
            sybils.push(sybil);
        }
        for s in &sybils {
            scores_drop(&honest, s).await;
        }
        for n in &honest {
            assert!(
                n.with_store(|s| s.elm(&forged.id()))
                    .expect("store")
                    .expect("query")
                    .is_none()
            );
        }
        scores_drop(&honest, &attacker).await;
        net.shutdown().await;
    });
}

/// THREATS: expired registry, registry rolled back. Refused on gossip and on the DHT; the
/// trusted version stays.
#[test]
fn old_or_expired_registries_are_refused() {
    btm_testkit::run(4, async {
        let f = fixture();
        let (net, honest, attacker) = network_with_attacker(|_, c| c).await;
        let v2 = f.signed_registry(2, now() + 86400);
        let d = honest[0].publish_registry(&v2).await.expect("v2");
        assert!(matches!(d, btm_registry::Decision::Accept(_)), "{d:?}");
        wait_registry(&honest, 2).await;

        let mut rx: Vec<_> = honest[1..].iter().map(Node::observe).collect();
        // An expired v3 (validly signed) and the old v1, replayed by the attacker.
        let expired = f.signed_registry(3, now() - 1);
        gossip(&attacker, Topic::Registry, expired.clone()).await;
        for r in rx.iter_mut() {
            let o = wait_observed(r, "the expired registry refused", |o| {
                matches!(
                    o,
                    Observed::Refused {
                        what: "registry",
                        ..
                    }
                )
            })
            .await;
            assert!(format!("{o:?}").contains("expired"), "{o:?}");
        }
        let v1 = f.signed_registry(1, now() + 86400);
        let _ = attacker
            .client()
            .publish_raw(Topic::Registry, v1.clone())
            .await;
        // On the DHT too: PUTs of the expired and the old registry are refused by honest peers.
        let key = RecordKey::Registry.to_bytes(&attacker.client().network());
        attacker
            .client()
            .put_record_raw(key.clone(), expired)
            .await
            .expect("put");
        attacker
            .client()
            .put_record_raw(key, v1)
            .await
            .expect("put");
        let version = |bytes: &[u8]| {
            let registry = Signed::<btm_protocol::Registry>::decode(bytes).expect("decode");
            registry.record().version
        };
        for n in &honest {
            let trusted = n.registry().await.expect("registry").expect("some");
            assert_eq!(trusted.record().version, 2);
            let held = n.client().local_record(RecordKey::Registry).await;
            if let Some(h) = held.expect("local") {
                assert_eq!(version(&h), 2);
            }
            // A lookup validates every result and returns the newest valid one.
            let got = n
                .client()
                .get_record(RecordKey::Registry)
                .await
                .expect("get")
                .expect("found");
            assert_eq!(got, v2);
        }
        // Directly: a node refuses an expired registry and says it cannot update.
        let d = honest[1]
            .publish_registry(&f.signed_registry(4, now() - 1))
            .await
            .expect("offer");
        let r = d.rejection().expect("refused").to_string();
        assert!(r.contains("cannot update"), "{r}");
        net.shutdown().await;
    });
}

/// THREATS: a flood of claims and announcements from one peer: bounded stores, rate limits,
/// score penalties; an honest claim still goes through.
#[test]
fn a_flood_from_one_peer_is_bounded_and_honest_work_proceeds() {
    btm_testkit::run(4, async {
        let (net, honest, attacker) = network_with_attacker(|_, mut c| {
            c.swarm.limits.gossip_per_peer = btm_net::limits::Rate {
                burst: 64.0,
                per_sec: 4.0,
            };
            c
        })
        .await;
        let key = attacker.identity().signing_key().clone();
        // Garbage on the ELM topic: rejected, the attacker's score falls. (Two messages: -40, under
        // the gossip threshold; a third would graylist it, and gossipsub would then drop everything
        // it sends unread.)
        for i in 0..2usize {
            let _ = attacker
                .client()
                .publish_raw(Topic::Elms, vec![0xa5; 40 + i])
                .await;
        }
        scores_drop(&honest[1..], &attacker).await;
        // A flood of valid claims: beyond the per-peer rate they are ignored, not even validated.
        let mut rx: Vec<_> = honest[1..].iter().map(Node::observe).collect();
        for i in 0..150u64 {
            let mut c = Signed::new(Claim {
                domain: DOMAINS[(i % 3) as usize].into(),
                node: attacker.node_id(),
                lease_expires: now() + 600 + i,
                first_claimed: now(),
                progress: None,
            });
            c.sign(&key);
            let _ = attacker
                .client()
                .publish_raw(Topic::Claims, c.encode())
                .await;
        }
        for r in rx.iter_mut() {
            wait_observed(
                r,
                "the rate limit",
                |o| matches!(o, Observed::Refused { reason, .. } if reason == "rate limit"),
            )
            .await;
        }

        // Honest work proceeds: a claim by node 1 reaches node 2.
        let claim = honest[1].claim(Some("gamma")).await.expect("claim");
        let n2 = honest[2].clone();
        let who = honest[1].node_id();
        wait_for("the honest claim", Duration::from_secs(30), move || {
            let n2 = n2.clone();
            async move {
                n2.with_store(|s| {
                    s.claims("gamma", now())
                        .map(|c| c.iter().any(|c| c.record().node == who))
                })
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false)
            }
        })
        .await;
        assert_eq!(claim.record().domain, "gamma");
        // The attacker holds at most one claim per domain in every honest store.
        for n in &honest {
            let held: usize = DOMAINS
                .iter()
                .map(|d| {
                    n.with_store(|s| s.claims(d, now()))
                        .expect("store")
                        .expect("claims")
                        .iter()
                        .filter(|c| c.record().node == attacker.node_id())
                        .count()
                })
                .sum();
            assert!(held <= DOMAINS.len(), "{held} attacker claims stored");
        }
        let _ = Record::encode(claim.record());
        net.shutdown().await;
    });
}

/// THREATS: a compromised or retired maintainer key. The maintainers rotate the root (v2,
/// signed by a threshold of the old keys and of the new ones); running nodes adopt it from
/// gossip, a node started later with the shipped v1 root walks the chain on the DHT, and from
/// then on only the new keys sign registries. A forged root is refused and costs its sender.
#[test]
fn a_root_rotation_reaches_running_and_late_nodes() {
    btm_testkit::run(4, async {
        let f = fixture();
        let (mut net, honest, attacker) = network_with_attacker(|_, c| c).await;
        let new_key = test_key("btm-net rotated maintainer");
        let root_v2 = |signers: &[&btm_protocol::SigningKey],
                       keys: Vec<btm_protocol::PublicKey>| {
            let mut r = Signed::new(Root {
                version: 2,
                expires: now() + 365 * 86400,
                threshold: 1,
                keys,
            });
            for k in signers {
                r.sign(k);
            }
            r.encode()
        };
        let registry_by = |version: u64, key: &btm_protocol::SigningKey| {
            let mut r = Signed::new(f.registry(version, now() + 86400));
            r.sign(key);
            r.encode()
        };

        // A root v2 listing only the attacker's key, signed only by it: refused by every honest
        // node, which keeps root v1; the attacker's score drops.
        let mut rx: Vec<_> = honest[1..].iter().map(Node::observe).collect();
        let forged = root_v2(
            &[attacker.identity().signing_key()],
            vec![btm_protocol::PublicKey::of(
                attacker.identity().signing_key(),
            )],
        );
        gossip(&attacker, Topic::Registry, forged.clone()).await;
        for r in rx.iter_mut() {
            let o = wait_observed(r, "the forged root refused", |o| {
                matches!(o, Observed::Refused { what: "root", .. })
            })
            .await;
            assert!(format!("{o:?}").contains("trusted keys"), "{o:?}");
        }
        // On the DHT too.
        let key = RecordKey::Root(2).to_bytes(&attacker.client().network());
        let _ = attacker.client().put_record_raw(key, forged).await;
        for n in &honest {
            assert_eq!(n.root_version().await.expect("root"), 1);
        }
        scores_drop(&honest[1..], &attacker).await;

        // The real rotation: v2 lists only the new key and is signed by the old and the new key.
        let v2 = root_v2(
            &[&f.maintainer, &new_key],
            vec![btm_protocol::PublicKey::of(&new_key)],
        );
        let d = honest[0].publish_root(&v2).await.expect("offer root");
        assert!(matches!(d, btm_registry::Decision::Accept(_)), "{d:?}");
        for n in &honest {
            let n = n.clone();
            wait_for("root v2", Duration::from_secs(30), move || {
                let n = n.clone();
                async move { n.root_version().await.is_ok_and(|v| v == 2) }
            })
            .await;
        }
        // Registries: the new key alone now suffices, the old key no longer counts.
        let d = honest[0]
            .publish_registry(&registry_by(2, &new_key))
            .await
            .expect("v2");
        assert!(matches!(d, btm_registry::Decision::Accept(_)), "{d:?}");
        wait_registry(&honest, 2).await;
        let d = honest[1]
            .publish_registry(&registry_by(3, &f.maintainer))
            .await
            .expect("v3 by the old key");
        let r = d.rejection().expect("refused").to_string();
        assert!(r.contains("signed by 0 distinct"), "{r}");

        // A node started later from the shipped root v1 walks the chain and trusts registry v2.
        let late = net.add(|c| c).await;
        wait_connected(std::slice::from_ref(&late), 1).await;
        assert_eq!(late.root_version().await.expect("root"), 1);
        let report = late.sync().await.expect("sync");
        assert_eq!(report.root, 2, "{report:?}");
        assert_eq!(report.registry, Some(2), "{report:?}");
        wait_registry(std::slice::from_ref(&late), 2).await;
        // And it persists: the store holds the chain, the trusted root is v2.
        let chain = late
            .with_store(|s| s.roots().expect("roots"))
            .expect("store");
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], v2);
        net.shutdown().await;
    });
}

/// THREATS: eclipse. Many node ids behind one subnet cannot fill a node's routing table:
/// with at most 2 per subnet (loopback counted here), a node that five peers on 127.0.0.1
/// connect to keeps 2 of them in its table, stays connected to all, and gossip still reaches
/// everyone.
#[test]
fn one_subnet_cannot_fill_the_routing_table() {
    btm_testkit::run(4, async {
        let net = Net::start_with(6, |i, mut c| {
            if i == 0 {
                c.swarm.limits.max_peers_per_subnet = 2;
                c.swarm.limits.limit_local_subnets = true;
            }
            c
        })
        .await;
        let nodes = net.nodes.clone();
        wait_connected(&nodes[..1], 5).await;
        // Every peer has been offered to the table by now (identify and Kademlia traffic on
        // connection); a lookup makes sure.
        let _ = nodes[0].client().bootstrap().await;
        let table = nodes[0].client().routing_table().await.expect("table");
        assert!(
            (1..=2).contains(&table.len()),
            "{} peers in the table",
            table.len()
        );
        assert!(
            nodes[0]
                .client()
                .connected_peers()
                .await
                .expect("peers")
                .len()
                >= 5
        );
        // The others apply the default (loopback exempt) and keep everyone.
        let t1 = nodes[1].client().routing_table().await.expect("table");
        assert!(t1.len() >= 3, "{} peers in node 1's table", t1.len());
        wait_gossip_peers(&nodes[1..], &nodes[..1]).await;
        publish_world(&nodes[0]).await;
        wait_registry(&nodes, 1).await;
        net.shutdown().await;
    });
}

/// THREATS: a state-dependent refusal is not misbehaviour. A peer relays a claim and an ELM
/// record for a domain the receivers' registry does not have (it may hold a newer registry):
/// the receivers refuse them, and the relay's gossip score stays non-negative.
#[test]
fn a_state_dependent_refusal_does_not_penalise_the_relay() {
    btm_testkit::run(4, async {
        let f = fixture();
        let (net, honest, relay) = network_with_attacker(|_, c| c).await;
        let key = relay.identity().signing_key().clone();
        let mut rx: Vec<_> = honest[1..].iter().map(Node::observe).collect();
        let mut c = Signed::new(Claim {
            domain: "delta".into(),
            node: relay.node_id(),
            lease_expires: now() + 600,
            first_claimed: now(),
            progress: None,
        });
        c.sign(&key);
        let _ = relay.client().publish_raw(Topic::Claims, c.encode()).await;
        let mut elm = Signed::new(f.elm("delta", b"newer domain", 10.0, relay.node_id()));
        elm.sign(&key);
        let _ = relay.client().publish_raw(Topic::Elms, elm.encode()).await;
        for r in rx.iter_mut() {
            wait_observed(
                r,
                "the refusal",
                |o| matches!(o, Observed::Refused { what, .. } if *what == "elm record"),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for n in &honest[1..] {
            let s = n.client().peer_score(relay.peer_id()).await.expect("score");
            assert!(s.is_some_and(|s| s >= 0.0), "relay score {s:?}");
        }
        net.shutdown().await;
    });
}

/// Peak resident memory of this process since the last [`reset_peak_rss`], in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets the peak resident memory to the current one (Linux `clear_refs` 5).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// THREATS: an oversized blob. An ELM record states its weights' exact size, which the seed's
/// architecture determines. A record stating 4 GiB is refused before any download; a record
/// stating the right size, behind which the trainer serves a larger blob, is refused after the
/// blob's last chunk proves its size: an honest node receives at most 64 KiB, and memory stays
/// flat.
#[test]
fn an_oversized_elm_costs_honest_nodes_at_most_64_kib() {
    btm_testkit::run(4, async {
        let f = fixture();
        let (net, honest, attacker) = network_with_attacker(|_, c| c).await;
        let key = attacker.identity().signing_key().clone();
        let received =
            || -> Vec<u64> { honest.iter().map(|n| n.blobs().bytes_received()).collect() };

        // A record that says 4 GiB: refused by its own fields.
        let before = received();
        let mut rx: Vec<_> = honest[1..].iter().map(Node::observe).collect();
        let mut rec = f.elm("alpha", &f.good_weights, f.good_ppl, attacker.node_id());
        rec.weights_size = 4 << 30;
        let mut env = Signed::new(rec);
        env.sign(&key);
        gossip(&attacker, Topic::Elms, env.encode()).await;
        for r in rx.iter_mut() {
            wait_observed(r, "the 4 GiB record refused", |o| {
            matches!(o, Observed::Refused { what: "elm record", reason, .. } if reason.contains("weights size"))
        })
        .await;
        }
        assert_eq!(received(), before, "bytes were fetched for a 4 GiB record");

        // The right size in the record, a 16 MiB blob behind it.
        let big: Vec<u8> = (0..16u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        let mut rec = f.elm("alpha", &big, f.good_ppl, attacker.node_id());
        rec.weights_size = f.good_weights.len() as u64;
        attacker.blobs().add_bytes(big).await.expect("add");
        let mut env = Signed::new(rec);
        env.sign(&key);
        let before = received();
        let measured = reset_peak_rss();
        let rss0 = peak_rss();
        attacker.announce_signed(&env).await.expect("announce");
        for r in rx.iter_mut() {
            wait_observed(r, "the oversized blob refused", |o| {
            matches!(o, Observed::Refused { what: "elm verification", reason, .. } if reason.contains("the announcement says"))
        })
        .await;
        }
        let grown = peak_rss().saturating_sub(rss0);
        eprintln!(
            "oversized ELM: bytes received per honest node {:?}, peak RSS growth {} KiB (measured: {measured})",
            received()
                .iter()
                .zip(&before)
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>(),
            grown / 1024
        );
        for ((n, b), a) in honest.iter().zip(before.iter().copied()).zip(received()) {
            assert!(
                a - b <= 64 << 10,
                "{} received {} bytes of a blob it should have refused",
                n.node_id(),
                a - b
            );
        }
        if measured {
            assert!(
                grown < 50 << 20,
                "peak memory grew by {grown} bytes while refusing a 16 MiB blob"
            );
        }
        for n in &honest {
            assert!(
                n.verdict(&env.id())
                    .expect("store")
                    .is_none_or(|a| a.verdict != btm_protocol::Verdict::Accept)
            );
        }
        net.shutdown().await;
    });
}

/// `node` gossips `bytes` on `topic` (as an attacker would: no local checks).
async fn gossip(node: &Node, topic: Topic, bytes: Vec<u8>) {
    node.client()
        .publish_raw(topic, bytes)
        .await
        .expect("publish");
}

/// THREATS: a crash while verifying one ELM. A node that died scoring an ELM (the marker of
/// that verification left in `<data dir>/verifying/`) does not try it again when it comes
/// back, so one poisonous ELM cannot crash-loop it; other nodes verify it as usual.
#[test]
fn a_crash_while_verifying_one_elm_is_not_repeated() {
    btm_testkit::run(4, async {
        let f = fixture();
        let (net, honest, attacker) = network_with_attacker(|_, c| c).await;
        let mut env = Signed::new(f.elm("alpha", &f.good_weights, f.good_ppl, attacker.node_id()));
        env.sign(attacker.identity().signing_key());
        // What a verification killed mid-scoring leaves behind on node 1.
        let verifying = net.dirs[1].path().join("verifying");
        std::fs::create_dir_all(&verifying).expect("dir");
        std::fs::write(verifying.join(env.id().to_string()), b"").expect("marker");
        let mut rx = honest[1].observe();
        attacker
            .blobs()
            .add_bytes(f.good_weights.clone())
            .await
            .expect("add");
        attacker.announce_signed(&env).await.expect("announce");
        wait_observed(&mut rx, "node 1 declining to verify again", |o| {
        matches!(o, Observed::Refused { what: "elm verification", reason, .. } if reason.contains("did not finish"))
    })
    .await;
        // Node 2 has no marker: it verifies and accepts the ELM; node 1 holds no verdict on it.
        assert!(wait_verdict(&honest[2], env.id()).await);
        assert!(honest[1].verdict(&env.id()).expect("store").is_none());
        // A finished verification leaves no marker behind.
        let left = net.dirs[2]
            .path()
            .join("verifying")
            .join(env.id().to_string());
        assert!(!left.exists(), "{} was left behind", left.display());
        net.shutdown().await;
    });
}

/// Issue 13, one live claim per node: a node that claims a second domain moves there. Every
/// honest node then holds one claim by it, in SQLite and in its DHT record store, and a replay
/// of the first claim (gossip or DHT) is refused: it cannot come back to hold two domains.
#[test]
fn a_node_holds_one_claim_and_an_old_one_cannot_come_back() {
    btm_testkit::run(4, async {
        let (net, honest, squatter) = network_with_attacker(|_, c| c).await;
        let who = squatter.node_id();
        let first = squatter.claim(Some("alpha")).await.expect("claim alpha");
        for n in &honest {
            wait_claim(n, "alpha", who, Duration::from_secs(30)).await;
        }
        let claimants = |d: &str| btm_net::ProviderKey::Claimants(d.into());
        assert!(
            squatter
                .client()
                .providing(claimants("alpha"))
                .await
                .expect("providing")
        );
        // Claimed within the same second: stamped one second later, so it is a move.
        let second = squatter.claim(Some("beta")).await.expect("claim beta");
        assert!(second.record().first_claimed > first.record().first_claimed);
        // The mover no longer provides (nor republishes) the domain it left.
        assert!(
            !squatter
                .client()
                .providing(claimants("alpha"))
                .await
                .expect("providing")
        );
        assert!(
            squatter
                .client()
                .providing(claimants("beta"))
                .await
                .expect("providing")
        );
        for n in &honest {
            wait_claim(n, "beta", who, Duration::from_secs(30)).await;
        }
        let held = |n: &Node| {
            n.with_store(|s| s.claims_by(&who, now()))
                .expect("store")
                .expect("query")
        };
        let alpha_key = btm_net::RecordKey::Claim {
            domain: "alpha".into(),
            node: who,
        };
        for n in &honest {
            let h = held(n);
            assert_eq!(h.len(), 1, "{}: {h:?}", n.node_id());
            assert_eq!(h[0].record().domain, "beta");
            assert_eq!(
                n.client()
                    .local_record(alpha_key.clone())
                    .await
                    .expect("local record"),
                None,
                "{} still holds the released claim record",
                n.node_id()
            );
        }
        // A renewal of the first claim (new bytes, a later lease), by gossip and by a DHT
        // PUT, is refused everywhere.
        let mut renewal = Signed::new(Claim {
            lease_expires: first.record().lease_expires + 60,
            ..first.record().clone()
        });
        renewal.sign(squatter.identity().signing_key());
        let mut rx: Vec<_> = honest.iter().map(Node::observe).collect();
        gossip(&squatter, Topic::Claims, renewal.encode()).await;
        let _ = squatter
            .client()
            .put_record_raw(
                alpha_key.kad(&squatter.client().network()).to_vec(),
                renewal.encode(),
            )
            .await;
        for r in rx.iter_mut().skip(1) {
            wait_observed(r, "the old claim's renewal refused", |o| {
                matches!(o, Observed::Refused { reason, .. }
                    if reason.contains("since claimed another domain"))
            })
            .await;
        }
        for n in &honest {
            assert_eq!(held(n).len(), 1);
            assert_eq!(held(n)[0].record().domain, "beta");
        }
        net.shutdown().await;
    });
}

/// Issue 13, failed downloads cost the announcer: records whose weights their trainer does not
/// serve cost an honest node one failed download each, up to the trainer's budget; after
/// that its records are refused without a download.
#[test]
fn announcements_that_cannot_be_downloaded_are_charged_to_their_trainer() {
    btm_testkit::run(4, async {
        let f = fixture();
        let (net, honest, liar) = network_with_attacker(|_, c| c).await;
        let n = &honest[1];
        let mut rx = n.observe();
        let budget = 3;
        for i in 0..=budget {
            // Weights nobody has: the liar announces them without holding them.
            let missing = format!("weights nobody serves {i}").into_bytes();
            let mut rec = f.elm("alpha", &missing, f.good_ppl, liar.node_id());
            rec.weights_size = f.good_weights.len() as u64;
            let mut env = Signed::new(rec);
            env.sign(liar.identity().signing_key());
            gossip(&liar, Topic::Elms, env.encode()).await;
            let o = wait_observed(&mut rx, "the verification's end", |o| {
                matches!(o, Observed::Refused { what, .. } if *what == "elm verification" || *what == "elm record")
            })
            .await;
            let Observed::Refused { reason, .. } = o else {
                unreachable!()
            };
            if i < budget {
                assert!(!reason.contains("not trying its records"), "{i}: {reason}");
            } else {
                assert!(
                    reason.contains("could not be downloaded 3 times"),
                    "{i}: {reason}"
                );
            }
        }
        net.shutdown().await;
    });
}

/// A provider that serves real, verifiable bytes, one 16 KiB chunk group every `every`: slow
/// enough to hold a download for minutes, fast enough never to trip the stall timeout.
async fn trickler(
    name: &str,
    blob: &[u8],
    every: Duration,
) -> (
    Identity,
    Vec<std::net::SocketAddr>,
    iroh::protocol::Router,
    tempfile::TempDir,
) {
    use iroh_blobs::provider::events::{EventMask, EventSender, ProviderMessage, ThrottleMode};
    let id = Identity::from_key(test_key(name));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = iroh_blobs::store::fs::FsStore::load(dir.path())
        .await
        .expect("store");
    store.add_bytes(blob.to_vec()).await.expect("add");
    let mask = EventMask {
        throttle: ThrottleMode::Intercept,
        ..EventMask::DEFAULT
    };
    let (events, mut rx) = EventSender::channel(32, mask);
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if let ProviderMessage::Throttle(msg) = msg {
                tokio::spawn(async move {
                    tokio::time::sleep(every).await;
                    msg.tx.send(Ok(())).await.ok();
                });
            }
        }
    });
    let ep = blob_endpoint(&id).await;
    let addrs = ep.bound_sockets();
    let router = iroh::protocol::Router::builder(ep)
        .accept(
            iroh_blobs::ALPN,
            iroh_blobs::BlobsProtocol::new(&store, Some(events)),
        )
        .spawn();
    (id, addrs, router, dir)
}

/// Issue 13: trickling providers (a chunk group every 1.5 s, under the 2 s stall timeout, so
/// each attempt alone would take 96 s) cannot hold a download past the blob's deadline, over
/// all its attempts: tested at 30 s.
#[test]
fn trickling_providers_cannot_hold_a_download_past_its_deadline() {
    btm_testkit::run(2, async {
        let blob = noise(1 << 20, 2654435761, 7);
        let id = ContentId::of(&blob);
        let every = Duration::from_millis(1500);
        let (a, a_addrs, a_router, _a_dir) = trickler("trickler a", &blob, every).await;
        let (b, b_addrs, b_router, _b_dir) = trickler("trickler b", &blob, every).await;
        let config = BlobConfig {
            blob_deadline: Duration::from_secs(30),
            ..blob_config()
        };
        let me_id = Identity::from_key(test_key("trickled"));
        let dir = tempfile::tempdir().expect("tempdir");
        let me = Blobs::open(dir.path(), &me_id, config).await.expect("open");
        let started = std::time::Instant::now();
        let fetched = me
            .fetch(
                &id,
                &[
                    Provider::direct(a.node_id(), a_addrs),
                    Provider::direct(b.node_id(), b_addrs),
                ],
            )
            .await;
        let took = started.elapsed();
        let err = fetched
            .expect_err("a trickled download cannot complete in 30 s")
            .to_string();
        eprintln!("trickled download ended after {took:?}: {err}");
        assert!(err.contains("deadline"), "{err}");
        assert!(took < Duration::from_secs(36), "held for {took:?}");
        assert!(took >= Duration::from_secs(29), "ended early: {took:?}");
        let _ = a_router.shutdown().await;
        let _ = b_router.shutdown().await;
        me.shutdown().await;
    });
}

/// Issue 13: ten sybil identities flood for a minute (`BTM_FLOOD_SECS` changes it): garbage
/// under valid DHT keys, their own claims hopping between domains, and attestations of ELMs
/// nobody announced. Meanwhile an honest node publishes its claim, its address and an ELM:
/// another honest node reads each back and accepts the ELM, the honest nodes keep scoring
/// each other at 0 or above, and every sybil's score drops below 0.
#[test]
fn ten_sybils_flooding_for_a_minute_cannot_stop_honest_work() {
    btm_testkit::run(4, async {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let f = fixture();
        let secs: u64 = std::env::var("BTM_FLOOD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let (mut net, honest, first) = network_with_attacker(|_, c| c).await;
        let mut sybils = vec![first];
        while sybils.len() < 10 {
            sybils.push(add_attacker(&mut net).await);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let network = honest[0].client().network();
        let mut tasks = Vec::new();
        for (s, sybil) in sybils.iter().enumerate() {
            let (sybil, stop, sent) = (sybil.clone(), stop.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let key = sybil.identity().signing_key().clone();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let garbage = format!("sybil {s} garbage {i}").into_bytes();
                    let claim_key = RecordKey::Claim {
                        domain: DOMAINS[(i % 3) as usize].into(),
                        node: sybil.node_id(),
                    };
                    let elm_key = RecordKey::Elm(ContentId::of(&garbage));
                    for k in [claim_key, elm_key] {
                        let _ = sybil
                            .client()
                            .put_record_raw(k.kad(&network).to_vec(), garbage.clone())
                            .await;
                    }
                    let _ = sybil.claim(Some(DOMAINS[(i % 3) as usize])).await;
                    let mut att = Signed::new(btm_protocol::Attestation {
                        verifier: sybil.node_id(),
                        elm: ContentId::of(&garbage),
                        measured_ppl_milli: 1000,
                        verdict: btm_protocol::Verdict::Accept,
                        pool: btm_protocol::EvalPool::Public,
                    });
                    att.sign(&key);
                    let _ = sybil
                        .client()
                        .publish_raw(Topic::Attestations, att.encode())
                        .await;
                    sent.fetch_add(4, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
        let started = std::time::Instant::now();
        // A third of the way in, the honest trainer does its work.
        tokio::time::sleep(Duration::from_secs(secs / 3)).await;
        let (trainer, peer) = (&honest[1], &honest[2]);
        trainer
            .claim(Some("beta"))
            .await
            .expect("honest claim under flood");
        trainer
            .publish_addr()
            .await
            .expect("honest address under flood");
        let elm = trainer
            .announce(
                f.elm("beta", &f.good_weights, f.good_ppl, trainer.node_id()),
                f.good_weights.clone(),
            )
            .await
            .expect("honest announcement under flood");
        wait_claim(peer, "beta", trainer.node_id(), Duration::from_secs(30)).await;
        assert!(
            wait_verdict(peer, elm.id()).await,
            "the honest ELM was not accepted under the flood"
        );
        let addr = peer
            .client()
            .get_record(RecordKey::Addr(trainer.node_id()))
            .await
            .expect("address lookup");
        assert!(addr.is_some(), "the honest address record is not found");
        let rest = Duration::from_secs(secs).saturating_sub(started.elapsed());
        tokio::time::sleep(rest).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        eprintln!(
            "flood: 10 sybils, {} messages and PUTs in {:?}",
            sent.load(Ordering::Relaxed),
            started.elapsed()
        );
        // Honest peers still score each other at 0 or above; every sybil is below 0 at the
        // trainer.
        for a in &honest {
            for b in &honest {
                if a.peer_id() == b.peer_id() {
                    continue;
                }
                let s = a.client().peer_score(b.peer_id()).await.expect("score");
                assert!(
                    s.is_none_or(|s| s >= 0.0),
                    "{} scores honest {} at {s:?}",
                    a.node_id(),
                    b.node_id()
                );
            }
        }
        scores_drop(std::slice::from_ref(trainer), &sybils[0]).await;
        for s in &sybils {
            let score = trainer
                .client()
                .peer_score(s.peer_id())
                .await
                .expect("score");
            eprintln!("sybil {} score at the trainer: {score:?}", s.node_id());
            assert!(score.is_some_and(|x| x < 0.0), "sybil score {score:?}");
        }
        net.shutdown().await;
    });
}

/// THREATS (eclipse): a newcomer whose bootstrap peers are mostly liars (three of four hold
/// only a stale, validly signed registry or junk under the registry key, and refuse to hear
/// from the maintainer) still ends up trusting the newest valid registry: every answer of the
/// lookup is validated, the junk is refused, and the newest valid one wins.
#[test]
fn a_newcomer_among_liars_trusts_the_newest_valid_registry() {
    btm_testkit::run(4, async {
        let f = fixture();
        let mut net = Net::start(2).await;
        let (maintainer, honest) = (net.nodes[0].clone(), net.nodes[1].clone());
        publish_world(&maintainer).await;
        wait_registry(&net.nodes, 1).await;
        let mut liars = Vec::new();
        for _ in 0..3 {
            liars.push(net.add(|c| c).await);
        }
        wait_connected(&liars, 1).await;
        for l in &liars {
            l.sync().await.expect("the liars catch up on v1");
        }
        wait_registry(&liars, 1).await;
        // The liars cut themselves off from the honest nodes, so they never hear of v2.
        for l in &liars {
            for h in [&maintainer, &honest] {
                l.client()
                    .block_peer(h.peer_id(), true)
                    .await
                    .expect("block");
            }
        }
        let v2 = f.signed_registry(2, now() + 86400);
        let d = maintainer.publish_registry(&v2).await.expect("v2");
        assert!(matches!(d, btm_registry::Decision::Accept(_)), "{d:?}");
        wait_registry(&[maintainer.clone(), honest.clone()], 2).await;
        // Two liars serve junk under the registry key (stored unchecked in their own stores);
        // one serves the stale v1.
        let key = RecordKey::Registry.to_bytes(&liars[0].client().network());
        for l in &liars[..2] {
            l.client()
                .put_record_raw(key.clone(), b"not a registry".to_vec())
                .await
                .expect("put");
        }
        for l in &liars {
            assert_eq!(trusted_version(l).await, Some(1));
        }

        // The newcomer knows three liars and one honest peer.
        let mut bootstrap = Vec::new();
        for n in liars.iter().chain([&honest]) {
            bootstrap.extend(n.listen_addrs().await.expect("addrs"));
        }
        let newcomer = net
            .add(move |mut c| {
                c.bootstrap = bootstrap;
                c
            })
            .await;
        wait_connected(std::slice::from_ref(&newcomer), 4).await;
        let report = newcomer.sync().await.expect("sync");
        assert_eq!(report.registry, Some(2), "{report:?}");
        let trusted = newcomer.registry().await.expect("registry").expect("some");
        assert_eq!(trusted.record().version, 2);
        net.shutdown().await;
    });
}

const BLOB_CRASH_CHILD: &str = "BTM_BLOB_CRASH_DIR";
const BLOB_CRASH_SIZE: usize = 2 << 20;
/// The crash child stops adding after this many blobs (disk use stays under 128 MiB).
const BLOB_CRASH_MAX: u32 = 64;

/// The blobs the crash child writes, in order.
fn crash_blob(i: u32) -> Vec<u8> {
    noise(
        BLOB_CRASH_SIZE,
        2_654_435_761u32.wrapping_add(i.wrapping_mul(2)),
        7,
    )
}

/// The child of `sigkill_during_blob_writes_leaves_a_consistent_store`: does nothing in a normal
/// run; with `BTM_BLOB_CRASH_DIR` set it adds blobs to the store there until it is killed.
#[test]
fn blob_crash_child() {
    let Some(dir) = std::env::var_os(BLOB_CRASH_CHILD) else {
        return;
    };
    btm_testkit::run(2, async move {
        let id = Identity::from_key(test_key("blob crash"));
        let blobs = Blobs::open(std::path::Path::new(&dir), &id, blob_config())
            .await
            .expect("open");
        let start = blobs_held(&blobs).await;
        for i in start..BLOB_CRASH_MAX {
            let blob = crash_blob(i);
            // The parent kills us right after this line: in the middle of the write.
            println!("adding {i}");
            blobs.add_bytes(blob).await.expect("add");
        }
        std::future::pending::<()>().await;
    });
}

/// How many of the crash child's blobs are complete in `blobs` (they are added in order).
async fn blobs_held(blobs: &Blobs) -> u32 {
    let mut i = 0;
    while blobs.has(&ContentId::of(&crash_blob(i))).await {
        i += 1;
    }
    i
}

/// THREATS (node killed mid-write): a child process adds 2 MiB blobs in a loop and is killed
/// with SIGKILL at varying moments. After each kill the store opens, every blob it lists as
/// complete reads back byte for byte, a partly written one is never complete, and the next
/// child carries on where the last stopped.
#[test]
fn sigkill_during_blob_writes_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut held = 0;
    for round in 0..4u32 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "adversarial::blob_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(BLOB_CRASH_CHILD, dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child");
        // Kill it as it starts writing blob `held + 1 + round` (a few already written).
        let target = format!("adding {}", held + 1 + round);
        let out = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
        let seen = lines.any(|l| l.is_ok_and(|l| l == target));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        assert!(seen, "the child never reached {target:?}");
        let now_held = {
            let path = dir.path().to_path_buf();
            let (tx, rx) = std::sync::mpsc::channel();
            btm_testkit::run(2, async move {
                let id = Identity::from_key(test_key("blob crash"));
                let blobs = Blobs::open(&path, &id, blob_config())
                    .await
                    .expect("the store opens after a SIGKILL");
                let n = blobs_held(&blobs).await;
                for i in 0..n {
                    let want = crash_blob(i);
                    let got = blobs
                        .read(&ContentId::of(&want), u64::MAX)
                        .await
                        .expect("read a complete blob");
                    assert!(got == want, "blob {i} is complete but its bytes differ");
                }
                // Whatever follows the complete ones is not complete (a write cut short).
                for i in n..n + 3 {
                    assert!(!blobs.has(&ContentId::of(&crash_blob(i))).await);
                }
                blobs.shutdown().await;
                tx.send(n).expect("send");
            });
            rx.recv().expect("result")
        };
        eprintln!("round {round}: {now_held} complete blobs after SIGKILL");
        assert!(
            now_held > held + round,
            "complete blobs were lost: {now_held} after {held} and {} more written",
            round + 1
        );
        held = now_held;
    }
    assert!(
        held > 0,
        "the child never completed a blob; the kills came too early"
    );
}

const TMPFS_CHILD: &str = "BTM_TEST_IN_TMPFS";
const TMPFS_TEST: &str =
    "adversarial::a_full_disk_during_download_and_checkpointing_is_a_clear_error_and_loses_nothing";

/// THREATS (disk full): a node whose data directory is an 8 MiB tmpfs (in a private mount
/// namespace; SKIPPED where none can be made, required in CI) downloads a 16 MiB blob and
/// writes a checkpoint with the disk full. Both fail with an error that says the disk is full;
/// the blob accepted before and the previous checkpoint are intact, no temporary file is left,
/// and with space again the checkpoint is written and a download completes.
#[test]
fn a_full_disk_during_download_and_checkpointing_is_a_clear_error_and_loses_nothing() {
    let Some(dir) = std::env::var_os(TMPFS_CHILD) else {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = format!(
            "mount -t tmpfs -o size=8m btmtest '{}'",
            dir.path().display()
        );
        let probe = btm_testkit::unshare("--mount")
            .args(["sh", "-c", &mount])
            .output();
        if !btm_testkit::namespace_available(TMPFS_TEST, "mount namespace with a tmpfs", probe) {
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let out = btm_testkit::unshare("--mount")
            .args(["sh", "-c", &format!("set -e\n{mount}\nexec \"$0\" \"$@\"")])
            .arg(exe)
            .args(["--exact", TMPFS_TEST, "--nocapture", "--test-threads=1"])
            .env(TMPFS_CHILD, dir.path())
            .output()
            .expect("run the child");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{log}");
        assert!(out.status.success(), "the child failed");
        assert!(log.contains("1 passed"), "the child ran no test");
        return;
    };
    let root = std::path::PathBuf::from(dir);
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("btmtest ") && l.contains(&*root.to_string_lossy())),
        "no tmpfs at {}",
        root.display()
    );
    btm_testkit::run(2, async move {
        let cfg = BlobConfig {
            gc_interval: Duration::from_secs(1),
            ..blob_config()
        };
        let id = Identity::from_key(test_key("tmpfs me"));
        let store_dir = root.join("blobs");
        let me = Blobs::open(&store_dir, &id, cfg.clone())
            .await
            .expect("open on the tmpfs");
        let small = noise(256 << 10, 2_654_435_761, 5);
        let small_id = me.add_bytes(small.clone()).await.expect("add a small blob");
        let ckpt = root.join("run").join("checkpoint.safetensors");
        let v1 = noise(1 << 20, 40_503, 3);
        btm_model::fsutil::write_atomic(&ckpt, &v1).expect("checkpoint v1");

        // A download that does not fit.
        let big = noise(16 << 20, 2_246_822_519, 9);
        let provider = Store::holding("tmpfs provider", blob_config(), &big).await;
        let err = me
            .fetch(&ContentId::of(&big), &[provider.provider()])
            .await
            .expect_err("16 MiB cannot fit in 8 MiB");
        let msg = err.to_string();
        eprintln!("download on a full disk: {msg}");
        assert!(
            msg.contains("could not store") && msg.contains("is full"),
            "unclear: {msg}"
        );

        // A checkpoint on a full disk: the failed download's partial bytes are collected
        // (untagged, every second here), then a filler takes every free byte.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let filler = root.join("filler");
        assert!(
            std::fs::write(&filler, vec![0u8; 8 << 20]).is_err(),
            "the tmpfs is not full"
        );
        let v2 = noise(1 << 20, 69_069, 4);
        let full = btm_model::fsutil::write_atomic(&ckpt, &v2)
            .expect_err("a checkpoint cannot be written on a full disk")
            .to_string();
        eprintln!("checkpoint on a full disk: {full}");
        assert!(full.contains("No space left on device"), "unclear: {full}");
        assert!(full.contains("checkpoint.safetensors"), "no path: {full}");
        assert_eq!(std::fs::read(&ckpt).expect("checkpoint"), v1, "v1 damaged");
        let stray: Vec<_> = std::fs::read_dir(root.join("run"))
            .expect("run dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| n != "checkpoint.safetensors")
            .collect();
        assert!(stray.is_empty(), "left behind: {stray:?}");
        std::fs::remove_file(&filler).expect("free the disk");

        // Nothing accepted is lost, after a restart too.
        me.shutdown().await;
        let me = Blobs::open(&store_dir, &id, cfg).await.expect("reopen");
        assert_eq!(me.read(&small_id, u64::MAX).await.expect("read"), small);
        assert!(!me.has(&ContentId::of(&big)).await);
        // Resumable: with space again, the checkpoint is written and a download completes.
        // The collector removes the failed download's partial bytes, freeing the disk.
        let freed = std::time::Instant::now();
        let mut written = btm_model::fsutil::write_atomic(&ckpt, &v2);
        while written.is_err() && freed.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            written = btm_model::fsutil::write_atomic(&ckpt, &v2);
        }
        if written.is_err() {
            let ls = std::process::Command::new("ls")
                .arg("-laR")
                .arg(&root)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            eprintln!("the tmpfs holds:\n{}", ls.unwrap_or_default());
        }
        written.expect("checkpoint v2 once the collector freed the disk");
        eprintln!(
            "checkpoint written {:.1} s after the restart",
            freed.elapsed().as_secs_f64()
        );
        assert_eq!(std::fs::read(&ckpt).expect("checkpoint"), v2);
        let medium = noise(2 << 20, 1_103_515_245, 6);
        let other = Store::holding("tmpfs provider 2", blob_config(), &medium).await;
        me.fetch(&ContentId::of(&medium), &[other.provider()])
            .await
            .expect("a download that fits");
        other.blobs.shutdown().await;
        me.shutdown().await;
        provider.blobs.shutdown().await;
    });
}
