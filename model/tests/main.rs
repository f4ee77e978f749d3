//! Integration tests of btm-model (one binary: see STYLE.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bundle;
mod common;
mod demix;
mod eval;
mod experiment;
mod forest;
mod gpt;
mod tokenizer;
mod train;
mod weights;
#[cfg(feature = "wgpu")]
mod wgpu;
