use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use btm_model::data::{self, Mixture, Split};
use btm_model::train::{CHECKPOINT_FILE, RunOutcome, TrainConfig, Trainer};
use btm_model::{Gpt, eval, weights};

use crate::common::{assert_same_tensors, corpus, cpu, short_run, tiny, tokenizer};

fn austen(max_bytes: Option<usize>) -> Mixture {
    let streams = data::load_streams(
        &corpus(),
        tokenizer(),
        &["novels_austen"],
        Split::Train,
        tiny().n_ctx,
        max_bytes,
    )
    .unwrap();
    Mixture::new(streams, 3).unwrap()
}

#[test]
fn the_schedule_warms_up_then_decays_linearly_to_zero() {
    let cfg = TrainConfig {
        steps: 100,
        lr: 1e-3,
        warmup_frac: 0.08,
        ..Default::default()
    };
    assert!((cfg.lr_at(0) - 1e-3 / 8.0).abs() < 1e-12);
    assert!((cfg.lr_at(7) - 1e-3).abs() < 1e-12);
    assert!(cfg.lr_at(50) < 1e-3 && cfg.lr_at(50) > cfg.lr_at(60));
    assert!(cfg.lr_at(99) > 0.0 && cfg.lr_at(99) < 2e-5);
    assert_eq!(cfg.lr_at(100), 0.0);
    // A branch that continues a longer schedule starts where the seed stopped.
    let cont = TrainConfig {
        schedule_steps: Some(200),
        schedule_offset: 100,
        ..cfg.clone()
    };
    assert!((cont.lr_at(0) - TrainConfig { steps: 200, ..cfg }.lr_at(100)).abs() < 1e-15);
}

/// The paper's finding that matters most here: training lowers the loss. Tiny model, real
/// domain (Austen), 200 updates.
#[test]
fn tiny_loss_falls_clearly_on_a_real_domain() {
    let data = austen(None);
    let model = Gpt::init(&tiny(), 0, &cpu());
    let valid = {
        let docs = corpus().documents("novels_austen", Split::Valid).unwrap();
        let (mut t, _) = data::tokenize_documents(tokenizer(), &docs, Some(60_000)).unwrap();
        t.truncate(4096);
        t
    };
    let before = eval::evaluate(&model, Some(tokenizer()), &valid, 8, &cpu()).unwrap();
    let cfg = short_run(200, 8, 2e-3);
    let mut trainer = Trainer::new(model, cfg, &cpu(), None).unwrap();
    trainer.run_to_end(&data, |_| {}).unwrap();
    let losses = &trainer.state.losses;
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    let after = eval::evaluate(&trainer.model(), Some(tokenizer()), &valid, 8, &cpu()).unwrap();
    eprintln!(
        "train loss {first:.3} -> {last:.3}; valid ppl {:.1} -> {:.1}, bpb {:.3} -> {:.3}",
        before.perplexity, after.perplexity, before.bits_per_byte, after.bits_per_byte
    );
    assert!(
        first > 7.0,
        "an untrained model is near uniform over 2048 tokens (ln 2048 = 7.6), got {first}"
    );
    assert!(
        last < first - 2.0,
        "training loss fell only from {first} to {last}"
    );
    assert!(
        after.perplexity < before.perplexity / 5.0,
        "valid perplexity {} -> {}",
        before.perplexity,
        after.perplexity
    );
    assert_eq!(trainer.state.tokens, 200 * 8 * tiny().n_ctx as u64);
}

fn resume_config() -> TrainConfig {
    TrainConfig {
        steps: 40,
        batch_size: 4,
        grad_accum: 2,
        lr: 2e-3,
        checkpoint_every: 5,
        seed: 9,
        ..Default::default()
    }
}

fn run_to_end(dir: Option<&Path>) -> Trainer {
    let data = austen(Some(400_000));
    let model = Gpt::init(&tiny(), 21, &cpu());
    let mut t = Trainer::new(model, resume_config(), &cpu(), dir).unwrap();
    t.run_to_end(&data, |_| {}).unwrap();
    t
}

/// Not a test on its own: the child process of `a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends`.
#[test]
fn resume_child() {
    let Ok(dir) = std::env::var("BTM_RESUME_CHILD_DIR") else {
        return;
    };
    run_to_end(Some(Path::new(&dir)));
}

fn spawn_child(dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "train::resume_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BTM_RESUME_CHILD_DIR", dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join(CHECKPOINT_FILE);
    // Start a run in a child process and SIGKILL it once it has checkpointed past update 10.
    let mut child = spawn_child(dir.path());
    let deadline = Instant::now() + Duration::from_secs(600);
    let killed_at = loop {
        if let Ok(t) = Trainer::<Gpt>::resume(&ckpt, &cpu())
            && t.state.step >= 10
        {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            break t.state.step;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    let partial = Trainer::<Gpt>::resume(&ckpt, &cpu()).unwrap();
    assert!(
        partial.state.step >= killed_at && partial.state.step < 40,
        "killed at {}",
        partial.state.step
    );
    // Restart: it continues from the checkpoint and finishes.
    let status = spawn_child(dir.path()).wait().unwrap();
    assert!(status.success());
    let resumed = Trainer::<Gpt>::resume(&ckpt, &cpu()).unwrap();
    assert_eq!(resumed.state.step, 40);
    // An uninterrupted run in this process.
    let straight = run_to_end(None);
    assert_eq!(resumed.state.data_position, straight.state.data_position);
    assert_eq!(resumed.state.tokens, straight.state.tokens);
    for (i, (a, b)) in resumed
        .state
        .losses
        .iter()
        .zip(&straight.state.losses)
        .enumerate()
    {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "loss of update {} differs: {a} vs {b}",
            i + 1
        );
    }
    let wa = weights::named_tensors(&resumed.model());
    let wb = weights::named_tensors(&straight.model());
    assert_same_tensors(&wa, &wb, 1e-4);
}

#[test]
fn a_checkpoint_with_other_settings_is_not_silently_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data = austen(Some(100_000));
    let cfg = TrainConfig {
        steps: 2,
        batch_size: 2,
        checkpoint_every: 1,
        ..Default::default()
    };
    let mut t = Trainer::new(
        Gpt::init(&tiny(), 0, &cpu()),
        cfg.clone(),
        &cpu(),
        Some(dir.path()),
    )
    .unwrap();
    t.run_to_end(&data, |_| {}).unwrap();
    let other = TrainConfig { lr: 1.0, ..cfg };
    let err = Trainer::new(
        Gpt::init(&tiny(), 0, &cpu()),
        other,
        &cpu(),
        Some(dir.path()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("different settings"), "{err}");
    // A garbage checkpoint is an error, not a panic.
    std::fs::write(dir.path().join(CHECKPOINT_FILE), b"garbage").unwrap();
    assert!(Trainer::<Gpt>::resume(&dir.path().join(CHECKPOINT_FILE), &cpu()).is_err());
}

#[test]
fn a_run_stopped_at_update_k_and_resumed_ends_with_the_weights_of_an_uninterrupted_run() {
    let data = austen(Some(100_000));
    let cfg = TrainConfig {
        steps: 6,
        batch_size: 2,
        grad_accum: 2,
        lr: 2e-3,
        checkpoint_every: 4,
        seed: 3,
        ..Default::default()
    };
    let init = || Gpt::init(&tiny(), 5, &cpu());
    let dir = tempfile::tempdir().unwrap();
    // A flag raised before the run starts stops it at once, with a checkpoint of update 0.
    let raised = AtomicBool::new(true);
    let mut t = Trainer::new(init(), cfg.clone(), &cpu(), Some(dir.path())).unwrap();
    let outcome = t.run(&data, &raised, |_| panic!("no update")).unwrap();
    assert_eq!(outcome, RunOutcome::Stopped { step: 0 });
    assert_eq!(
        Trainer::<Gpt>::resume(&dir.path().join(CHECKPOINT_FILE), &cpu())
            .unwrap()
            .state
            .step,
        0
    );
    // Stopped between updates 3 and 4 (not a checkpoint update): the stop writes one.
    let stop = AtomicBool::new(false);
    let mut seen = Vec::new();
    let outcome = t
        .run(&data, &stop, |s| {
            seen.push(s.step);
            if s.step == 3 {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
    assert_eq!(outcome, RunOutcome::Stopped { step: 3 });
    drop(t);
    // A new process would do this: the run directory's checkpoint resumes at update 3.
    let mut resumed = Trainer::new(init(), cfg.clone(), &cpu(), Some(dir.path())).unwrap();
    assert_eq!(resumed.state.step, 3);
    let never = AtomicBool::new(false);
    let outcome = resumed.run(&data, &never, |s| seen.push(s.step)).unwrap();
    assert_eq!(outcome, RunOutcome::Finished);
    assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
    let mut straight = Trainer::new(init(), cfg, &cpu(), None).unwrap();
    straight.run_to_end(&data, |_| {}).unwrap();
    assert_eq!(resumed.state, straight.state);
    assert_eq!(
        weights::named_tensors(&resumed.model()),
        weights::named_tensors(&straight.model()),
        "the resumed run's weights are exactly the uninterrupted run's"
    );
}
