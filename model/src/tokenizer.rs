//! Byte-level BPE, trained with Hugging Face's `tokenizers` on the seed mix
//! ([`crate::data::seed_mix_tokenizer`]).
//!
//! No normaliser and no prefix space, so `decode(encode(text)) == text` for every string.
//! Token 0 is `<|endoftext|>`, placed between documents. The exact bytes of `tokenizer.json`
//! are part of a model's identity: [`Tokenizer::id`] is their BLAKE3 hash.

use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder, TokenizerImpl,
};

use crate::{Error, fsutil};

/// The end-of-text token that separates documents.
pub const EOT: &str = "<|endoftext|>";
/// Its id.
pub const EOT_ID: u32 = 0;
/// Largest tokenizer.json we accept.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

type Inner = TokenizerImpl<
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// A trained tokenizer and the bytes it was loaded from.
pub struct Tokenizer {
    inner: Inner,
    json: Vec<u8>,
    /// UTF-8 bytes each token stands for (the end-of-text token counts as 1).
    token_bytes: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("id", &self.id())
            .finish()
    }
}

impl Tokenizer {
    /// Trains a byte-level BPE of `vocab_size` tokens (including `<|endoftext|>` and the 256
    /// byte tokens) on `texts`.
    pub fn train<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
    ) -> Result<Self, Error> {
        if vocab_size < 257 + 1 {
            return Err(Error::Tokenizer(format!(
                "vocab_size {vocab_size} is too small: byte-level BPE needs at least 258"
            )));
        }
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(vec![AddedToken::from(EOT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner: Inner = TokenizerBuilder::new()
            .with_model(BPE::default().into())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, false, true).into()))
            .with_post_processor(None)
            .with_decoder(Some(ByteLevel::new(false, false, true).into()))
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner
            .train(&mut trainer, texts)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let json = inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Self::from_bytes(json.as_bytes())
    }

    /// Loads a tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_bytes(json: &[u8]) -> Result<Self, Error> {
        let inner: Inner = serde_json::from_slice(json)
            .map_err(|e| Error::Tokenizer(format!("not a tokenizer.json: {e}")))?;
        if inner.token_to_id(EOT) != Some(EOT_ID) {
            return Err(Error::Tokenizer(format!("{EOT} must be token {EOT_ID}")));
        }
        let n = inner.get_vocab_size(true);
        let token_bytes = (0..n as u32)
            .map(|id| match inner.id_to_token(id) {
                Some(_) if id == EOT_ID => 1,
                // Byte-level tokens are spelled with one char per byte.
                Some(t) => t.chars().count() as u32,
                None => 0,
            })
            .collect();
        Ok(Tokenizer {
            inner,
            json: json.to_vec(),
            token_bytes,
        })
    }

    /// Loads `tokenizer.json` from a file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = fsutil::read_limited(path, MAX_FILE_BYTES)?;
        Self::from_bytes(&bytes).map_err(|e| e.in_file(path))
    }

    /// Saves the exact bytes this tokenizer was loaded from.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        fsutil::write_atomic(path, &self.json)
    }

    /// The bytes of `tokenizer.json`.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// BLAKE3 content id of `tokenizer.json` (hex).
    pub fn id(&self) -> String {
        crate::content_id(&self.json)
    }

    /// Number of tokens, the end-of-text token included.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of many documents, in parallel.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, Error> {
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of token ids; the end-of-text token is kept as `<|endoftext|>`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size()) {
            return Err(Error::Tokenizer(format!("token id {bad} is out of range")));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// UTF-8 bytes that token `id` stands for (for bits per byte).
    pub fn token_bytes(&self, id: u32) -> u32 {
        self.token_bytes.get(id as usize).copied().unwrap_or(0)
    }
}
