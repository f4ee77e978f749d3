//! DEMix, the paper's second baseline: per-domain feed-forward experts, shared everything else,
//! routed by domain in training and mixed by the domain posterior at test time.

// A failed unwrap fails the test, which is what it should do here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use btm_model::data::{self, DomainStream, Mixture, Split};
use btm_model::demix::{self, Demix, DemixTrainer};
use btm_model::experiment::demix_row::{self, DemixEval};
use btm_model::experiment::{Config, Plan};
use btm_model::train::{CHECKPOINT_FILE, TrainConfig};
use btm_model::{Gpt, GptConfig};
use burn::tensor::{Int, Tensor, TensorData};

use crate::common::{assert_same_tensors, corpus, cpu, short_run, tiny, tokenizer};

fn arch(n_ctx: usize) -> GptConfig {
    let mut c = tiny();
    c.n_ctx = n_ctx;
    c
}

fn token_batch(a: &GptConfig, b: usize, t: usize) -> Tensor<2, Int> {
    let v = a.vocab_size as i64;
    let x: Vec<i64> = (0..(b * t) as i64).map(|i| (i * 131 + 7) % v).collect();
    Tensor::from_data(TensorData::new(x, [b, t]), &cpu())
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_demix_whose_experts_are_a_dense_ffn_computes_the_dense_model() {
    let a = arch(16);
    let dense = Gpt::init(&a, 5, &cpu());
    let x = token_batch(&a, 3, 16);
    let want = values(dense.forward(x.clone()));
    // One domain: DEMix is the dense model.
    let one = Demix::from_dense(&dense, 1);
    assert_eq!(one.config(), a);
    let got = values(one.forward(x.clone(), &[0, 0, 0]));
    assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
    // Three experts, all copies of the dense FFN: any routing gives the dense output.
    let three = Demix::from_dense(&dense, 3);
    for routes in [[0, 1, 2], [2, 0, 1], [1, 1, 0], [2, 2, 2]] {
        let got = values(three.forward(x.clone(), &routes));
        let d = max_diff(&got, &want);
        assert!(d < 1e-5, "routes {routes:?}: {d}");
    }
}

#[test]
fn each_sequence_goes_through_its_own_expert_only() {
    let a = arch(16);
    let mut m = Demix::init(&a, 3, 7, &cpu());
    // Initialised like the dense baseline: shared parts and expert 0 are Gpt::init(seed).
    let dense = Gpt::init(&a, 7, &cpu());
    let x = token_batch(&a, 3, 16);
    let d = max_diff(
        &values(m.expert_model(0).forward(x.clone())),
        &values(dense.forward(x.clone())),
    );
    assert!(d < 1e-6, "expert 0 is the dense initialisation: {d}");
    let routes = [0, 2, 1];
    let before = values(m.forward(x.clone(), &routes));
    let row = 16 * a.vocab_size;
    // Row i equals the shared model with expert routes[i], run alone.
    for (i, &e) in routes.iter().enumerate() {
        let alone = values(m.expert_model(e).forward(x.clone().narrow(0, i, 1)));
        let d = max_diff(&before[i * row..(i + 1) * row], &alone);
        assert!(d < 1e-4, "sequence {i} vs expert {e} alone: {d}");
    }
    // The experts really differ (otherwise the checks below prove nothing).
    let e1 = values(m.expert_model(1).forward(x.clone()));
    let e2 = values(m.expert_model(2).forward(x.clone()));
    assert!(max_diff(&e1, &e2) > 1e-3);
    // Changing expert 1 changes only the sequence routed to it (sequence 2).
    m.set_expert(1, &Gpt::init(&a, 99, &cpu()));
    let after = values(m.forward(x, &routes));
    for i in 0..3 {
        let d = max_diff(
            &before[i * row..(i + 1) * row],
            &after[i * row..(i + 1) * row],
        );
        if i == 2 {
            assert!(d > 1e-3, "sequence 2 is routed to expert 1: {d}");
        } else {
            assert!(d < 1e-6, "sequence {i} is not routed to expert 1: {d}");
        }
    }
}

#[test]
fn routes_follow_the_mixture_domain_order() {
    assert_eq!(demix::routes(0, 4, 8), vec![0, 1, 2, 3]);
    assert_eq!(demix::routes(4, 4, 8), vec![4, 5, 6, 7]);
    assert_eq!(demix::routes(6, 4, 2), vec![0, 1, 0, 1]);
    // The mixture's sample k comes from domain k mod E: the route of every block is its domain.
    let mix = Mixture::new(vec![stream("bible_kjv", 16), stream("python_code", 16)], 0).unwrap();
    for (k, e) in demix::routes(3, 5, 2).into_iter().enumerate() {
        let block = mix.sample(3 + k as u64);
        let own = &mix.domains()[e];
        assert!(
            (0..own.num_blocks()).any(|i| own.block(i) == block),
            "block {} is not from domain {e}",
            3 + k
        );
    }
}

fn stream(domain: &str, n_ctx: usize) -> DomainStream {
    data::load_streams(
        &corpus(),
        tokenizer(),
        &[domain],
        Split::Train,
        n_ctx,
        Some(60_000),
    )
    .unwrap()
    .into_iter()
    .next()
    .unwrap()
}

fn dev(domain: &str, n: usize) -> Vec<u32> {
    let docs = corpus().documents(domain, Split::Valid).unwrap();
    let (mut t, _) = data::tokenize_documents(tokenizer(), &docs, Some(n * 8)).unwrap();
    t.truncate(n + 1);
    t
}

#[test]
fn a_tiny_demix_learns_two_domains_with_its_two_experts() {
    let a = arch(32);
    let domains = ["bible_kjv", "python_code"];
    let mix = Mixture::new(domains.iter().map(|d| stream(d, 32)).collect(), 1).unwrap();
    let cfg = short_run(40, 4, 3e-3);
    let mut t = DemixTrainer::new(Demix::init(&a, 2, 0, &cpu()), cfg, &cpu(), None).unwrap();
    t.run_to_end(&mix, |_| {}).unwrap();
    let losses = &t.state.losses;
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
    eprintln!("demix train loss {first:.3} -> {last:.3}");
    assert!(first > 7.0, "untrained is near uniform: {first}");
    assert!(last < first - 1.0, "loss fell only from {first} to {last}");
    // Compute: the dense model's FLOPs per token, 40 updates of 4 blocks.
    let tokens = 40 * 4 * 32;
    assert_eq!(t.state.tokens, tokens);
    assert!((t.state.flops - a.train_flops_per_token() * tokens as f64).abs() < 1.0);
    // Each domain's dev data is predicted better by its own expert than by the other.
    let m = t.model();
    for (j, d) in domains.iter().enumerate() {
        let lp = demix::expert_logprobs(&m, &dev(d, 512), 8, &cpu()).unwrap();
        let nll: Vec<f64> = lp
            .iter()
            .map(|l| -l.iter().sum::<f64>() / l.len() as f64)
            .collect();
        eprintln!("{d}: nll per expert {nll:?}");
        assert!(
            nll[j] < nll[1 - j],
            "{d}: own expert {} vs other {}",
            nll[j],
            nll[1 - j]
        );
    }
}

#[test]
fn a_demix_run_resumes_from_its_checkpoint_and_its_weights_round_trip() {
    let a = arch(16);
    let mix = Mixture::new(vec![stream("bible_kjv", 16), stream("python_code", 16)], 2).unwrap();
    let cfg = TrainConfig {
        steps: 8,
        batch_size: 3,
        lr: 2e-3,
        checkpoint_every: 4,
        ..Default::default()
    };
    let init = || Demix::init(&a, 2, 3, &cpu());
    let dir = tempfile::tempdir().unwrap();
    // Interrupted after 4 updates (the checkpoint of update 4 is on disk)...
    {
        let mut t = DemixTrainer::new(init(), cfg.clone(), &cpu(), Some(dir.path())).unwrap();
        for _ in 0..4 {
            t.step(&mix).unwrap();
        }
        t.save_checkpoint().unwrap();
    }
    // ...then restarted: it resumes at update 4.
    let mut resumed = DemixTrainer::new(init(), cfg.clone(), &cpu(), Some(dir.path())).unwrap();
    assert_eq!(resumed.state.step, 4);
    resumed.run_to_end(&mix, |_| {}).unwrap();
    let mut straight = DemixTrainer::new(init(), cfg.clone(), &cpu(), None).unwrap();
    straight.run_to_end(&mix, |_| {}).unwrap();
    assert_eq!(resumed.state.data_position, straight.state.data_position);
    for (x, y) in resumed.state.losses.iter().zip(&straight.state.losses) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    let wa = btm_model::weights::module_tensors(&resumed.model());
    let wb = btm_model::weights::module_tensors(&straight.model());
    assert!(wa.iter().any(|t| t.name == "h.0.experts.1.c_fc.weight"));
    assert_same_tensors(&wa, &wb, 1e-4);
    // Other settings are refused, not silently reused.
    let other = TrainConfig { lr: 1.0, ..cfg };
    assert!(DemixTrainer::new(init(), other, &cpu(), Some(dir.path())).is_err());
    assert!(dir.path().join(CHECKPOINT_FILE).exists());
    // The weights file round-trips exactly and refuses another architecture.
    let path = dir.path().join("demix.safetensors");
    let m = resumed.model();
    demix::save(&m, &path).unwrap();
    let back = demix::load(&path, Some(&a), &cpu()).unwrap();
    assert_eq!(back.n_experts(), 2);
    assert_eq!(
        btm_model::weights::module_tensors(&back),
        btm_model::weights::module_tensors(&m)
    );
    assert!(demix::load(&path, Some(&arch(32)), &cpu()).is_err());
    // An ordinary ELM file is not a DEMix file.
    let elm = dir.path().join("elm.safetensors");
    btm_model::weights::save(&Gpt::init(&a, 0, &cpu()), &elm).unwrap();
    assert!(demix::load(&elm, None, &cpu()).is_err());
}

#[test]
fn the_experiment_reports_a_compute_matched_demix_row_and_skips_it_when_done() {
    let a = arch(16);
    let mut cfg = Config::quick();
    (cfg.total_steps, cfg.batch_size, cfg.lr, cfg.prior_blocks) = (12, 2, 3e-3, 4);
    let train = ["bible_kjv", "python_code"];
    let streams: Vec<DomainStream> = train.iter().map(|d| stream(d, 16)).collect();
    let plan = Plan::new(&cfg, streams.len(), &a).unwrap();
    let all = ["bible_kjv", "python_code", "licenses"];
    let test: Vec<(String, Vec<u32>)> = all.iter().map(|d| (d.to_string(), dev(d, 96))).collect();
    let devs: Vec<(String, Vec<u32>)> = all.iter().map(|d| (d.to_string(), dev(d, 64))).collect();
    let dir = tempfile::tempdir().unwrap();
    let row = |say: &mut dyn FnMut(&str)| {
        demix_row::system(
            &cfg,
            &plan,
            &a,
            &streams,
            &test,
            &devs,
            dir.path(),
            &cpu(),
            say,
            &mut |_| {},
        )
        .unwrap()
    };
    let mut lines = Vec::new();
    let r = row(&mut |s| lines.push(s.to_string())).expect("a DEMix row");
    assert_eq!(r.name, "demix");
    assert_eq!(r.inference_models, 2);
    assert_eq!(r.in_domain.len(), 2);
    assert_eq!(r.out_domain.len(), 1);
    assert!(r.mean_in.is_finite() && r.mean_out.is_finite() && r.mean_in > 1.0);
    assert!((r.train_flops - plan.dense_flops()).abs() <= 1e-9 * plan.dense_flops());
    let run = dir.path().join("demix");
    assert!(run.join("trained.json").exists() && run.join("model.safetensors").exists());
    let priors: DemixEval =
        serde_json::from_slice(&std::fs::read(run.join("priors.json")).unwrap()).unwrap();
    assert_eq!(priors.experts, train);
    for p in priors.priors.values() {
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
    // A second call finds the finished run and gives the same row without training.
    let weights_before = std::fs::read(run.join("model.safetensors")).unwrap();
    let again = row(&mut |_| {}).expect("the finished DEMix row");
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        weights_before
    );
    assert_eq!(again.in_domain, r.in_domain);
    assert_eq!(again.out_domain, r.out_domain);
    eprintln!("{lines:?}\n{r:?}");
}
