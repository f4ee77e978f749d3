//! Integration tests of btm-registry, one binary.

// Tests may panic on failure: that is how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod crash;
mod maintainer;
mod properties;
mod rotation;
mod rules;
mod store;
mod threats;
