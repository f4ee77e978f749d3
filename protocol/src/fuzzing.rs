//! Fuzz checks: each feeds arbitrary bytes to a decoder and asserts its invariants, panicking
//! when one breaks. The cargo-fuzz targets in `fuzz/` call these, and the corpus replay test
//! (`tests/fuzz_replay.rs`) runs every committed corpus file through them. Not a stable API.

use crate::weights::{self, Config};

/// Whether `inner` lies inside `outer` (a view, not a copy).
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let o = outer.as_ptr_range();
    let i = inner.as_ptr_range();
    inner.is_empty() || (o.start <= i.start && i.end <= o.end)
}

/// [`weights::parse`], [`weights::parse_raw`] and [`weights::read_config`] on `data`: no panic;
/// views borrow the input and hold exactly their shape's values; a parsed file's tensors are
/// those its architecture implies, all finite; re-encoding it gives a file of
/// [`weights::expected_size`] bytes that parses to the same values.
pub fn weights(data: &[u8]) {
    if let Ok(raw) = weights::parse_raw(data) {
        for t in raw.model.iter().chain(&raw.other) {
            assert!(within(data, t.data), "tensor {} was copied", t.name);
            let want = t.shape.iter().try_fold(4usize, |a, &n| a.checked_mul(n));
            assert_eq!(want, Some(t.data.len()), "tensor {} size", t.name);
        }
    }
    let parsed = weights::parse(data, None);
    let config = weights::read_config(data);
    let Ok(w) = parsed else {
        return;
    };
    assert_eq!(config, Ok(w.config), "read_config disagrees with parse");
    assert!(w.config.validate().is_ok());
    let expected = weights::expected_tensors(&w.config);
    assert_eq!(expected.len(), w.tensors.len());
    let mut total = 0usize;
    for ((name, shape), t) in expected.iter().zip(&w.tensors) {
        assert_eq!((name, shape), (&t.name, &t.shape));
        assert!(within(data, t.data), "tensor {name} was copied");
        assert_eq!(t.len(), shape.iter().product::<usize>());
        assert!(t.values().all(f32::is_finite));
        total += t.data.len();
    }
    assert!(total <= data.len());
    assert_eq!(weights::parse(data, Some(&w.config)).as_ref(), Ok(&w));

    let values: Vec<Vec<f32>> = w.tensors.iter().map(|t| t.to_vec()).collect();
    let bytes = match weights::to_bytes(
        &w.config,
        w.tensors
            .iter()
            .zip(&values)
            .map(|(t, v)| (t.name.as_str(), t.shape.as_slice(), v.as_slice())),
    ) {
        Ok(b) => b,
        Err(e) => panic!("a parsed file does not re-encode: {e}"),
    };
    assert_eq!(weights::expected_size(&w.config), Ok(bytes.len() as u64));
    match weights::parse(&bytes, Some(&w.config)) {
        Ok(again) => {
            assert_eq!(again.config, w.config);
            for (a, b) in again.tensors.iter().zip(&w.tensors) {
                assert_eq!(a.data, b.data, "tensor {} changed in re-encoding", a.name);
            }
        }
        Err(e) => panic!("a re-encoded file does not parse: {e}"),
    }
}

/// A weights file of `config`'s architecture whose `i`-th value in every tensor is `value(i)`:
/// the fixture of the weights tests and of the seed corpus.
pub fn weights_file(config: &Config, value: impl Fn(usize) -> f32) -> Vec<u8> {
    let shapes = weights::expected_tensors(config);
    let values: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, s)| (0..s.iter().product()).map(&value).collect())
        .collect();
    match weights::to_bytes(
        config,
        shapes
            .iter()
            .zip(&values)
            .map(|((n, s), v)| (n.as_str(), s.as_slice(), v.as_slice())),
    ) {
        Ok(b) => b,
        Err(e) => panic!("{config:?} does not encode: {e}"),
    }
}
