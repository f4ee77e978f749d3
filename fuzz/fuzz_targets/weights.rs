//! Any bytes as a weights file (`btm_protocol::weights`): a typed error, or borrowed views of
//! exactly the tensors the architecture implies, all finite, re-encoding to `expected_size`
//! bytes that parse to the same values; never a panic. Burn-free: depends on btm-protocol only.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| btm_protocol::fuzzing::weights(data));
