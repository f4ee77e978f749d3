//! The mathematics of Branch-Train-Merge over a forest (issue 3): ensembling by the domain
//! posterior, top-k, the cached prior, parameter averaging, the manifest's refusals.

use std::path::{Path, PathBuf};

use btm_model::forest::average::{self, Input};
use btm_model::forest::ensemble::{self, Ensemble};
use btm_model::forest::manifest::{self, ForestElm, InitKind, Parent};
use btm_model::forest::posterior::{self, PriorConfig, Weighting};
use btm_model::forest::{self, Error, Forest};
use btm_model::generate::SampleConfig;
use btm_model::{Gpt, GptConfig, eval, weights};
use proptest::prelude::*;

use crate::common::{assert_close, cpu, tiny, tokenizer};

/// A short-context tiny architecture so that streams span several blocks cheaply.
fn arch() -> btm_model::GptConfig {
    let mut c = tiny();
    c.n_ctx = 16;
    c
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    let v = arch().vocab_size as u32;
    (0..n as u32)
        .map(|i| (i * 131 + salt * 17 + 7) % v)
        .collect()
}

/// An empty forest of architecture `a` with the test tokenizer, in `dir`.
fn empty_forest(dir: &Path, a: GptConfig) -> Forest {
    let tok_path = dir.join("tokenizer.json");
    tokenizer().save(&tok_path).unwrap();
    Forest::create(dir, a, &tok_path).unwrap()
}

/// Saves `m` as `dir/<name>.safetensors` and adds it to `f` as a randomly initialised ELM.
fn add_random_elm(f: &mut Forest, dir: &Path, name: &str, domains: Vec<String>, m: &Gpt) {
    let p = dir.join(format!("{name}.safetensors"));
    weights::save(m, &p).unwrap();
    f.add(
        name,
        domains,
        &p,
        &tokenizer().id(),
        InitKind::Random,
        vec![],
        None,
    )
    .unwrap();
}

/// A forest of `n` freshly initialised ELMs (seeds 100, 101, ...) in `dir`.
fn forest_of(dir: &Path, n: usize) -> (Forest, Vec<Gpt>) {
    let mut f = empty_forest(dir, arch());
    let mut models = Vec::new();
    for i in 0..n {
        let m = Gpt::init(&arch(), 100 + i as u64, &cpu());
        add_random_elm(
            &mut f,
            dir,
            &format!("elm{i}"),
            vec![format!("domain{i}")],
            &m,
        );
        models.push(m);
    }
    (f, models)
}

#[test]
fn an_ensemble_of_one_elm_equals_that_elm() {
    let m = Gpt::init(&arch(), 3, &cpu());
    let t = tokens(70, 1);
    let alone = eval::token_logprobs(&m, &t, 4, &cpu()).unwrap();
    for w in Weighting::ALL {
        let e = Ensemble::new(vec![Gpt::init(&arch(), 3, &cpu())], &[1.0], w, &cpu()).unwrap();
        let mixed = e.token_logprobs(&t, 4).unwrap();
        assert_eq!(mixed.len(), alone.len());
        for (a, b) in mixed.iter().zip(&alone) {
            assert!((a - b).abs() < 1e-12, "{w}: {a} vs {b}");
        }
    }
}

/// Brute force in probability space (fine for a short sequence, where nothing underflows).
fn brute_force_block(lp: &[Vec<f64>], prior: &[f64]) -> Vec<f64> {
    let e = lp.len();
    let mut out = Vec::new();
    for i in 0..lp[0].len() {
        let unnorm: Vec<f64> = (0..e)
            .map(|j| prior[j] * (0..i).map(|s| lp[j][s].exp()).product::<f64>())
            .collect();
        let z: f64 = unnorm.iter().sum();
        out.push(
            (0..e)
                .map(|j| unnorm[j] / z * lp[j][i].exp())
                .sum::<f64>()
                .ln(),
        );
    }
    out
}

#[test]
fn the_log_space_posterior_matches_a_brute_force_f64_computation() {
    let models: Vec<Gpt> = (0..3).map(|s| Gpt::init(&arch(), 40 + s, &cpu())).collect();
    let t = tokens(12, 2); // one block of 11 targets
    let refs: Vec<&Gpt> = models.iter().collect();
    let lp = ensemble::elm_logprobs(&refs, &t, 2, &cpu()).unwrap();
    let prior = [0.5, 0.3, 0.2];
    let got = posterior::mix_stream(
        &lp,
        &posterior::block_targets(t.len(), arch().n_ctx),
        &posterior::ln_all(&prior),
        Weighting::Posterior,
    );
    let want = brute_force_block(&lp, &prior);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_close(*a, *b, 1e-12, &format!("target {i}"));
    }
    // Exaggerated log-likelihoods (sharply different ELMs) over a long block underflow in
    // probability space but not in log space.
    let long: Vec<Vec<f64>> = (0..3)
        .map(|j| {
            (0..400)
                .map(|i| -5.0 - ((i * (j + 3)) % 7) as f64)
                .collect()
        })
        .collect();
    let m = posterior::mix_block(
        &[&long[0], &long[1], &long[2]],
        &posterior::ln_all(&prior),
        Weighting::Posterior,
        false,
    );
    assert!(m.logprobs.iter().all(|x| x.is_finite()));
    assert!(
        brute_force_block(&long, &prior)
            .iter()
            .any(|x| !x.is_finite()),
        "the brute force should underflow here"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn posterior_weights_are_a_distribution_at_every_position(
        lp in prop::collection::vec(prop::collection::vec(-30.0f64..0.0, 24), 1..6),
        raw_prior in prop::collection::vec(0.01f64..1.0, 6),
    ) {
        let e = lp.len();
        let prior: Vec<f64> = raw_prior[..e].to_vec();
        let views: Vec<&[f64]> = lp.iter().map(Vec::as_slice).collect();
        for w in Weighting::ALL {
            let m = posterior::mix_block(&views, &posterior::ln_all(&prior), w, true);
            for (i, pos) in m.log_weights.unwrap().iter().enumerate() {
                prop_assert!(pos.iter().all(|x| x.is_finite() && *x <= 1e-12));
                let s: f64 = pos.iter().map(|x| x.exp()).sum();
                prop_assert!((s - 1.0).abs() < 1e-12, "{} at {}: weights sum to {}", w, i, s);
            }
            let s: f64 = m.final_log_weights.iter().map(|x| x.exp()).sum();
            prop_assert!((s - 1.0).abs() < 1e-12);
            // A mixture of distributions never beats its best member nor loses to its worst.
            for (i, x) in m.logprobs.iter().enumerate() {
                let best = lp.iter().map(|l| l[i]).fold(f64::NEG_INFINITY, f64::max);
                let worst = lp.iter().map(|l| l[i]).fold(f64::INFINITY, f64::min);
                prop_assert!(*x <= best + 1e-9 && *x >= worst - 1e-9);
            }
        }
    }
}

#[test]
fn the_cached_prior_starts_uniform_and_moves_by_an_ema_of_block_final_posteriors() {
    // Two ELMs; ELM 0 is better on every token.
    let lp = vec![vec![-1.0; 30], vec![-2.0; 30]];
    let targets = vec![10, 10, 10];
    // One batch of three blocks: prior = 0.7 * uniform + 0.3 * mean block-final posterior
    // (computed with the uniform prior), which here is sigmoid(10) for ELM 0.
    let one = posterior::estimate_prior(
        &lp,
        &targets,
        &PriorConfig {
            batch_blocks: 3,
            max_blocks: 200,
            alpha: 0.3,
        },
    );
    let post0 = 1.0 / (1.0 + (-10.0f64).exp());
    assert_close(
        one[0],
        0.7 * 0.5 + 0.3 * post0,
        1e-12,
        "prior after one batch",
    );
    assert_close(one[0] + one[1], 1.0, 1e-12, "a distribution");
    // Batches of one block: three EMA steps, each using the previous prior.
    let three = posterior::estimate_prior(
        &lp,
        &targets,
        &PriorConfig {
            batch_blocks: 1,
            max_blocks: 200,
            alpha: 0.3,
        },
    );
    let mut p = 0.5;
    for _ in 0..3 {
        let post = p * (-10.0f64).exp() / (p * (-10.0f64).exp() + (1.0 - p) * (-20.0f64).exp());
        p = 0.7 * p + 0.3 * post;
    }
    assert_close(three[0], p, 1e-12, "prior after three batches");
    // max_blocks limits the blocks used.
    let limited = posterior::estimate_prior(
        &lp,
        &targets,
        &PriorConfig {
            batch_blocks: 1,
            max_blocks: 1,
            alpha: 0.3,
        },
    );
    assert_close(limited[0], 0.7 * 0.5 + 0.3 * post0, 1e-12, "one block only");
}

#[test]
fn the_seed_joins_the_members_only_when_the_forest_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut f, models) = forest_of(dir.path(), 2);
    let err = f.with_seed_member().unwrap_err();
    assert!(matches!(err, Error::NoSeed(_)), "{err}");
    assert!(err.to_string().contains("no seed"), "{err}");
    let seed = Gpt::init(&arch(), 7, &cpu());
    let p = dir.path().join("seed.safetensors");
    weights::save(&seed, &p).unwrap();
    f.set_seed(&p).unwrap();
    let g = f.with_seed_member().unwrap();
    assert_eq!(g.names(), ["elm0", "elm1", manifest::SEED_MEMBER]);
    assert_eq!(f.elms.len(), 2, "the forest itself is unchanged");
    // All weight on the seed member gives the seed's log-probabilities; on ELM 0, ELM 0's.
    let t = tokens(50, 5);
    for (j, m) in [(2usize, &seed), (0, &models[0])] {
        let got =
            ensemble::score_forest(&g, &[(j, 1.0)], &t, Weighting::Posterior, 4, &cpu()).unwrap();
        let alone = eval::token_logprobs(m, &t, 4, &cpu()).unwrap();
        for (a, b) in got.iter().zip(&alone) {
            assert!((a - b).abs() < 1e-12);
        }
    }
    // A forest that already has a member named "seed" is refused rather than shadowed.
    let mut h = f.clone();
    add_random_elm(&mut h, dir.path(), "seed", vec![], &models[1]);
    assert!(matches!(h.with_seed_member(), Err(Error::DuplicateElm(_))));
}

#[test]
fn top_k_with_k_1_equals_the_selected_elm() {
    let dir = tempfile::tempdir().unwrap();
    let (f, models) = forest_of(dir.path(), 3);
    let t = tokens(50, 3);
    let prior = [0.2, 0.5, 0.3];
    let sel = posterior::top_k(&prior, 1);
    assert_eq!(sel, vec![(1, 1.0)]);
    let alone = eval::token_logprobs(&models[1], &t, 4, &cpu()).unwrap();
    for w in Weighting::ALL {
        let got = ensemble::score_forest(&f, &sel, &t, w, 4, &cpu()).unwrap();
        for (a, b) in got.iter().zip(&alone) {
            assert!((a - b).abs() < 1e-12, "{w}");
        }
    }
    let (e, chosen) =
        Ensemble::from_forest(&f, Some(&prior), Some(1), Weighting::Posterior, &cpu()).unwrap();
    assert_eq!((e.len(), chosen), (1, vec![1]));
    // With k = 2 only the two largest run, and the mixture lies between them.
    let (e2, chosen2) =
        Ensemble::from_forest(&f, Some(&prior), Some(2), Weighting::Posterior, &cpu()).unwrap();
    assert_eq!((e2.len(), chosen2), (2, vec![1, 2]));
    let a = e2.evaluate(None, &t, 4).unwrap();
    let l1 = eval::evaluate(&models[1], None, &t, 4, &cpu())
        .unwrap()
        .loss;
    let l2 = eval::evaluate(&models[2], None, &t, 4, &cpu())
        .unwrap()
        .loss;
    assert!(a.loss <= l1.max(l2) + 1e-9);
}

#[test]
fn an_ensemble_generates_from_a_mixture_of_full_distributions() {
    let m = Gpt::init(&arch(), 8, &cpu());
    let cfg = SampleConfig {
        max_new_tokens: 12,
        temperature: 0.9,
        top_k: Some(20),
        seed: 5,
    };
    let single = btm_model::generate::generate(&m, tokenizer(), "The ", &cfg, &cpu()).unwrap();
    let e = Ensemble::new(
        vec![Gpt::init(&arch(), 8, &cpu())],
        &[1.0],
        Weighting::Posterior,
        &cpu(),
    )
    .unwrap();
    assert_eq!(
        e.generate(tokenizer(), "The ", &cfg).unwrap(),
        single,
        "one ELM generates as that ELM"
    );
    let two = Ensemble::new(
        vec![Gpt::init(&arch(), 8, &cpu()), Gpt::init(&arch(), 9, &cpu())],
        &[0.5, 0.5],
        Weighting::Posterior,
        &cpu(),
    )
    .unwrap();
    let ctx = tokenizer().encode("The cat sat").unwrap();
    let next = two.next_logprobs(&ctx).unwrap();
    assert_eq!(next.len(), arch().vocab_size);
    assert_close(
        next.iter().map(|x| x.exp()).sum::<f64>(),
        1.0,
        1e-9,
        "next-token distribution",
    );
    assert!(!two.generate(tokenizer(), "The ", &cfg).unwrap().is_empty());
}

fn save_at(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let p = dir.join(name);
    weights::save(&Gpt::init(&arch(), seed, &cpu()), &p).unwrap();
    p
}

fn input(path: &Path, weight: f64) -> Input {
    Input {
        path: path.to_path_buf(),
        weight,
        id: None,
    }
}

#[test]
fn averaging_with_weight_one_on_one_elm_returns_it_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| save_at(dir.path(), &format!("m{i}.safetensors"), 60 + i))
        .collect();
    let out = dir.path().join("avg.safetensors");
    let s = average::average_files(
        &[
            input(&paths[0], 0.0),
            input(&paths[1], 1.0),
            input(&paths[2], 0.0),
        ],
        None,
        &out,
    )
    .unwrap();
    assert_eq!(s.files_read, 1, "weight-0 inputs are not read");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&paths[1]).unwrap(),
        "bit-identical file"
    );
    // The same through the in-memory path.
    let models: Vec<Gpt> = (0..3).map(|i| Gpt::init(&arch(), 60 + i, &cpu())).collect();
    let avg = average::average_models(
        &[(&models[0], 0.0), (&models[1], 1.0), (&models[2], 0.0)],
        &cpu(),
    )
    .unwrap();
    assert_eq!(
        weights::named_tensors(&avg),
        weights::named_tensors(&models[1])
    );
}

#[test]
fn a_uniform_average_of_two_identical_models_is_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let a = save_at(dir.path(), "a.safetensors", 70);
    let b = save_at(dir.path(), "b.safetensors", 70);
    let out = dir.path().join("avg.safetensors");
    average::average_files(&[input(&a, 1.0), input(&b, 1.0)], None, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&a).unwrap());
    // And a real average of two different models is elementwise (a + b) / 2.
    let c = save_at(dir.path(), "c.safetensors", 71);
    average::average_files(&[input(&a, 0.5), input(&c, 0.5)], None, &out).unwrap();
    let (_, got) = weights::read(&out, None).unwrap();
    let (_, ta) = weights::read(&a, None).unwrap();
    let (_, tc) = weights::read(&c, None).unwrap();
    for ((g, x), y) in got.iter().zip(&ta).zip(&tc) {
        for ((gv, xv), yv) in g.values.iter().zip(&x.values).zip(&y.values) {
            assert!((gv - (0.5 * xv + 0.5 * yv)).abs() <= 1e-7, "{}", g.name);
        }
    }
}

#[test]
fn averaging_refuses_bad_weights_and_mismatched_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = save_at(dir.path(), "a.safetensors", 1);
    let out = dir.path().join("avg.safetensors");
    assert!(matches!(
        average::average_files(&[input(&a, -1.0)], None, &out),
        Err(Error::BadWeights(_))
    ));
    assert!(matches!(
        average::average_files(&[input(&a, 0.0)], None, &out),
        Err(Error::BadWeights(_))
    ));
    assert!(matches!(
        average::average_files(&[], None, &out),
        Err(Error::Empty(_))
    ));
    let mut other = arch();
    other.n_layers += 1;
    let b = dir.path().join("b.safetensors");
    weights::save(&Gpt::init(&other, 1, &cpu()), &b).unwrap();
    let err = average::average_files(&[input(&a, 0.5), input(&b, 0.5)], None, &out).unwrap_err();
    assert!(err.to_string().contains("architecture mismatch"), "{err}");
    let wrong_id = Input {
        id: Some("00".repeat(32)),
        ..input(&a, 1.0)
    };
    assert!(matches!(
        average::average_files(&[wrong_id], None, &out),
        Err(Error::ContentMismatch { .. })
    ));
}

#[test]
fn the_forest_refuses_a_mismatched_architecture_or_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut f, _) = forest_of(dir.path(), 2);
    let mut other = arch();
    other.n_layers += 1;
    let p = dir.path().join("deep.safetensors");
    weights::save(&Gpt::init(&other, 1, &cpu()), &p).unwrap();
    let tok = tokenizer().id();
    match f.add("deep", vec![], &p, &tok, InitKind::Seed, vec![], None) {
        Err(Error::ArchitectureMismatch { elm, found, .. }) => {
            assert_eq!((elm.as_str(), found), ("deep", other))
        }
        other => panic!("expected ArchitectureMismatch, got {other:?}"),
    }
    let ok = dir.path().join("elm0.safetensors");
    match f.add(
        "other-tok",
        vec![],
        &ok,
        &"ab".repeat(32),
        InitKind::Seed,
        vec![],
        None,
    ) {
        Err(Error::TokenizerMismatch { expected, .. }) => assert_eq!(expected, tok),
        other => panic!("expected TokenizerMismatch, got {other:?}"),
    }
    assert!(matches!(
        f.add("elm0", vec![], &ok, &tok, InitKind::Seed, vec![], None),
        Err(Error::DuplicateElm(_))
    ));
    assert!(
        f.set_seed(&p).is_err(),
        "the seed must have the forest's architecture too"
    );
    assert!(
        Forest::create(
            dir.path(),
            other.with_vocab(999),
            &dir.path().join("tokenizer.json")
        )
        .is_err()
    );

    // Add with parents, save, reopen, remove.
    let parents = vec![Parent {
        name: "elm0".into(),
        id: f.elms[0].weights.id.clone(),
        weight: 1.0,
    }];
    f.add(
        "elm2",
        vec!["d2".into()],
        &ok,
        &tok,
        InitKind::Seed,
        parents.clone(),
        None,
    )
    .unwrap();
    let path = f.save().unwrap();
    let g = Forest::open(&path).unwrap();
    assert_eq!(g, f);
    assert_eq!(g.elms[2].parents, parents);
    g.verify().unwrap();
    f.remove("elm1").unwrap();
    assert_eq!(f.names(), vec!["elm0", "elm2"]);
    assert!(matches!(f.remove("elm1"), Err(Error::UnknownElm(_))));

    // A file changed behind the manifest's back is refused on load.
    weights::save(&Gpt::init(&arch(), 999, &cpu()), &ok).unwrap();
    assert!(matches!(
        g.load_elm(0, &cpu()),
        Err(Error::ContentMismatch { .. })
    ));
    assert!(matches!(g.verify(), Err(Error::ContentMismatch { .. })));
    // A manifest of another format is refused.
    std::fs::write(&path, br#"{"format":"other"}"#).unwrap();
    assert!(matches!(
        Forest::open(&path),
        Err(Error::BadManifest { .. })
    ));
}

#[test]
fn a_posterior_average_branch_records_its_parents_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (f, models) = forest_of(dir.path(), 3);
    let out = dir.path().join("branch.safetensors");
    let parents =
        forest::branch::posterior_average_init(&f, &[0.6, 0.1, 0.3], Some(2), &out).unwrap();
    assert_eq!(
        parents.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        vec!["elm0", "elm2"]
    );
    assert_close(
        parents[0].weight,
        2.0 / 3.0,
        1e-12,
        "renormalised top-2 weight",
    );
    assert_eq!(parents[1].id, f.elms[2].weights.id);
    let (_, got) = weights::read(&out, Some(&arch())).unwrap();
    let want = average::average_tensors(&[
        (&weights::named_tensors(&models[0]), 2.0 / 3.0),
        (&weights::named_tensors(&models[2]), 1.0 / 3.0),
    ])
    .unwrap();
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.values.iter().zip(&w.values) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}

fn stream(domain: &str, n_ctx: usize) -> btm_model::data::DomainStream {
    let s = btm_model::data::load_streams(
        &crate::common::corpus(),
        tokenizer(),
        &[domain],
        btm_model::data::Split::Train,
        n_ctx,
        Some(60_000),
    )
    .unwrap();
    s.into_iter().next().unwrap()
}

#[test]
fn compute_accounting_sums_correctly() {
    use btm_model::experiment::{Config, Plan};
    let a = arch();
    // The paper's split: seed 50%, eight ELMs share the rest; seed + ELMs = dense exactly.
    let cfg = Config {
        total_steps: 160,
        seed_share: 0.5,
        batch_size: 4,
        protocol: btm_model::experiment::Protocol::FullBatch,
        ..Config::quick()
    };
    let p = Plan::new(&cfg, 8, &a).unwrap();
    assert_eq!(
        (p.seed_steps, p.elm_steps, p.no_seed_elm_steps),
        (80, 10, 20)
    );
    assert_eq!(p.tokens_per_step, 4 * a.n_ctx as u64);
    assert_eq!(p.btm_flops(), p.dense_flops());
    assert_close(
        p.dense_flops(),
        160.0 * 4.0 * a.n_ctx as f64 * a.train_flops_per_token(),
        1e-15,
        "dense FLOPs",
    );
    // When the ELMs' share does not divide, BTM gets at most E - 1 updates less, never more.
    let odd = Plan::new(
        &Config {
            total_steps: 100,
            seed_share: 0.3,
            ..cfg.clone()
        },
        8,
        &a,
    )
    .unwrap();
    assert_eq!((odd.seed_steps, odd.elm_steps), (30, 8));
    assert!(
        odd.btm_flops() <= odd.dense_flops()
            && odd.btm_flops() > odd.dense_flops() - 8.0 * odd.flops(1)
    );
    assert!(
        Plan::new(
            &Config {
                total_steps: 10,
                ..cfg.clone()
            },
            8,
            &a
        )
        .is_err(),
        "no updates left for the ELMs"
    );

    // The FLOPs the trainer records add up the same way: seed + ELMs = the plan.
    let dir = tempfile::tempdir().unwrap();
    let small = Config {
        total_steps: 8,
        batch_size: 2,
        ..cfg.clone()
    };
    let plan = Plan::new(&small, 2, &a).unwrap();
    let tc = |steps| btm_model::train::TrainConfig {
        steps,
        batch_size: 2,
        checkpoint_every: 0,
        ..Default::default()
    };
    let mix = btm_model::data::Mixture::new(
        vec![stream("bible_kjv", a.n_ctx), stream("python_code", a.n_ctx)],
        0,
    )
    .unwrap();
    let seed = forest::branch::train(
        forest::branch::Start::Fresh(Gpt::init(&a, 0, &cpu())),
        &mix,
        tc(plan.seed_steps),
        &dir.path().join("seed"),
        &cpu(),
        |_| {},
    )
    .unwrap();
    let mut total = seed.record.flops;
    for d in ["bible_kjv", "python_code"] {
        let m = weights::load(&seed.weights, Some(&a), &cpu()).unwrap();
        let data = btm_model::data::Mixture::new(vec![stream(d, a.n_ctx)], 0).unwrap();
        let elm = forest::branch::train(
            forest::branch::Start::Fresh(m),
            &data,
            tc(plan.elm_steps),
            &dir.path().join(d),
            &cpu(),
            |_| {},
        )
        .unwrap();
        assert_eq!(elm.record.steps, plan.elm_steps);
        assert_close(
            elm.record.flops,
            plan.flops(plan.elm_steps),
            1e-12,
            "ELM FLOPs",
        );
        total += elm.record.flops;
    }
    assert_close(total, plan.btm_flops(), 1e-12, "seed + ELMs");
    assert_close(total, plan.dense_flops(), 1e-12, "= dense");
}

#[test]
fn a_branch_can_continue_the_seeds_optimizer_and_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let a = arch();
    let mix = btm_model::data::Mixture::new(vec![stream("bible_kjv", a.n_ctx)], 0).unwrap();
    let base = btm_model::train::TrainConfig {
        batch_size: 2,
        checkpoint_every: 0,
        schedule_steps: Some(8),
        ..Default::default()
    };
    let seed_cfg = btm_model::train::TrainConfig {
        steps: 4,
        ..base.clone()
    };
    forest::branch::train(
        forest::branch::Start::Fresh(Gpt::init(&a, 0, &cpu())),
        &mix,
        seed_cfg,
        &dir.path().join("seed"),
        &cpu(),
        |_| {},
    )
    .unwrap();
    let elm_data = btm_model::data::Mixture::new(vec![stream("python_code", a.n_ctx)], 0).unwrap();
    let cont = btm_model::train::TrainConfig {
        steps: 8,
        ..base.clone()
    };
    let mut lrs = Vec::new();
    let t = forest::branch::train(
        forest::branch::Start::<Gpt>::Continue(&dir.path().join("seed")),
        &elm_data,
        cont.clone(),
        &dir.path().join("elm"),
        &cpu(),
        |s| lrs.push((s.step, s.lr)),
    )
    .unwrap();
    // Updates 5..8 of one 8-update schedule: no new warm-up.
    assert_eq!(
        lrs.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![5, 6, 7, 8]
    );
    for (k, (_, lr)) in lrs.iter().enumerate() {
        assert!((lr - cont.lr_at(4 + k as u64)).abs() < 1e-15);
    }
    assert_eq!(t.record.steps, 4);
    assert_eq!(
        t.record.tokens,
        4 * 2 * a.n_ctx as u64,
        "only the branch's own tokens are counted"
    );
    // Asking again resumes the finished run and changes nothing.
    let again = forest::branch::train(
        forest::branch::Start::<Gpt>::Continue(&dir.path().join("seed")),
        &elm_data,
        cont,
        &dir.path().join("elm"),
        &cpu(),
        |_| {},
    )
    .unwrap();
    assert_eq!(again.id, t.id);
    // steps must exceed the parent's.
    let bad = btm_model::train::TrainConfig { steps: 4, ..base };
    assert!(
        forest::branch::train(
            forest::branch::Start::<Gpt>::Continue(&dir.path().join("seed")),
            &elm_data,
            bad,
            &dir.path().join("elm2"),
            &cpu(),
            |_| {}
        )
        .is_err()
    );
}

/// Not a test on its own: the child process of `averaging_memory_stays_at_about_two_models`.
#[test]
fn average_rss_child() {
    let (Ok(files), Ok(out)) = (std::env::var("BTM_AVG_FILES"), std::env::var("BTM_AVG_OUT"))
    else {
        return;
    };
    let inputs: Vec<Input> = files.split(',').map(|p| input(Path::new(p), 1.0)).collect();
    let s = average::average_files(&inputs, None, Path::new(&out)).unwrap();
    println!("PEAK_RSS={}", s.peak_rss_bytes.unwrap_or(0));
}

/// Measurement (run with `--ignored --nocapture`): peak RSS of averaging 2, 8 and 32 ELM files
/// of a 46 MB model, each in a fresh process. Streaming keeps it at about two models.
#[test]
#[ignore]
fn averaging_memory_stays_at_about_two_models() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = btm_model::GptConfig {
        vocab_size: 2048,
        n_ctx: 128,
        d_model: 384,
        n_heads: 6,
        n_layers: 6,
    };
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    weights::save(&Gpt::init(&cfg, 1, &cpu()), &a).unwrap();
    weights::save(&Gpt::init(&cfg, 2, &cpu()), &b).unwrap();
    let model_bytes = std::fs::metadata(&a).unwrap().len();
    let mut paths = Vec::new();
    for i in 0..32 {
        let p = dir.path().join(format!("elm{i}.safetensors"));
        std::fs::copy(if i % 2 == 0 { &a } else { &b }, &p).unwrap();
        paths.push(p.to_string_lossy().into_owned());
    }
    let mut peaks = Vec::new();
    for n in [2usize, 8, 32] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "forest::average_rss_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BTM_AVG_FILES", paths[..n].join(","))
            .env("BTM_AVG_OUT", dir.path().join("avg.safetensors"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let peak: u64 = stdout
            .lines()
            .find_map(|l| l.split("PEAK_RSS=").nth(1))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "child said {stdout} / {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        eprintln!(
            "averaging {n:>2} files of {:.1} MB: peak RSS {:.1} MB ({:.2} models)",
            model_bytes as f64 / 1e6,
            peak as f64 / 1e6,
            peak as f64 / model_bytes as f64
        );
        peaks.push(peak);
    }
    assert!(
        peaks[2] < peaks[0] + model_bytes / 2,
        "peak RSS grows with the number of files: {peaks:?}"
    );
    assert!(
        peaks[2] < 3 * model_bytes,
        "more than about two models: {peaks:?} for {model_bytes}-byte models"
    );
}

/// Measurement (run with `--ignored --nocapture`): the time to score 4096 tokens with a top-k
/// ensemble grows with k, not with the number of ELMs in the forest.
#[test]
#[ignore]
fn top_k_cost_grows_with_k_not_forest_size() {
    let dir = tempfile::tempdir().unwrap();
    let a = tiny();
    let mut f = empty_forest(dir.path(), a);
    for i in 0..16 {
        let m = Gpt::init(&a, 200 + i, &cpu());
        add_random_elm(&mut f, dir.path(), &format!("elm{i}"), vec![], &m);
    }
    let t: Vec<u32> = (0..4097u32)
        .map(|i| (i * 131 + 7) % a.vocab_size as u32)
        .collect();
    let mut table = Vec::new();
    for size in [4usize, 8, 16] {
        let mut sub = f.clone();
        sub.elms.truncate(size);
        let prior: Vec<f64> = (0..size).map(|i| (i + 1) as f64).collect();
        for k in [1usize, 2, 4, size] {
            let sel = posterior::top_k(&prior, k);
            let t0 = std::time::Instant::now();
            ensemble::score_forest(&sub, &sel, &t, Weighting::Posterior, 8, &cpu()).unwrap();
            let secs = t0.elapsed().as_secs_f64();
            eprintln!("forest of {size:>2} ELMs, top-{k:<2}: {secs:.2} s");
            table.push((size, k, secs));
        }
    }
    // Top-1 on a forest of 16 costs about what top-1 on a forest of 4 costs.
    let t1 = |s| table.iter().find(|x| x.0 == s && x.1 == 1).unwrap().2;
    assert!(t1(16) < 2.0 * t1(4), "{table:?}");
}

#[test]
fn the_init_kind_keeps_the_manifest_names() {
    for (json, kind) in [
        ("\"seed\"", InitKind::Seed),
        ("\"posterior_average\"", InitKind::PosteriorAverage),
        ("\"random\"", InitKind::Random),
    ] {
        assert_eq!(serde_json::from_str::<InitKind>(json).unwrap(), kind);
        assert_eq!(serde_json::to_string(&kind).unwrap(), json);
    }
    assert!(serde_json::from_str::<InitKind>("\"posterior-average\"").is_err());
    // An ELM entry as existing forest.json files hold it.
    let elm: ForestElm = serde_json::from_str(
        r#"{"name": "legal", "domains": ["legal"],
            "weights": {"path": "legal/model.safetensors", "id": "ab"},
            "init": "posterior_average",
            "parents": [{"name": "seed", "id": "cd", "weight": 1.0}]}"#,
    )
    .unwrap();
    assert_eq!(elm.init, InitKind::PosteriorAverage);
    assert!(
        serde_json::to_string(&elm)
            .unwrap()
            .contains(r#""init":"posterior_average""#)
    );
    // The command line's names.
    assert_eq!("seed".parse::<InitKind>().unwrap(), InitKind::Seed);
    assert_eq!(
        "posterior-average".parse::<InitKind>().unwrap(),
        InitKind::PosteriorAverage
    );
    assert_eq!(
        "posterior_average".parse::<InitKind>().unwrap(),
        InitKind::PosteriorAverage
    );
    assert_eq!("random".parse::<InitKind>().unwrap(), InitKind::Random);
    assert!("average".parse::<InitKind>().is_err());
}
