#!/bin/sh
# Seeds the fuzz corpora.
#  - decode_*, accept_registry: the checked-in protocol test vectors (valid and invalid),
#    generated here and not committed.
#  - weights, addr_record, record_key, documents, forest_manifest: committed under corpus/;
#    this rewrites them with the real writers (ignored tests of the main workspace). Run it
#    from a checkout whose main workspace builds; set CARGO_TARGET_DIR as you build it.
set -eu
cd "$(dirname "$0")"
for t in decode_root decode_registry decode_seed decode_claim decode_elm decode_attestation decode_envelope accept_registry; do
    mkdir -p "corpus/$t"
    for f in ../specs/test-vectors/*.hex; do
        xxd -r -p "$f" > "corpus/$t/$(basename "$f" .hex)"
    done
done
if [ "${1:-}" = "--rewrite" ]; then
    # The main workspace's usual package selection and features, so nothing is rebuilt.
    (cd .. && cargo test --workspace --features btm-model/wgpu --test main -- --ignored _seed_corpus)
fi
