//! Any bytes as a signed envelope of every kind: a typed error, or an envelope that re-encodes
//! to the input and whose signature checks return (true or false) without panicking.
#![no_main]

use btm_protocol::{Attestation, Claim, ElmRecord, Record, Registry, Root, SeedManifest, Signed, envelope_kind};
use libfuzzer_sys::fuzz_target;

fn check<R: Record>(data: &[u8]) {
    if let Ok(env) = Signed::<R>::decode(data) {
        assert_eq!(env.encode(), data);
        assert_eq!(R::decode(env.body()).map(|r| r.encode()).ok().as_deref(), Some(env.body()));
        for sig in env.signatures() {
            let _ = env.verifies(sig);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = envelope_kind(data);
    check::<Root>(data);
    check::<Registry>(data);
    check::<SeedManifest>(data);
    check::<Claim>(data);
    check::<ElmRecord>(data);
    check::<Attestation>(data);
});
