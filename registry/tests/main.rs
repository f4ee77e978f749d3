//! Integration tests of btm-registry, one binary.

mod common;
mod crash;
mod maintainer;
mod rotation;
mod store;
mod threats;
