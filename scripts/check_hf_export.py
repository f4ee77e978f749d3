#!/usr/bin/env python3
"""Checks that `btm-node export-hf` output is a working Hugging Face GPT-2 checkpoint.

Loads the exported directory with transformers.GPT2LMHeadModel, scores the same token stream
that `btm-node eval` scores (the first documents of a domain's split, <|endoftext|> after each,
non-overlapping blocks of n_ctx + 1 tokens with stride n_ctx) and compares the perplexity with
the one btm-node reports.

  btm-node export-hf --model runs/austen --out /tmp/hf-austen
  btm-node --json eval --model runs/austen --domain novels_austen --max-tokens 4096 > /tmp/btm.json
  python3 scripts/check_hf_export.py /tmp/hf-austen data/corpus/novels_austen/valid.jsonl.zst 4096 /tmp/btm.json

Needs: pip install torch transformers tokenizers zstandard
"""
import io, json, math, sys

import torch
import zstandard
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel


def main():
    out_dir, split_file, max_tokens, btm_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    model = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    tok = Tokenizer.from_file(f"{out_dir}/tokenizer.json")
    raw = open(split_file, "rb").read()
    if split_file.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    ids, budget = [], max_tokens * 8
    used = 0
    for line in raw.decode("utf-8").splitlines():
        if not line.strip():
            continue
        if used >= budget:
            break
        text = json.loads(line)["text"]
        used += len(text.encode("utf-8")) + 1
        ids.extend(tok.encode(text, add_special_tokens=False).ids)
        ids.append(0)
    ids = ids[: max_tokens + 1]
    n_ctx = model.config.n_positions
    nll, n = 0.0, 0
    start = 0
    with torch.no_grad():
        while start + 1 < len(ids):
            block = ids[start : start + n_ctx + 1]
            x = torch.tensor([block[:-1]])
            y = torch.tensor(block[1:])
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
            nll -= logp[torch.arange(len(y)), y].sum().item()
            n += len(y)
            start += n_ctx
    hf_ppl = math.exp(nll / n)
    btm = json.load(open(btm_json))
    btm_ppl = btm[0]["perplexity"]
    rel = abs(hf_ppl - btm_ppl) / btm_ppl
    print(f"tokens={n} transformers_ppl={hf_ppl:.6f} btm_ppl={btm_ppl:.6f} rel_diff={rel:.2e}")
    sys.exit(0 if rel < 1e-4 else 1)


if __name__ == "__main__":
    main()
