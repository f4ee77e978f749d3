//! Any bytes as JSONL/zstd validation data and corpus files: a typed error or a value that meets the checks of
//! `fuzz/checks/net.rs`; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| btm_fuzz_heavy::net::documents(data));
