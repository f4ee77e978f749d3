//! Integration tests of btm-roles: the maintainers' node, volunteers and a client in one
//! process, each on its own real `btm_net::Node` over loopback, training tiny models on slices of
//! the bundled corpus. One binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod roles;
