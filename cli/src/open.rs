//! Opening the forests that commands name on the command line: a forest directory or its
//! `forest.json`, with its tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use btm_model::forest::{Forest, manifest};
use btm_model::tokenizer::Tokenizer;

fn manifest_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join(manifest::MANIFEST_FILE)
    } else {
        p.to_path_buf()
    }
}

/// Opens a forest; the error names the file once (the model's error carries it) and, when
/// there is none, how to make one.
pub(crate) fn open(p: &Path) -> Result<Forest> {
    let path = manifest_path(p);
    Forest::open(&path).map_err(|e| match &e {
        btm_model::forest::Error::Model(btm_model::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            anyhow::anyhow!(
                "opening the forest: {e}; make one with `btm-node forest create --dir DIR \
                 --tokenizer FILE --seed MODEL` or fetch one with `btm-node fetch --out DIR`"
            )
        }
        _ => anyhow::Error::new(e).context("opening the forest"),
    })
}

pub(crate) fn tokenizer_of(forest: &Forest) -> Result<Tokenizer> {
    Ok(Tokenizer::load(&forest.resolve(&forest.tokenizer))?)
}

/// Opens a forest that has at least one ELM, with its tokenizer.
pub(crate) fn open_with_elms(p: &Path) -> Result<(Forest, Tokenizer)> {
    let forest = open(p)?;
    if forest.elms.is_empty() {
        bail!("the forest has no ELMs");
    }
    let tok = tokenizer_of(&forest)?;
    Ok((forest, tok))
}
