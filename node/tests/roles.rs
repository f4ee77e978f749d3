//! The roles end to end in one process: the maintainers' node publishes and accepts, volunteers
//! claim, branch, train, announce and verify each other, a client fetches the verified forest.

use std::time::Duration;

use btm_net::Node;
use btm_roles::{
    BranchPolicy, Client, ClientConfig, Event, Events, FetchRequest, InitKind, Maintainer, Outcome,
    Phase, Stop, TrainSettings, Volunteer, VolunteerConfig,
};

use crate::common::*;

fn volunteer(dir: &std::path::Path, domain: &str, steps: u64) -> VolunteerConfig {
    let mut c = VolunteerConfig::new(dir);
    c.domain = Some(domain.into());
    c.train = TrainSettings {
        steps,
        batch_size: 8,
        lr: Some(3e-3),
        checkpoint_every: 10,
        seed: 0,
    };
    c.exit_after_announce = true;
    c.wait_registry = Duration::from_secs(60);
    c.lease_secs = 120;
    c
}

/// Waits until the maintainer's node trusts a registry that accepts `elm`.
async fn wait_accepted(maintainer: &Node, elm: btm_protocol::ContentId) {
    wait_registry_where(
        "the ELM accepted into the registry",
        Duration::from_secs(120),
        std::slice::from_ref(maintainer),
        |r| r.elms.iter().any(|e| e.record == elm),
    )
    .await;
}

fn announced(o: Outcome) -> btm_protocol::Signed<btm_protocol::ElmRecord> {
    match o {
        Outcome::Announced(e) => *e,
        Outcome::Stopped => panic!("the volunteer stopped before announcing"),
    }
}

/// Issue 12: three ELMs accepted, then a volunteer that branches from the posterior-weighted
/// average of all three announces a record with three parents (weights that decode: sorted ids,
/// exactly 1,000,000 ppm), is verified by the maintainers' node and accepted; a volunteer stopped
/// mid-training resumes from its checkpoint; a client fetches all four as a forest.
#[test]
fn volunteers_branch_train_announce_and_are_accepted() {
    btm_testkit::run(4, async {
        let f = fixture();
        let mdir = tempfile::tempdir().unwrap();
        let mnode = node(mdir.path(), None).await;
        let maintainer = Maintainer::new(f.maintainer_config());
        let m_events = Recorded::default();
        let published = maintainer
            .publish(&mnode, &m_events.events())
            .await
            .unwrap();
        assert_eq!(published.version, 1);
        let stop = Stop::new();
        let serving = {
            let (maintainer, mnode, stop, ev) = (
                maintainer.clone(),
                mnode.clone(),
                stop.clone(),
                m_events.events(),
            );
            tokio::spawn(async move { maintainer.serve(&mnode, &stop, &ev).await })
        };

        // Three volunteers, one domain each, from the seed.
        let mut dirs = Vec::new();
        let mut tasks = Vec::new();
        for d in &DOMAINS[..3] {
            let dir = tempfile::tempdir().unwrap();
            let n = node(dir.path(), Some(&mnode)).await;
            let cfg = volunteer(&dir.path().join("vol"), d, 30);
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let rec = Recorded::default();
                let out = Volunteer::new(cfg).run(&n, &stop, &rec.events()).await;
                (n, out, rec)
            }));
            dirs.push(dir);
        }
        let mut nodes = Vec::new();
        let mut elms = Vec::new();
        for t in tasks {
            let (n, out, rec) = t.await.unwrap();
            let env = announced(out.unwrap());
            assert_eq!(env.record().parents.len(), 1, "branched from the seed");
            let ev = rec.all();
            assert!(ev.iter().any(|e| matches!(e, Event::Step { .. })), "{ev:?}");
            assert!(
                ev.iter()
                    .any(|e| matches!(e, Event::Trained { ppl, seed_ppl } if ppl < seed_ppl))
            );
            elms.push(env.id());
            nodes.push(n);
        }
        for e in &elms {
            let notes = m_events.clone();
            let accepted =
                tokio::time::timeout(Duration::from_secs(115), wait_accepted(&mnode, *e)).await;
            if accepted.is_err() {
                let said: Vec<String> = notes
                    .all()
                    .into_iter()
                    .filter_map(|e| match e {
                        Event::Note { message } => Some(message),
                        _ => None,
                    })
                    .collect();
                panic!("ELM {e} not accepted; the maintainer said: {said:#?}");
            }
        }

        // A fourth volunteer is stopped after its fifth update, then resumes from its checkpoint.
        let dir4 = tempfile::tempdir().unwrap();
        let n4 = node(dir4.path(), Some(&mnode)).await;
        let mut cfg4 = volunteer(&dir4.path().join("vol"), DOMAINS[3], 30);
        cfg4.branch = BranchPolicy::Fixed(InitKind::PosteriorAverage);
        cfg4.branch_top_k = 3;
        let stop4 = Stop::new();
        let s = stop4.clone();
        let first = Events::new(move |e| {
            if let Event::Step { step: 5, .. } = e {
                s.request();
            }
        });
        let out = Volunteer::new(cfg4.clone())
            .run(&n4, &stop4, &first)
            .await
            .unwrap();
        assert_eq!(out, Outcome::Stopped);
        let rec4 = Recorded::default();
        let env4 = announced(
            Volunteer::new(cfg4)
                .run(&n4, &Stop::new(), &rec4.events())
                .await
                .unwrap(),
        );
        let ev = rec4.all();
        assert!(
            ev.iter().any(
                |e| matches!(e, Event::TrainingStarted(t) if t.resumed_from.is_some_and(|k| k >= 5))
            ),
            "resumed from the checkpoint: {ev:?}"
        );
        // Branched from all three accepted ELMs; the record decodes (it was announced) and names them.
        let parents = &env4.record().parents;
        assert_eq!(parents.len(), 3, "{parents:?}");
        assert!(parents.windows(2).all(|w| w[0].weights < w[1].weights));
        assert_eq!(
            parents.iter().map(|p| u64::from(p.weight_ppm)).sum::<u64>(),
            1_000_000
        );
        let accepted_weights: Vec<_> = mnode
            .registry()
            .await
            .unwrap()
            .unwrap()
            .record()
            .elms
            .iter()
            .map(|e| e.weights)
            .collect();
        assert!(
            parents
                .iter()
                .all(|p| accepted_weights.contains(&p.weights))
        );
        wait_accepted(&mnode, env4.id()).await;
        // The maintainer reports the version after offering it, so the event may trail the
        // registry that peers already see.
        let published = |e: &Event| matches!(e, Event::Published { added, .. } if added.iter().any(|(id, _)| *id == env4.id()));
        btm_testkit::wait_for(
            "the maintainer's Published event",
            Duration::from_secs(10),
            || {
                let seen = m_events.all().iter().any(published);
                async move { seen }
            },
        )
        .await;

        // A client fetches the four verified ELMs as a forest.
        let cdir = tempfile::tempdir().unwrap();
        let cnode = node(cdir.path(), Some(&mnode)).await;
        let client = Client::new(ClientConfig {
            wait_registry: Duration::from_secs(60),
            wait: Duration::from_secs(120),
        });
        let req = FetchRequest {
            out: cdir.path().join("forest"),
            domains: vec![],
            unverified: false,
            min_elms: Some(4),
        };
        let rows = client
            .fetch(&cnode, &req, &Stop::new(), &Events::ignore())
            .await
            .unwrap()
            .expect("not stopped");
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert!(rows.iter().all(|r| r.verified_here == Some(true)));
        let forest = btm_model::forest::Forest::open(&req.out.join("forest.json")).unwrap();
        assert_eq!(forest.elms.len(), 4);

        stop.request();
        serving.await.unwrap().unwrap();
        assert!(m_events.all().iter().any(|e| matches!(
            e,
            Event::Phase {
                phase: Phase::Stopped
            }
        )));
        for n in nodes.iter().chain([&n4, &cnode, &mnode]) {
            n.shutdown().await;
        }
    });
}

/// Trains the fixture's seed on `jsonl` for `steps` updates; the weights file's bytes.
fn train_on(jsonl: &[u8], steps: u64) -> Vec<u8> {
    use btm_model::data::{DomainStream, Mixture};
    use btm_model::train::{TrainConfig, Trainer};
    let f = fixture();
    let seed = btm_roles::SeedFiles::load(&f.seed_dir).expect("seed");
    let tok = btm_model::tokenizer::Tokenizer::from_bytes(&seed.tokenizer).expect("tokenizer");
    let device = btm_testkit::cpu();
    let (config, tensors) = btm_model::weights::parse(&seed.weights, None).expect("seed weights");
    let model = btm_model::weights::from_named_tensors(&config, tensors, &device).expect("model");
    let docs = btm_net::verify::parse_documents(jsonl).expect("jsonl");
    let (tokens, _) = btm_model::data::tokenize_documents(&tok, &docs, None).expect("tokens");
    let data = Mixture::new(
        vec![DomainStream::new("d", tokens, config.n_ctx).expect("stream")],
        0,
    )
    .expect("mixture");
    let cfg = TrainConfig {
        steps,
        batch_size: 8,
        lr: 3e-3,
        warmup_frac: 0.05,
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(model, cfg, &device, None).expect("trainer");
    t.run_to_end(&data, |_| {}).expect("train");
    let m = t.model();
    btm_model::weights::to_bytes(&m.config(), &btm_model::weights::named_tensors(&m))
        .expect("weights")
}

/// Issue 13, acceptance on withheld data: the maintainers carve a verification pool out of a
/// domain's training data before any blob is made and commit to it in the registry. An ELM
/// trained on the domain's (published) training data is accepted; one trained on the windows
/// of the public `valid` split that verifiers' quick checks score is refused though it looks
/// better there, and so is one overfit to them; one trained on all of `valid` (more data of the
/// domain, better on the withheld pool too) is accepted.
#[test]
fn acceptance_rests_on_data_the_trainer_never_had() {
    let f = fixture();
    let d = &f.domains[2];
    let train = std::fs::read(&d.train).expect("train");
    let valid = std::fs::read(&d.valid).expect("valid");
    let btm_roles::maintainer::Carved {
        train: published,
        withheld,
    } = btm_roles::maintainer::carve_withheld(&train, 0.25)
        .expect("carve")
        .expect("enough documents");
    assert!(!published.is_empty() && !withheld.is_empty());
    let seed_files = btm_roles::SeedFiles::load(&f.seed_dir).expect("seed");
    let seed = btm_protocol::SeedManifest {
        architecture: seed_files.architecture().expect("architecture"),
        tokenizer: btm_protocol::ContentId::of(&seed_files.tokenizer),
        weights: btm_protocol::ContentId::of(&seed_files.weights),
        training: seed_files.training,
        schedule: btm_protocol::Schedule { step: 0, total: 0 },
        optimizer: None,
    };
    let eval = btm_protocol::EvalSettings {
        min_gain_ppm: btm_roles::maintainer::DEFAULT_MIN_GAIN_PPM,
        max_memorisation_ppm: btm_roles::maintainer::DEFAULT_MAX_MEMORISATION_PPM,
        withheld: Some(btm_protocol::ContentId::of(&withheld)),
        ..btm_protocol::EvalSettings::public(32, 2048, 10_000)
    };
    let registry = btm_protocol::Registry {
        version: 1,
        expires: u64::MAX,
        min_client_version: btm_protocol::ClientVersion::new(0, 1, 0),
        domains: vec![btm_protocol::Domain {
            name: d.name.clone(),
            description: String::new(),
            train: btm_protocol::ContentId::of(&published),
            valid: btm_protocol::ContentId::of(&valid),
            test: btm_protocol::ContentId::of(b"test"),
            eval,
        }],
        seed: Some(seed.clone()),
        elms: vec![],
    };
    let mut v = btm_net::verify::Verifier::new(
        &seed,
        &seed_files.weights,
        &seed_files.tokenizer,
        btm_testkit::cpu(),
    )
    .expect("verifier");
    let mut check = |name: &str, weights: &[u8], sample: u64| {
        let m = v
            .measure_withheld(&registry, &d.name, weights, &valid, &withheld, sample)
            .expect("measure");
        let verdict = btm_net::verify::judge_withheld(&eval, &m);
        eprintln!(
            "{name}: public {:.2}, withheld {:.2}, seed {:.2} / {:.2}, memorisation {:.2}: {verdict:?}",
            m.public_ppl,
            m.withheld_ppl,
            m.seed_public_ppl,
            m.seed_withheld_ppl,
            m.memorisation()
        );
        (m, verdict)
    };
    // The cheaters train on exactly what verifiers' public checks score: the windows of
    // `valid` that `scored_windows` spreads over the split (public and deterministic).
    let tok =
        btm_model::tokenizer::Tokenizer::from_bytes(&seed_files.tokenizer).expect("tokenizer");
    let docs = btm_net::verify::parse_documents(&valid).expect("valid");
    let (tokens, _) = btm_model::data::tokenize_documents(&tok, &docs, None).expect("tokens");
    let windows = btm_net::verify::scored_windows(tokens.len(), 32, 2048);
    assert!(
        windows.len() > 1,
        "the fixture's valid split is longer than what is scored"
    );
    let scored: String = windows
        .iter()
        .map(|w| {
            let text = tok.decode(&tokens[w.clone()]).expect("decode");
            format!(
                "{}\n",
                serde_json::json!({"id": format!("w{}", w.start), "text": text})
            )
        })
        .collect();
    let whole: String = docs
        .iter()
        .map(|d| d.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let whole = format!("{}\n", serde_json::json!({"id": "valid", "text": whole}));
    let memorised = train_on(whole.as_bytes(), 2000);
    let honest = train_on(&published, 400);
    let on_valid = train_on(scored.as_bytes(), 400);
    let overfit = train_on(scored.as_bytes(), 1000);
    let (h, verdict) = check("honest", &honest, 1);
    assert!(verdict.is_ok(), "the honest ELM was refused: {verdict:?}");
    // Windows are sampled afresh: another sample, the same verdict.
    assert!(check("honest, other windows", &honest, 2).1.is_ok());
    // Trained on what is scored: on the public split it looks better than the honest ELM...
    let (m, verdict) = check("trained on the scored windows", &on_valid, 3);
    assert!(m.public_ppl < h.public_ppl, "{m:?} vs {h:?}");
    // ...and is refused on the withheld pool.
    assert!(
        matches!(verdict, Err(btm_net::verify::Failure::Memorised { .. })),
        "not refused as memorised: {verdict:?}"
    );
    // Trained on them until it is good for nothing else: refused too.
    let (_, verdict) = check("overfit to the scored windows", &overfit, 3);
    assert!(verdict.is_err(), "the overfit ELM was accepted");
    // Trained on the whole public split, which is more data of the domain: better on the
    // withheld pool as well, so accepted. Acceptance judges what the ELM does on data its
    // trainer never had, not which public data it used.
    let (m, verdict) = check("trained on all of valid", &memorised, 3);
    assert!(verdict.is_ok(), "{verdict:?}");
    assert!(m.withheld_ppl < h.withheld_ppl, "{m:?} vs {h:?}");
    // A pool that does not match the registry's commitment is not used.
    assert!(
        v.measure_withheld(
            &registry,
            &d.name,
            &honest,
            &valid,
            b"{\"id\":\"x\",\"text\":\"y\"}\n",
            1
        )
        .is_err()
    );
}

/// The maintainers' notes recorded in `r`.
fn notes(r: &Recorded) -> Vec<String> {
    r.all()
        .into_iter()
        .filter_map(|e| match e {
            Event::Note { message } => Some(message),
            _ => None,
        })
        .collect()
}

/// Issue 13: acceptance needs the maintainers' threshold, not one process. Two maintainers with
/// one key each and a root of threshold 2 build the same first registry and sign it together;
/// an ELM both verified is accepted with both signatures; while one maintainer is away the
/// other's proposal stays a proposal, and the ELM is accepted once it is back; a proposal adding
/// an ELM the other never verified is never co-signed.
#[test]
fn two_maintainers_accept_only_together() {
    btm_testkit::run(4, async {
        let f = fixture();
        let keys = [
            btm_protocol::test_key("btm-roles maintainer 1 of 2"),
            btm_protocol::test_key("btm-roles maintainer 2 of 2"),
        ];
        let root = btm_testkit::root_of(&keys, 2);
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let n1 = node_of(d1.path(), &root, None).await;
        let n2 = node_of(d2.path(), &root, Some(&n1)).await;
        let config = |k: &btm_protocol::SigningKey| btm_roles::MaintainerConfig {
            keys: vec![k.clone()],
            ..f.maintainer_config()
        };
        let (m1, m2) = (
            Maintainer::new(config(&keys[0])),
            Maintainer::new(config(&keys[1])),
        );
        let (r1, r2) = (Recorded::default(), Recorded::default());
        let (e1, e2) = (r1.events(), r2.events());
        let (p1, p2) = tokio::join!(m1.publish(&n1, &e1), m2.publish(&n2, &e2));
        let (p1, p2) = (p1.unwrap(), p2.unwrap());
        assert_eq!(p1.version, p2.version);
        let signers = |n: &Node| {
            let n = n.clone();
            async move {
                let r = n.registry().await.unwrap().expect("a registry");
                (r.record().version, r.signatures().len())
            }
        };
        assert_eq!(signers(&n1).await, (p1.version, 2), "signed by both");

        let serve = |m: &Maintainer, n: &Node, r: &Recorded| {
            let (m, n, ev, stop) = (m.clone(), n.clone(), r.events(), Stop::new());
            let s = stop.clone();
            (
                stop,
                tokio::spawn(async move { m.serve(&n, &s, &ev).await }),
            )
        };
        let (stop1, serving1) = serve(&m1, &n1, &r1);
        let (stop2, serving2) = serve(&m2, &n2, &r2);

        // An honest ELM: both verify it, and it is accepted with both signatures.
        let train = |domain: &'static str| {
            let n1 = n1.clone();
            let root = root.clone();
            async move {
                let dir = tempfile::tempdir().unwrap();
                let n = node_of(dir.path(), &root, Some(&n1)).await;
                let out = Volunteer::new(volunteer(&dir.path().join("vol"), domain, 30))
                    .run(&n, &Stop::new(), &Events::ignore())
                    .await
                    .unwrap();
                (dir, n, announced(out))
            }
        };
        let (_v1, vn1, elm1) = train(DOMAINS[0]).await;
        for n in [&n1, &n2] {
            if tokio::time::timeout(Duration::from_secs(150), wait_accepted(n, elm1.id()))
                .await
                .is_err()
            {
                panic!(
                    "ELM not accepted; the maintainers said: {:#?} {:#?}",
                    notes(&r1),
                    notes(&r2)
                );
            }
        }
        let (v2, count) = signers(&n1).await;
        assert!(v2 > p1.version);
        assert_eq!(count, 2, "accepted by both maintainers");

        // The second maintainer stops serving: the first one's proposal is not a registry.
        stop2.request();
        serving2.await.unwrap().unwrap();
        let (_v2dir, vn2, elm2) = train(DOMAINS[1]).await;
        let verified = |n: &Node, id| {
            let n = n.clone();
            async move {
                for _ in 0..240 {
                    if n.verdict(&id)
                        .unwrap()
                        .is_some_and(|a| a.verdict == btm_protocol::Verdict::Accept)
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                panic!("ELM {id} not verified");
            }
        };
        verified(&n1, elm2.id()).await;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let reg = n1.registry().await.unwrap().unwrap();
        assert!(
            !reg.record().elms.iter().any(|e| e.record == elm2.id()),
            "accepted by one maintainer alone"
        );
        assert!(
            notes(&r1)
                .iter()
                .any(|m| m.starts_with("proposing registry")),
            "{:#?}",
            notes(&r1)
        );
        // It comes back and co-signs.
        let (stop2, serving2) = serve(&m2, &n2, &r2);
        if tokio::time::timeout(Duration::from_secs(150), wait_accepted(&n1, elm2.id()))
            .await
            .is_err()
        {
            panic!(
                "ELM not accepted after the second maintainer came back: {:#?} {:#?}",
                notes(&r1),
                notes(&r2)
            );
        }
        assert_eq!(signers(&n1).await.1, 2);
        eprintln!(
            "maintainer 1 said: {:#?}\nmaintainer 2 said: {:#?}",
            notes(&r1),
            notes(&r2)
        );

        // A proposal that adds an ELM the second maintainer never verified: never co-signed.
        let trusted = n1.registry().await.unwrap().unwrap();
        let mut body = trusted.record().clone();
        body.version += 1;
        body.elms.push(btm_protocol::AcceptedElm {
            record: btm_protocol::ContentId([0xee; 32]),
            domain: DOMAINS[2].into(),
            weights: btm_protocol::ContentId([0xef; 32]),
        });
        body.elms.sort_by_key(|e| e.record);
        let mut forged = btm_protocol::Signed::new(body);
        forged.sign(&keys[0]);
        n1.publish_proposal(&forged).await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        for n in [&n1, &n2] {
            assert_eq!(
                n.registry().await.unwrap().unwrap().record().version,
                trusted.record().version,
                "the unverified ELM was accepted"
            );
        }

        for (stop, serving) in [(stop1, serving1), (stop2, serving2)] {
            stop.request();
            serving.await.unwrap().unwrap();
        }
        for n in [&vn1, &vn2, &n1, &n2] {
            n.shutdown().await;
        }
    });
}
