#!/usr/bin/env python3
"""Reference logits from Hugging Face transformers for a model written by
`layer-streamer synth`, for the host-backend test (tests/models_reference.rs).

Loads MODEL_DIR in float32 on the CPU, draws a prompt of --prompt-len ids
(seeded), runs the prompt and --steps greedy steps with the KV cache, and
writes what hf_reference.py writes:

  OUT/reference.json        prompt_ids, greedy_ids, vocab, logits_shape
  OUT/reference_logits.f32  float32 little-endian [1 + steps, vocab]

The checked-in fixtures were made with (torch 2.x CPU, transformers 4.5x/5.x):

  layer-streamer synth /tmp/q --arch qwen2 --preset tiny --seed 7
  python3 scripts/hf_fixture.py /tmp/q tests/fixtures/reference/qwen2-tiny-s7
  layer-streamer synth /tmp/l --arch llama --preset tiny --seed 7 --tie
  python3 scripts/hf_fixture.py /tmp/l tests/fixtures/reference/llama-tiny-tie-s7

(scripts/make-fixtures does exactly this.)
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen)
    rows, greedy = [], []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1].float())
        for _ in range(args.steps):
            nxt = int(rows[-1].argmax())
            greedy.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0, -1].float())
    os.makedirs(args.out, exist_ok=True)
    logits = torch.stack(rows).contiguous()
    logits.numpy().astype("<f4").tofile(os.path.join(args.out, "reference_logits.f32"))
    meta = dict(
        model_type=model.config.model_type, seed=args.seed,
        prompt_ids=prompt[0].tolist(), greedy_ids=greedy, vocab=vocab,
        logits_shape=list(logits.shape),
        note="row 0: last prompt position; row i>0: after feeding greedy_ids[i-1]",
    )
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({k: meta[k] for k in ("model_type", "logits_shape")}))


if __name__ == "__main__":
    main()
