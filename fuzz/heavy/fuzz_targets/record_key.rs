//! Any bytes as Kademlia record and provider keys and gossipsub topics: a typed error or a value that meets the checks of
//! `fuzz/checks/net.rs`; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| btm_fuzz_heavy::net::record_key(data));
