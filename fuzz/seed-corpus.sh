#!/bin/sh
# Seeds each fuzz target's corpus with the checked-in test vectors (valid and invalid).
set -eu
cd "$(dirname "$0")"
for t in decode_root decode_registry decode_seed decode_claim decode_elm decode_attestation decode_envelope accept_registry; do
    mkdir -p "corpus/$t"
    for f in ../specs/test-vectors/*.hex; do
        xxd -r -p "$f" > "corpus/$t/$(basename "$f" .hex)"
    done
done
