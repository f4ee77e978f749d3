//! btm-registry
