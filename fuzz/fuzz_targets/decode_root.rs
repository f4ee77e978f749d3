//! Any bytes: a typed error or a record whose encoding is exactly the input; never a panic.
#![no_main]

use btm_protocol::{Root, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Root::decode(data) {
        assert_eq!(record.encode(), data, "decoded input must be canonical");
        let _ = record.validate();
    }
});
