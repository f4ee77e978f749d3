use btm_model::eval::{self, EvalResult};
use btm_model::{Gpt, data};
use burn::tensor::{Int, Tensor, TensorData};

use crate::common::{assert_close, corpus, cpu, tiny, tokenizer};

/// log-softmax computed in f64 from raw logits.
fn brute_logprob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target] as f64 - max - z.ln()
}

#[test]
fn perplexity_equals_a_brute_force_computation() {
    let mut cfg = tiny();
    cfg.n_ctx = 16;
    let model = Gpt::init(&cfg, 11, &cpu());
    let tokens: Vec<u32> = (0..40u32)
        .map(|i| (i * 131 + 7) % cfg.vocab_size as u32)
        .collect();
    // Brute force: run each block separately and score every target in f64.
    let mut lps = Vec::new();
    for (s, l) in eval::blocks(tokens.len(), cfg.n_ctx) {
        let x: Vec<i64> = tokens[s..s + l - 1].iter().map(|&t| t as i64).collect();
        let x: Tensor<2, Int> = Tensor::from_data(TensorData::new(x, [1, l - 1]), &cpu());
        let logits = model
            .forward(x)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        let v = cfg.vocab_size;
        for i in 0..l - 1 {
            lps.push(brute_logprob(
                &logits[i * v..(i + 1) * v],
                tokens[s + i + 1] as usize,
            ));
        }
    }
    assert_eq!(
        lps.len(),
        tokens.len() - 1,
        "every token but the first is scored once"
    );
    let brute_ppl = (-lps.iter().sum::<f64>() / lps.len() as f64).exp();
    let got = eval::evaluate(&model, None, &tokens, 2, &cpu()).unwrap();
    assert_eq!(got.tokens, 39);
    assert_close(got.perplexity, brute_ppl, 1e-5, "perplexity");
    let lp = eval::token_logprobs(&model, &tokens, 3, &cpu()).unwrap();
    for (a, b) in lp.iter().zip(&lps) {
        assert_close(*a, *b, 1e-4, "per-token log-probability");
    }
}

#[test]
fn bits_per_byte_counts_the_bytes_of_the_text() {
    let tok = tokenizer();
    let docs = corpus()
        .documents("novels_austen", data::Split::Valid)
        .unwrap();
    let (tokens, bytes) = data::tokenize_documents(tok, &docs[..1], None).unwrap();
    let lp = vec![-1.0; tokens.len() - 1];
    let r = EvalResult::from_logprobs(&lp, &tokens[1..], Some(tok));
    // The scored bytes are all bytes but those of the first token.
    assert_eq!(r.bytes, bytes - tok.token_bytes(tokens[0]) as u64);
    assert_close(
        r.bits_per_byte,
        (tokens.len() - 1) as f64 / std::f64::consts::LN_2 / r.bytes as f64,
        1e-12,
        "bpb",
    );
    assert_close(r.perplexity, std::f64::consts::E, 1e-12, "ppl");
}

#[test]
fn out_of_vocabulary_tokens_are_an_error() {
    let model = Gpt::init(&tiny(), 1, &cpu());
    assert!(eval::evaluate(&model, None, &[1, 2, 99_999], 1, &cpu()).is_err());
    assert!(eval::evaluate(&model, None, &[1], 1, &cpu()).is_err());
}
