//! The checks the heavy targets run: the same file btm-net's corpus replay test includes.

#[path = "../../checks/net.rs"]
pub mod net;
