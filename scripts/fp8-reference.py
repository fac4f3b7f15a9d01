#!/usr/bin/env python3
"""An FP8 checkpoint that Hugging Face transformers writes itself, and reference
logits for it, for tests/fp8_reference.rs (LS_FP8_FIXTURE=OUT).

Runs on the GPU machine (transformers' fine-grained FP8 quantization needs a
CUDA device), where python3 has torch and transformers:

  python3 scripts/fp8-reference.py OUT [--arch llama|qwen2] [--seed 0] [--steps 16]

1. A tiny random Llama or Qwen2 model (seeded) in bf16, saved to OUT/bf16.
2. Loaded with FineGrainedFP8Config (E4M3 weights, 128x128 weight_scale_inv
   blocks) and saved again with save_pretrained to OUT/model: the checkpoint
   under test, as transformers writes it.
3. The saved FP8 tensors dequantized to float32 here (code * scale, each
   scale repeated over its 128x128 block), loaded into a float32 model of the
   same config, and run on a seeded prompt and --steps greedy steps with the
   KV cache, so the logits are the exact function of the files. Writes, like
   scripts/gguf-reference.py:

  OUT/reference.json        prompt_ids, greedy_ids, vocab, logits_shape
  OUT/reference_logits.f32  float32 little-endian, [1 + steps, vocab]
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config,
                          LlamaConfig, Qwen2Config)

BLOCK = 128


def tiny_config(arch):
    common = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                  max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        return Qwen2Config(rope_theta=1_000_000.0, **common)
    return LlamaConfig(rope_theta=500_000.0, head_dim=64, **common)


def dequantized_state(model_dir):
    """float32 state dict of the saved FP8 checkpoint, scales applied."""
    sd = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(model_dir, name)))
    out = {}
    for k, v in sd.items():
        if k.endswith("_scale_inv"):
            continue
        scale = sd.get(k + "_scale_inv")
        if scale is None:
            out[k] = v.float()
            continue
        rows, cols = v.shape
        s = scale.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        out[k] = v.float() * s[:rows, :cols]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    bf16_dir, fp8_dir = os.path.join(args.out, "bf16"), os.path.join(args.out, "model")
    for d in (bf16_dir, fp8_dir):
        shutil.rmtree(d, ignore_errors=True)
    cfg = tiny_config(args.arch)
    AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).save_pretrained(bf16_dir)
    quantized = AutoModelForCausalLM.from_pretrained(
        bf16_dir, quantization_config=FineGrainedFP8Config(), device_map="cuda")
    quantized.save_pretrained(fp8_dir)
    del quantized

    ref_cfg = AutoConfig.from_pretrained(bf16_dir)
    model = AutoModelForCausalLM.from_config(ref_cfg, torch_dtype=torch.float32)
    model.load_state_dict(dequantized_state(fp8_dir), strict=True)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen)
    rows, greedy = [], []
    with torch.no_grad():
        out = model(prompt.to(dev), use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1].float().cpu())
        for _ in range(args.steps):
            nxt = int(rows[-1].argmax())
            greedy.append(nxt)
            out = model(torch.tensor([[nxt]], device=dev), past_key_values=past, use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0, -1].float().cpu())

    logits = torch.stack(rows).contiguous()
    logits.numpy().astype("<f4").tofile(os.path.join(args.out, "reference_logits.f32"))
    qc = json.load(open(os.path.join(fp8_dir, "config.json"))).get("quantization_config")
    meta = dict(
        arch=args.arch,
        seed=args.seed,
        prompt_ids=prompt[0].tolist(),
        greedy_ids=greedy,
        vocab=int(logits.shape[1]),
        logits_shape=list(logits.shape),
        quantization_config=qc,
        note="model/: the FP8 checkpoint transformers saved; logits of its float32 "
             "dequantization; row 0: last prompt position, row i>0: after greedy_ids[i-1]",
    )
    json.dump(meta, open(os.path.join(args.out, "reference.json"), "w"), indent=1)
    print(json.dumps({k: meta[k] for k in ("logits_shape", "quantization_config")}))


if __name__ == "__main__":
    main()
