//! Integration tests of btm-protocol, one binary.

mod fixtures;
mod malformed;
mod roundtrip;
mod signatures;
mod vectors;
