//! `Parent::from_weights`: float averaging weights to a parent list that always decodes.

use btm_protocol::*;
use proptest::prelude::*;

use crate::fixtures;

/// An ELM record with these parents, through the real encode/decode path (signed envelope).
fn decoded(parents: Vec<Parent>) -> Result<ElmRecord, DecodeError> {
    let elm = ElmRecord {
        parents,
        ..fixtures::elm()
    };
    let bytes = fixtures::signed(elm, &[3]).encode();
    Signed::<ElmRecord>::decode(&bytes).map(Signed::into_record)
}

/// The exact share of each weight, in ppm (scaled by the largest weight first, as a caller
/// with huge weights would need).
fn exact_ppm(weights: &[f64]) -> Vec<f64> {
    let max = weights.iter().copied().fold(0.0, f64::max);
    let scaled: Vec<f64> = weights.iter().map(|w| w / max).collect();
    let total: f64 = scaled.iter().sum();
    scaled.iter().map(|w| w / total * 1e6).collect()
}

fn ids(n: usize) -> Vec<ContentId> {
    (0..n)
        .map(|i| fixtures::id(&format!("parent {i}")))
        .collect()
}

#[test]
fn three_thirds_in_forest_order_decode() {
    // The volunteer's case: several parents in forest order, shares that do not round to a
    // sum of 1 000 000 (3 x 333 333).
    let mut ids = ids(3);
    ids.sort();
    ids.reverse();
    let input: Vec<(ContentId, f64)> = ids.iter().map(|id| (*id, 1.0 / 3.0)).collect();
    let parents = Parent::from_weights(&input).unwrap();
    let back = decoded(parents.clone()).unwrap();
    assert_eq!(back.parents, parents);
    assert!(parents.windows(2).all(|w| w[0].weights < w[1].weights));
    let mut ppm: Vec<u32> = parents.iter().map(|p| p.weight_ppm).collect();
    ppm.sort();
    assert_eq!(ppm, [333_333, 333_333, 333_334]);
}

#[test]
fn one_parent_takes_everything() {
    let id = fixtures::id("seed weights");
    for w in [1.0, 0.25, 1e-300, 5e-324, f64::MAX] {
        let parents = Parent::from_weights(&[(id, w)]).unwrap();
        assert_eq!(
            parents,
            [Parent {
                weights: id,
                weight_ppm: PPM_ONE
            }],
            "weight {w}"
        );
    }
}

#[test]
fn huge_weights_do_not_overflow() {
    let ids = ids(2);
    let parents = Parent::from_weights(&[(ids[0], f64::MAX), (ids[1], f64::MAX)]).unwrap();
    assert!(parents.iter().all(|p| p.weight_ppm == 500_000));
}

#[test]
fn duplicate_ids_merge() {
    let ids = ids(2);
    let parents = Parent::from_weights(&[(ids[0], 0.25), (ids[1], 0.5), (ids[0], 0.25)]).unwrap();
    assert_eq!(parents.len(), 2);
    assert!(parents.iter().all(|p| p.weight_ppm == 500_000));
    decoded(parents).unwrap();
}

#[test]
fn zero_weights_stay_parents_with_zero_ppm() {
    let ids = ids(3);
    let parents = Parent::from_weights(&[(ids[0], 0.0), (ids[1], 2.0), (ids[2], 6.0)]).unwrap();
    let ppm_of = |id| {
        parents
            .iter()
            .find(|p| p.weights == id)
            .map(|p| p.weight_ppm)
    };
    assert_eq!(ppm_of(ids[0]), Some(0));
    assert_eq!(ppm_of(ids[1]), Some(250_000));
    assert_eq!(ppm_of(ids[2]), Some(750_000));
    decoded(parents).unwrap();
}

#[test]
fn refused_inputs() {
    let ids = ids(MAX_PARENTS + 1);
    assert_eq!(Parent::from_weights(&[]), Err(ParentWeightsError::Empty));
    assert_eq!(
        Parent::from_weights(&[(ids[0], 0.0), (ids[1], 0.0)]),
        Err(ParentWeightsError::AllZero)
    );
    assert_eq!(
        Parent::from_weights(&[(ids[0], 0.0), (ids[1], -0.0)]),
        Err(ParentWeightsError::AllZero)
    );
    for bad in [-1.0, -1e-300, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let r = Parent::from_weights(&[(ids[0], 1.0), (ids[1], bad)]);
        assert!(
            matches!(r, Err(ParentWeightsError::BadWeight { weights, .. }) if weights == ids[1]),
            "weight {bad}: {r:?}"
        );
    }
    let too_many: Vec<(ContentId, f64)> = ids.iter().map(|id| (*id, 1.0)).collect();
    assert_eq!(
        Parent::from_weights(&too_many),
        Err(ParentWeightsError::TooMany {
            count: MAX_PARENTS + 1,
            max: MAX_PARENTS
        })
    );
    // MAX_PARENTS of them are fine, and so are more entries that merge to MAX_PARENTS ids.
    let mut at_most = too_many[..MAX_PARENTS].to_vec();
    at_most.push(at_most[0]);
    decoded(Parent::from_weights(&at_most).unwrap()).unwrap();
}

fn weight() -> impl Strategy<Value = f64> {
    prop_oneof![
        1e-3f64..1e3,
        Just(1.0),
        prop::num::f64::POSITIVE | prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL,
    ]
    .prop_filter("positive and finite", |w| w.is_finite() && *w > 0.0)
}

/// 1 to 64 positive finite weights with distinct ids, in any order.
fn weights() -> impl Strategy<Value = Vec<(ContentId, f64)>> {
    prop::collection::btree_map(
        any::<[u8; 32]>().prop_map(ContentId),
        weight(),
        1..=MAX_PARENTS,
    )
    .prop_map(|m| m.into_iter().collect::<Vec<_>>())
    .prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_positive_weights_decode(input in weights()) {
        let parents = Parent::from_weights(&input).unwrap();
        let back = decoded(parents.clone()).unwrap();
        prop_assert_eq!(&back.parents, &parents);
        prop_assert_eq!(parents.len(), input.len());
        let exact = exact_ppm(&input.iter().map(|(_, w)| *w).collect::<Vec<_>>());
        for ((id, _), exact) in input.iter().zip(exact) {
            let p = parents.iter().find(|p| p.weights == *id).unwrap();
            prop_assert!(
                (f64::from(p.weight_ppm) - exact).abs() < 1.0 + 1e-6,
                "{} ppm for an exact share of {} ppm", p.weight_ppm, exact
            );
        }
    }
}
