use btm_model::weights::{self, NamedTensor};
use btm_model::{Error, Gpt, Preset};

use crate::common::{cpu, tiny};

fn saved(dir: &std::path::Path) -> (Gpt, std::path::PathBuf) {
    let model = Gpt::init(&tiny(), 5, &cpu());
    let path = dir.join("model.safetensors");
    weights::save(&model, &path).unwrap();
    (model, path)
}

#[test]
fn save_then_load_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (model, path) = saved(dir.path());
    let loaded = weights::load(&path, Some(&tiny()), &cpu()).unwrap();
    assert_eq!(
        weights::named_tensors(&model),
        weights::named_tensors(&loaded)
    );
    // And saving again gives the same bytes.
    let again = dir.path().join("again.safetensors");
    weights::save(&loaded, &again).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

fn rewrite(tensors: &mut [NamedTensor], f: impl Fn(&mut NamedTensor)) -> Vec<u8> {
    for t in tensors.iter_mut() {
        f(t);
    }
    weights::to_bytes(&tiny(), tensors).unwrap()
}

fn expect_weights_error(bytes: &[u8], needle: &str) {
    match weights::parse(bytes, Some(&tiny())) {
        Err(Error::Weights(msg)) => assert!(
            msg.contains(needle),
            "error {msg:?} should mention {needle:?}"
        ),
        Err(other) => panic!("expected a weights error mentioning {needle:?}, got {other}"),
        Ok(_) => panic!("accepted bad weights (expected {needle:?})"),
    }
}

#[test]
fn corrupt_or_mismatched_weights_are_rejected_with_the_tensor_named() {
    let model = Gpt::init(&tiny(), 5, &cpu());
    let good = weights::named_tensors(&model);

    // NaN and Inf values.
    let mut t = good.clone();
    let b = rewrite(&mut t, |t| {
        if t.name == "h.1.mlp.c_fc.weight" {
            t.values[17] = f32::NAN;
        }
    });
    expect_weights_error(&b, "h.1.mlp.c_fc.weight");
    let mut t = good.clone();
    let b = rewrite(&mut t, |t| {
        if t.name == "ln_f.bias" {
            t.values[0] = f32::INFINITY;
        }
    });
    expect_weights_error(&b, "ln_f.bias");

    // A missing tensor, an extra tensor, a wrong shape.
    let mut t: Vec<NamedTensor> = good
        .iter()
        .filter(|t| t.name != "h.0.attn.c_proj.bias")
        .cloned()
        .collect();
    let b = weights::to_bytes(&tiny(), &t).unwrap();
    expect_weights_error(&b, "h.0.attn.c_proj.bias");
    t = good.clone();
    t.push(NamedTensor {
        name: "h.9.extra".into(),
        shape: vec![1],
        values: vec![0.0],
    });
    expect_weights_error(&weights::to_bytes(&tiny(), &t).unwrap(), "h.9.extra");
    let mut t = good.clone();
    let b = rewrite(&mut t, |t| {
        if t.name == "wpe.weight" {
            t.shape = vec![t.shape[1], t.shape[0]];
        }
    });
    expect_weights_error(&b, "wpe.weight");

    // A different architecture than the forest's.
    let small_bytes = weights::to_bytes(&Preset::Tiny.config(), &good).unwrap();
    let mut other = tiny();
    other.n_layers += 1;
    assert!(
        matches!(weights::parse(&small_bytes, Some(&other)), Err(Error::Weights(m)) if m.contains("architecture mismatch"))
    );

    // Truncated files and random bytes.
    let bytes = weights::to_bytes(&tiny(), &good).unwrap();
    for cut in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            weights::parse(&bytes[..cut], Some(&tiny())).is_err(),
            "accepted a file cut at {cut}"
        );
    }
    let mut flipped = bytes.clone();
    flipped[3] ^= 0xff; // header length
    assert!(weights::parse(&flipped, Some(&tiny())).is_err());
    assert!(weights::parse(b"\x08\0\0\0\0\0\0\0{\"a\":1}", None).is_err());
}

#[test]
fn a_wrong_dtype_is_rejected() {
    use safetensors::tensor::{Dtype, TensorView};
    let raw = vec![0u8; 8];
    let view = TensorView::new(Dtype::F64, vec![1], &raw).unwrap();
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        "btm.config".to_string(),
        serde_json::to_string(&tiny()).unwrap(),
    );
    let bytes =
        safetensors::tensor::serialize([("transformer.wte.weight", view)], Some(meta)).unwrap();
    expect_weights_error(&bytes, "dtype");
}

#[test]
fn export_hf_writes_a_gpt2_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt::init(&tiny(), 5, &cpu());
    weights::export_hf(&model, Some(b"{}"), dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(cfg["n_layer"], tiny().n_layers);
    assert_eq!(cfg["activation_function"], "gelu_new");
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    assert!(names.contains(&"transformer.h.0.attn.c_attn.weight".to_string()));
    assert_eq!(
        st.tensor("transformer.h.0.attn.c_attn.weight")
            .unwrap()
            .shape(),
        &[tiny().d_model, 3 * tiny().d_model]
    );
    assert!(
        !names.iter().any(|n| n.starts_with("lm_head")),
        "the head is tied to wte"
    );
}

#[test]
fn expected_size_is_the_size_save_writes() {
    for config in [tiny(), Preset::Tiny.config(), Preset::Small.config()] {
        let model = Gpt::init(&config, 1, &cpu());
        let bytes = weights::to_bytes(&config, &weights::named_tensors(&model)).unwrap();
        assert_eq!(
            weights::expected_size(&config).unwrap(),
            bytes.len() as u64,
            "{config:?}"
        );
    }
}
