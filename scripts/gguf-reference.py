#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers for a GGUF file, for checking our
GGUF path (tokenizer, dequantization, the Q/K row order, the forward pass).

Runs where python3 has torch, transformers and the `gguf` package. transformers
dequantizes the GGUF's tensors to float32, so the logits are the exact function of
the file. Writes, like hf_reference.py:

  OUT/reference.json        prompt ids (the chat template applied to --question),
                            greedy continuation ids and text, token ids of a few
                            test strings, shapes
  OUT/reference_logits.f32  float32 little-endian, [1 + steps, vocab]: the logits of
                            the last prompt position, then of each greedy step

  python3 scripts/gguf-reference.py MODEL.gguf OUT [--steps 16] [--device cuda]
"""
import argparse
import json
import os

import torch

TOKENIZER_PROBES = [
    "What is the capital of France?",
    "Hello, world! 123 4567 -- ünïcödé, 日本語, emoji 🙂.",
    "  leading spaces\tand\ttabs\nnew lines\n\n",
    "<|im_start|>user\nhi<|im_end|>",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--question", default="What is the capital of France?")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model = model.to(args.device).eval()
    messages = [{"role": "user", "content": args.question}]
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tok(prompt_text, add_special_tokens=False, return_tensors="pt").input_ids

    rows, greedy = [], []
    with torch.no_grad():
        out = model(prompt.to(args.device), use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1].float().cpu())
        for _ in range(args.steps):
            nxt = int(rows[-1].argmax())
            greedy.append(nxt)
            ids = torch.tensor([[nxt]], device=args.device)
            out = model(ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0, -1].float().cpu())

    os.makedirs(args.out, exist_ok=True)
    logits = torch.stack(rows).contiguous()
    logits.numpy().astype("<f4").tofile(os.path.join(args.out, "reference_logits.f32"))
    meta = dict(
        gguf=f,
        question=args.question,
        prompt_text=prompt_text,
        prompt_ids=prompt[0].tolist(),
        greedy_ids=greedy,
        greedy_text=tok.decode(greedy),
        vocab=int(logits.shape[1]),
        logits_shape=list(logits.shape),
        tokenizer_probes=[
            dict(text=t, ids=tok(t, add_special_tokens=False).input_ids) for t in TOKENIZER_PROBES
        ],
        config={k: v for k, v in model.config.to_dict().items()
                if isinstance(v, (int, float, str, bool)) or v is None},
        note="row 0: last prompt position; row i>0: after feeding greedy_ids[i-1]",
    )
    json.dump(meta, open(os.path.join(args.out, "reference.json"), "w"), indent=1)
    print(json.dumps({k: meta[k] for k in ("prompt_text", "greedy_text", "logits_shape")}))


if __name__ == "__main__":
    main()
