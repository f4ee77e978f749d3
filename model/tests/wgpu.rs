//! burn-wgpu on whatever adapter the machine has (lavapipe, a software Vulkan device, in CI).

use btm_model::data::{self, Mixture, Split};
use btm_model::device::DeviceKind;
use btm_model::train::Trainer;
use btm_model::{Gpt, eval};

use burn::tensor::{Device, Tensor};

use crate::common::{assert_close, corpus, cpu, short_run, tiny, tokenizer};

/// The wgpu device, or None (with a message) when this machine has no usable adapter.
/// `BTM_REQUIRE_WGPU=1` (set by `.ci/run`, which installs lavapipe) turns absence into a failure.
fn wgpu_device() -> Option<Device> {
    let probe = std::panic::catch_unwind(|| {
        let d = DeviceKind::Wgpu.device().unwrap();
        let v = Tensor::<1>::ones([4], &d)
            .sum()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(v, vec![4.0]);
        d
    });
    match probe {
        Ok(d) => Some(d),
        Err(_) if std::env::var_os("BTM_REQUIRE_WGPU").is_some() => {
            panic!(
                "BTM_REQUIRE_WGPU is set but no wgpu adapter works (install mesa-vulkan-drivers)"
            )
        }
        Err(_) => {
            eprintln!(
                "SKIPPED: no wgpu adapter on this machine (install mesa-vulkan-drivers for lavapipe)"
            );
            None
        }
    }
}

#[test]
fn tiny_trains_on_wgpu_and_matches_the_cpu_forward_pass() {
    let Some(device) = wgpu_device() else { return };
    let cfg = tiny();
    let model = Gpt::init(&cfg, 4, &device);
    let cpu_model = Gpt::init(&cfg, 4, &cpu());
    let tokens: Vec<u32> = (0..300u32)
        .map(|i| (i * 17 + 3) % cfg.vocab_size as u32)
        .collect();
    let g = eval::evaluate(&model, None, &tokens, 2, &device).unwrap();
    let c = eval::evaluate(&cpu_model, None, &tokens, 2, &cpu()).unwrap();
    assert_close(g.loss, c.loss, 1e-3, "wgpu vs cpu loss");

    let streams = data::load_streams(
        &corpus(),
        tokenizer(),
        &["bible_kjv"],
        Split::Train,
        cfg.n_ctx,
        Some(200_000),
    )
    .unwrap();
    let mixture = Mixture::new(streams, 0).unwrap();
    let tc = short_run(12, 4, 3e-3);
    let mut t = Trainer::new(model, tc, &device, None).unwrap();
    t.run_to_end(&mixture, |_| {}).unwrap();
    let l = &t.state.losses;
    eprintln!("wgpu losses: {l:?}");
    assert!(l.iter().all(|x| x.is_finite()));
    assert!(
        l[l.len() - 1] < l[0] - 0.3,
        "loss did not fall on wgpu: {l:?}"
    );
}
