//! Any bytes as the forest manifest (`forest.json`): a typed error or a value that meets the checks of
//! `btm_net::fuzzing`; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| btm_net::fuzzing::forest_manifest(data));
