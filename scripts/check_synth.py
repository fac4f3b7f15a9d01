#!/usr/bin/env python3
"""Checks a model directory written by `layer-streamer synth` with the Python
reference libraries: the tokenizer loads with `tokenizers` and round-trips
text, the chat template renders with jinja2, every shard loads with
`safetensors` and matches the index, and the weights have the intended
statistics.

Usage: python3 scripts/check_synth.py DIR [--tokenizer-only]   (needs: pip install tokenizers jinja2 safetensors numpy)
"""
import json
import os
import sys

import jinja2
import numpy as np
from safetensors import deserialize
from tokenizers import Tokenizer


def to_f32(v):
    """A deserialised entry as a float32 array (bf16 widened by hand: numpy has no bf16)."""
    raw = np.frombuffer(v["data"], dtype=np.uint8)
    if v["dtype"].upper() in ("BF16", "BFLOAT16"):
        a = (raw.view("<u2").astype(np.uint32) << 16).view("<f4")
    elif v["dtype"].upper() in ("F16", "FLOAT16"):
        a = raw.view("<f2").astype(np.float32)
    else:
        a = raw.view("<f4")
    return a.reshape(v["shape"])


def main(d, tokenizer_only=False):
    cfg = json.load(open(os.path.join(d, "config.json")))
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) <= cfg["vocab_size"], "vocab too large"
    sample = "Hello, wörld! The quick brown fox — 123 \t\n 你好 🙂"
    enc = tok.encode(sample, add_special_tokens=False)
    assert tok.decode(enc.ids) == sample, (tok.decode(enc.ids), sample)
    assert max(enc.ids) < cfg["vocab_size"]
    tc = json.load(open(os.path.join(d, "tokenizer_config.json")))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    env = jinja2.Environment()
    text = env.from_string(tc["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token=tc.get("bos_token") or "")
    ids = tok.encode(text, add_special_tokens=False).ids
    specials = {t["content"]: t["id"] for t in json.load(open(os.path.join(d, "tokenizer.json")))["added_tokens"]}
    assert all(i < cfg["vocab_size"] for i in specials.values())
    assert any(i in specials.values() for i in ids), "chat template produced no special tokens"
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert cfg["eos_token_id"] in specials.values() and cfg["bos_token_id"] in specials.values()

    if tc.get("bos_token") == "<|begin_of_text|>":
        assert tok.encode("hi").ids[0] == specials["<|begin_of_text|>"], "post-processor adds no bos"
    if tokenizer_only:
        print(json.dumps({"vocab": tok.get_vocab_size(), "chat_ids": len(ids)}))
        return
    idx_path = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx_path):
        wm = json.load(open(idx_path))["weight_map"]
        shards = sorted(set(wm.values()))
    else:
        wm, shards = None, ["model.safetensors"]
    tensors = {}
    for s in shards:
        with open(os.path.join(d, s), "rb") as f:
            entries = deserialize(f.read())
        for k, v in entries:
            if wm is not None:
                assert wm[k] == s, (k, s)
            tensors[k] = to_f32(v)
    if wm is not None:
        assert set(wm) == set(tensors)
    h = cfg["hidden_size"]
    assert tensors["model.embed_tokens.weight"].shape == (cfg["vocab_size"], h)
    assert ("lm_head.weight" in tensors) != cfg["tie_word_embeddings"]
    stats = {}
    for k, v in tensors.items():
        if v.ndim == 1:
            assert abs(v.mean() - 1.0) < 0.05 and abs(v.std() - 0.1) < 0.05, (k, v.mean(), v.std())
        else:
            want = 1.0 / np.sqrt(v.shape[-1])
            assert abs(v.mean()) < 0.05 * want + 1e-3 and abs(v.std() / want - 1) < 0.05, (k, v.mean(), v.std(), want)
        stats[k] = float(v.std())
    print(json.dumps({"tensors": len(tensors), "shards": len(shards), "chat": text,
                      "ids": ids[:12], "sample_tokens": len(enc.ids)}, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1], "--tokenizer-only" in sys.argv[2:])
