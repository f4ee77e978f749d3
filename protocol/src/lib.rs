//! btm-protocol
