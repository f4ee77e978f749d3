//! The compute-matched experiment under the released code's protocol (update-matched): the
//! seed is the dense run's checkpoint, the ELMs continue it at 1/E of the batch, and the
//! forest's FLOPs equal the dense LM's.

use btm_model::data::Split;
use btm_model::experiment::seeds::{Summary, Verdict};
use btm_model::experiment::{self, Config, Plan, Protocol};
use btm_model::train::{CHECKPOINT_FILE, TRAIN_STATE_KEY, TrainState};
use btm_model::weights;

use crate::common::{assert_close, corpus, cpu, tiny};

#[test]
fn update_matched_plan_gives_every_elm_the_seeds_remaining_updates_at_a_fraction_of_the_batch() {
    let a = tiny();
    let cfg = Config {
        total_steps: 160,
        batch_size: 8,
        ..Config::quick()
    };
    assert_eq!(cfg.protocol, Protocol::UpdateMatched, "the default");
    let p = Plan::new(&cfg, 8, &a).unwrap();
    assert_eq!(
        (p.seed_steps, p.elm_steps, p.no_seed_elm_steps),
        (80, 80, 160)
    );
    assert_eq!((p.batch_size, p.elm_batch_size), (8, 1));
    assert_eq!(p.elm_tokens_per_step * 8, p.tokens_per_step);
    // Seed + 8 ELMs at 1/8 of the batch = the dense LM, exactly; each lineage has B updates.
    assert_eq!(p.btm_flops(), p.dense_flops());
    assert_eq!(p.seed_steps + p.elm_steps, p.dense_steps);
    // A batch that does not split into whole blocks per ELM is refused, with the reason.
    let err = Plan::new(
        &Config {
            batch_size: 4,
            ..cfg.clone()
        },
        8,
        &a,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("multiple of 8"), "{err}");
}

fn state(path: &std::path::Path) -> TrainState {
    let bytes = std::fs::read(path).unwrap();
    let raw = weights::read_raw(&bytes).unwrap();
    serde_json::from_str(&raw.meta[TRAIN_STATE_KEY]).unwrap()
}

#[test]
fn the_update_matched_experiment_branches_from_the_dense_checkpoint_and_skips_a_finished_run() {
    let cfg = Config {
        total_steps: 16,
        batch_size: 8,
        eval_tokens: 256,
        prior_blocks: 2,
        train_bytes: Some(60_000),
        tokenizer_bytes: 16 << 10,
        random_split: false,
        no_seed: false,
        demix: false,
        curve_points: 2,
        ..Config::quick()
    };
    // One extra evaluation corpus of one domain (`--eval-corpus`): the same layout, valid and
    // test splits only.
    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("extra");
    std::fs::create_dir_all(extra.join("letters")).unwrap();
    for (split, from) in [("valid", Split::Valid), ("test", Split::Test)] {
        let docs = corpus().documents("novels_austen", from).unwrap();
        let lines: Vec<String> = docs
            .iter()
            .take(40)
            .map(|d| serde_json::json!({"id": d.id, "text": d.text}).to_string())
            .collect();
        std::fs::write(
            extra.join("letters").join(format!("{split}.jsonl")),
            lines.join("\n"),
        )
        .unwrap();
    }
    let cfg = Config {
        eval_corpora: vec![extra.clone()],
        ..cfg
    };
    let out = dir.path().join("exp");
    let mut lines = Vec::new();
    let mut runs = std::collections::BTreeMap::<String, u64>::new();
    let r = experiment::run(
        &cfg,
        &corpus(),
        &out,
        &cpu(),
        &mut |s| lines.push(s.to_string()),
        &mut |run, _| *runs.entry(run.to_string()).or_default() += 1,
    )
    .unwrap();
    // Only the dense LM and the 8 ELMs train: the seed is the dense run at s·B.
    assert_eq!(runs.get("dense"), Some(&16));
    assert!(!runs.contains_key("seed"), "{runs:?}");
    assert_eq!(runs.len(), 9, "{runs:?}");
    assert!(
        runs.iter().all(|(k, v)| k == "dense" || *v == 8),
        "{runs:?}"
    );

    // The seed checkpoint is the dense run's state after 8 updates: same losses, same data.
    let seed = state(&out.join("seed").join(CHECKPOINT_FILE));
    let dense = state(&out.join("dense").join(CHECKPOINT_FILE));
    assert_eq!(seed.step, 8);
    assert_eq!(seed.data_position, 64);
    assert_eq!(seed.losses[..], dense.losses[..8]);
    assert_eq!(dense.step, 16);

    // Each ELM continued the seed's update count and schedule (B = 16) at one block per
    // update, reading its domain on from the 8 blocks the seed read of it.
    for d in btm_model::data::TRAIN_DOMAINS {
        let elm = state(&out.join("btm").join(d).join(CHECKPOINT_FILE));
        assert_eq!(elm.step, 16, "{d}");
        assert_eq!(elm.config.steps, 16, "{d}");
        assert_eq!(elm.config.batch_size, 1, "{d}");
        assert_eq!(elm.config.data_offset, 8, "{d}");
        assert_eq!(elm.data_position, 16, "{d}");
        assert_eq!(elm.losses.len(), 8, "{d}");
        assert!(elm.losses.iter().all(|l| l.is_finite()));
    }

    let sys = |n: &str| {
        r.systems.iter().find(|s| s.name == n).unwrap_or_else(|| {
            panic!(
                "no {n} in {:?}",
                r.systems.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    // Compute matched: the forest (seed included) spent exactly the dense LM's FLOPs.
    assert_close(
        sys("btm_ensemble").train_flops,
        sys("dense").train_flops,
        1e-12,
        "BTM FLOPs = dense FLOPs",
    );
    assert_close(
        sys("seed").train_flops,
        sys("dense").train_flops / 2.0,
        1e-12,
        "the seed is half",
    );
    for n in [
        "btm_ensemble_topk",
        "btm_ensemble_top1",
        "btm_ensemble_top4",
        "btm_ensemble_prev_token",
        "btm_ensemble_uniform",
        "btm_average_posterior",
        "btm_average_uniform",
        "btm_seed_member_ensemble",
        "btm_seed_member_average_posterior",
    ] {
        let s = sys(n);
        assert!(
            s.mean_in.is_finite() && s.mean_out.is_finite() && s.mean_in > 1.0,
            "{n}"
        );
    }
    assert_eq!(sys("btm_ensemble_top4").inference_models, 4);
    assert_eq!(sys("btm_seed_member_ensemble").inference_models, 9);
    // The extra corpus is scored apart from the bundled evaluation-only domains.
    let d = sys("dense");
    assert_eq!((d.in_domain.len(), d.out_domain.len()), (8, 4));
    assert_eq!(d.extra_domain.keys().collect::<Vec<_>>(), ["letters"]);
    assert!(d.mean_extra.is_finite() && d.mean_extra == d.extra_domain["letters"]);
    assert_eq!(r.priors["letters"].len(), 8);
    // The matrix: every domain scored by every ELM, the seed and the dense LM.
    assert_eq!(r.elm_matrix.len(), 13);
    for row in r.elm_matrix.values() {
        assert_eq!(row.len(), 10, "{row:?}");
        assert!(row.values().all(|v| v.is_finite() && *v > 1.0));
    }
    assert_eq!(
        r.elm_matrix["bible_kjv"]["dense"],
        sys("dense").in_domain["bible_kjv"]
    );
    assert!(r.seed_member_priors.values().all(|p| p.len() == 9));
    let md = experiment::markdown(&r);
    assert!(
        md.contains("protocol update-matched") && md.contains("Each model alone"),
        "{md}"
    );

    // Rerunning finds the finished run and returns it without training.
    let before = std::fs::read(out.join("results.json")).unwrap();
    let mut trained = 0;
    let again = experiment::run(&cfg, &corpus(), &out, &cpu(), &mut |_| {}, &mut |_, _| {
        trained += 1
    })
    .unwrap();
    assert_eq!(trained, 0);
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), before);
    assert_eq!(again.systems.len(), r.systems.len());
    // Other settings in the same directory are refused, not mixed in.
    let other = Config {
        lr: 1e-3,
        ..cfg.clone()
    };
    let err = experiment::run(&other, &corpus(), &out, &cpu(), &mut |_| {}, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("other settings"), "{err}");
    // A missing evaluation corpus is named in the error.
    let missing = Config {
        eval_corpora: vec![dir.path().join("no-such-corpus")],
        ..cfg.clone()
    };
    let err = experiment::run(
        &missing,
        &corpus(),
        &dir.path().join("exp2"),
        &cpu(),
        &mut |_| {},
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no-such-corpus"), "{err}");

    // Two seeds' reports summarise into mean ± sd and verdicts (here the same run twice: no
    // spread, so any non-zero difference is decided).
    let mut second = r.clone();
    second.config.seed = 1;
    let s = Summary::of(&[r.clone(), second]);
    assert_eq!(s.seeds, vec![0, 1]);
    let f = s
        .findings
        .iter()
        .find(|f| f.better == "btm_ensemble" && f.worse == "dense")
        .unwrap();
    assert_eq!(f.diff_pct.sd, 0.0);
    assert_ne!(f.verdict, Verdict::Inconclusive);
    assert!(
        s.markdown()
            .contains("| 1. ELMforest beats the compute-matched Transformer-LM |")
    );
    eprintln!("{}", lines.join("\n"));
}
