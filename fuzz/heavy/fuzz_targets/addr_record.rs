//! Any bytes as btm-net address records (`AddrRecord::decode`): a typed error or a value that meets the checks of
//! `btm_net::fuzzing`; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| btm_net::fuzzing::addr_record(data));
