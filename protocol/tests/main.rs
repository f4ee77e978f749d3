//! Integration tests of btm-protocol, one binary.

// Tests may panic on failure: that is how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixtures;
mod fuzz_replay;
mod malformed;
mod parents;
mod roundtrip;
mod signatures;
mod vectors;
