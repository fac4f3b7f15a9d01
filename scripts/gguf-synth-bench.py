#!/usr/bin/env python3
"""A random-weight GGUF of Qwen2-7B shapes (or Llama 3 70B shapes) in one block type, for
speed measurements of the GGUF path (`layer-streamer bench` / `bench-generate`).

  python3 scripts/gguf-synth-bench.py OUT.gguf --type q8_0|q4_k|q6_k [--preset 7b|70b]

Needs numpy and the `gguf` package. Blocks are random bytes with finite, small f16
scales, so every value is finite; the weights mean nothing, the bytes and shapes are
those of a real file of that type. No tokenizer: use token ids.
"""
import argparse

import numpy as np
import gguf

PRESETS = {
    # arch, hidden, intermediate, layers, heads, kv_heads, vocab
    "7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064),
    "70b": ("llama", 8192, 28672, 80, 64, 8, 128256),
}
# type: (ggml type, elements per block, bytes per block, byte offsets of f16 scales)
TYPES = {
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, 32, 34, [0]),
    "q4_k": (gguf.GGMLQuantizationType.Q4_K, 256, 144, [0, 2]),
    "q6_k": (gguf.GGMLQuantizationType.Q6_K, 256, 210, [208]),
}


def blocks(rng, rows, cols, ty):
    qt, be, bb, scales = TYPES[ty]
    n = rows * cols // be
    b = rng.integers(0, 256, size=(n, bb), dtype=np.uint8)
    if ty == "q6_k":  # int8 sub-block scales: keep them small
        b[:, 192:208] = rng.integers(-8, 8, size=(n, 16), dtype=np.int8).view(np.uint8)
    for off in scales:
        d = (rng.random(n, dtype=np.float32) * 1e-3 + 1e-4).astype(np.float16)
        b[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
    return b.reshape(rows, cols // be * bb), qt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--type", default="q4_k", choices=sorted(TYPES))
    ap.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    a = ap.parse_args()
    arch, h, inter, L, H, KV, V = PRESETS[a.preset]
    hd = h // H
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(a.out, arch)
    w.add_block_count(L); w.add_context_length(32768); w.add_embedding_length(h)
    w.add_feed_forward_length(inter); w.add_head_count(H); w.add_head_count_kv(KV)
    w.add_rope_freq_base(1e6); w.add_layer_norm_rms_eps(1e-6); w.add_vocab_size(V)

    def q(name, rows, cols):
        arr, qt = blocks(rng, rows, cols, a.type)
        w.add_tensor(name, arr, raw_dtype=qt)

    def f32(name, n, one=True):
        v = (1.0 + 0.1 * rng.standard_normal(n)) if one else np.zeros(n)
        w.add_tensor(name, v.astype(np.float32))

    q("token_embd.weight", V, h); f32("output_norm.weight", h); q("output.weight", V, h)
    for i in range(L):
        p = f"blk.{i}."
        f32(p + "attn_norm.weight", h); f32(p + "ffn_norm.weight", h)
        q(p + "attn_q.weight", h, h); q(p + "attn_k.weight", KV * hd, h)
        q(p + "attn_v.weight", KV * hd, h); q(p + "attn_output.weight", h, h)
        if arch == "qwen2":
            for t, n in (("q", h), ("k", KV * hd), ("v", KV * hd)):
                f32(p + f"attn_{t}.bias", n, one=False)
        q(p + "ffn_gate.weight", inter, h); q(p + "ffn_up.weight", inter, h)
        q(p + "ffn_down.weight", h, inter)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    print("wrote", a.out)


if __name__ == "__main__":
    main()
