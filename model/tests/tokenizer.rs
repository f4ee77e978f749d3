use btm_model::data::{EVAL_DOMAINS, Split, TRAIN_DOMAINS};
use btm_model::tokenizer::{EOT_ID, Tokenizer};

use crate::common::{corpus, tokenizer};

#[test]
fn round_trip_is_lossless_on_every_domain() {
    let tok = tokenizer();
    for domain in TRAIN_DOMAINS.iter().chain(EVAL_DOMAINS.iter()) {
        let docs = corpus().documents(domain, Split::Valid).unwrap();
        assert!(!docs.is_empty(), "{domain} has no documents");
        for d in docs.iter().take(40) {
            let ids = tok.encode(&d.text).unwrap();
            assert!(!ids.contains(&EOT_ID) || d.text.contains("<|endoftext|>"));
            assert_eq!(
                tok.decode(&ids).unwrap(),
                d.text,
                "{domain}/{} does not round-trip",
                d.id
            );
        }
    }
}

#[test]
fn odd_text_round_trips_too() {
    let tok = tokenizer();
    for text in [
        "",
        " ",
        "  leading spaces",
        "tabs\tand\nnewlines\n\n",
        "émigré naïve 日本語 🦀",
        "\u{0}\u{7f}",
    ] {
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }
}

#[test]
fn the_tokenizer_is_deterministic_and_its_bytes_are_its_identity() {
    let a = tokenizer();
    let b = btm_model::data::seed_mix_tokenizer(&corpus(), 2048, 64 << 10).unwrap();
    assert_eq!(
        a.json(),
        b.json(),
        "training twice on the same data must give the same file"
    );
    assert_eq!(a.id(), b.id());
    assert_eq!(a.vocab_size(), 2048);
    let reloaded = Tokenizer::from_bytes(a.json()).unwrap();
    assert_eq!(reloaded.id(), a.id());
}

#[test]
fn garbage_tokenizer_files_are_rejected() {
    assert!(Tokenizer::from_bytes(b"not json").is_err());
    assert!(Tokenizer::from_bytes(b"{}").is_err());
    assert!(tokenizer().decode(&[999_999]).is_err());
}
