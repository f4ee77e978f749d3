//! btm-net
