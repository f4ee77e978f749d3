use btm_model::Gpt;
use burn::tensor::{Int, Tensor, TensorData};

use crate::common::{cpu, max_abs_diff, tiny};

fn logits(model: &Gpt, tokens: &[i64]) -> Vec<f32> {
    let x: Tensor<2, Int> =
        Tensor::from_data(TensorData::new(tokens.to_vec(), [1, tokens.len()]), &cpu());
    model
        .forward(x)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn a_future_token_never_changes_an_earlier_logit() {
    let cfg = tiny();
    let model = Gpt::init(&cfg, 1, &cpu());
    let v = cfg.vocab_size;
    let base: Vec<i64> = (0..32).map(|i| (i * 37 % v) as i64).collect();
    let a = logits(&model, &base);
    for changed_at in [5usize, 17, 31] {
        let mut other = base.clone();
        other[changed_at] = (other[changed_at] + 11) % v as i64;
        let b = logits(&model, &other);
        // Positions before the change are identical; the changed position differs.
        for pos in 0..changed_at {
            let (x, y) = (&a[pos * v..(pos + 1) * v], &b[pos * v..(pos + 1) * v]);
            let diff = max_abs_diff(x, y);
            assert!(
                diff < 1e-5,
                "position {pos} changed by {diff} when token {changed_at} changed"
            );
        }
        let at = &a[changed_at * v..(changed_at + 1) * v];
        let bt = &b[changed_at * v..(changed_at + 1) * v];
        assert!(
            at.iter().zip(bt).any(|(p, q)| (p - q).abs() > 1e-4),
            "the changed position must see its own token"
        );
    }
}

#[test]
fn init_is_deterministic_and_seed_dependent() {
    let cfg = tiny();
    let a = btm_model::weights::named_tensors(&Gpt::init(&cfg, 7, &cpu()));
    let b = btm_model::weights::named_tensors(&Gpt::init(&cfg, 7, &cpu()));
    let c = btm_model::weights::named_tensors(&Gpt::init(&cfg, 8, &cpu()));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(
        a.iter().map(|t| t.values.len()).sum::<usize>(),
        cfg.num_params()
    );
}

#[test]
fn logits_are_finite_and_config_round_trips() {
    let cfg = tiny();
    let model = Gpt::init(&cfg, 3, &cpu());
    assert_eq!(model.config(), cfg);
    let l = logits(&model, &(0..cfg.n_ctx as i64).collect::<Vec<_>>());
    assert_eq!(l.len(), cfg.n_ctx * cfg.vocab_size);
    assert!(l.iter().all(|x| x.is_finite()));
}
