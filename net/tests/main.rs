//! Integration tests of btm-net: real libp2p swarms and iroh endpoints on loopback, several
//! nodes in one process. One binary (`autotests = false`), so the link happens once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod adversarial;
mod common;
mod fuzz_replay;
mod multi_node;
mod netns;
