//! Names of the files a model, a run and a forest are made of, in one place.

/// A model's weights (safetensors, see `specs/model-formats.md`), in a model or run directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// A model's tokenizer (`tokenizers` JSON), beside its weights.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// A training run's checkpoint: weights, Adam moments and training state.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// A forest's manifest (`specs/forest.md`).
pub const MANIFEST_FILE: &str = "forest.json";
/// The Hugging Face `config.json` of an exported model.
pub const HF_CONFIG_FILE: &str = "config.json";
/// The marker of a finished experiment run (its content id, cost and losses).
pub const TRAINED_FILE: &str = "trained.json";
