//! Integration tests of btm-roles: the roles in one process over loopback. One binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]
