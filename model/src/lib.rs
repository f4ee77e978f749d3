//! btm-model
