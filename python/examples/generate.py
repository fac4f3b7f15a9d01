#!/usr/bin/env python3
"""Qwen2 / Llama generation in plain PyTorch on top of layer_streamer.

Every forward pass streams the model's layers to the GPU with
``LayerStreamer.run_pass``; this file is the model: RMSNorm, RoPE (default and
Llama 3 scaling), grouped-query attention with a KV cache, SwiGLU. Only the
embedding, the final norm and the LM head stay on the GPU.

    python generate.py --model ./Qwen2-7B-Instruct --prompt "Why is the sky blue?"
    python generate.py --model ./Qwen2-7B-Instruct --chat --prompt "Hi" --max-new-tokens 64
    python generate.py --model DIR --check          # logits against transformers

``--check`` runs the prompt through this model and through transformers'
``AutoModelForCausalLM`` (both in float32 on the same device) and fails when
the relative L2 distance of their logits exceeds ``--tolerance`` (2e-2).
Needs torch; ``--check`` and text prompts need transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from layer_streamer import LayerStreamer, Tensor


class Config:
    """The fields of config.json the forward pass needs."""

    def __init__(self, path: Path):
        c = json.loads((path / "config.json").read_text())
        self.hidden = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads", self.heads)
        self.head_dim = c.get("head_dim") or self.hidden // self.heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.theta = c.get("rope_theta", 10000.0)
        self.scaling = c.get("rope_scaling") or {}
        self.tied = c.get("tie_word_embeddings", False)
        self.vocab = c["vocab_size"]
        self.stored = c.get("torch_dtype", "bfloat16")


def rope_frequencies(cfg: Config, device: torch.device) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's long-context scaling where configured."""
    inv = 1.0 / (cfg.theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    kind = cfg.scaling.get("rope_type", cfg.scaling.get("type"))
    if kind == "llama3":
        s = cfg.scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise SystemExit(f"rope_scaling type {kind!r} is not supported by this example")
    return inv.to(device=device, dtype=torch.float32)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the Hugging Face (rotate-half) layout; x is [heads, T, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return y * w.float()


class Model:
    """The transformer around a streamer: statics on the GPU, a KV cache per layer."""

    def __init__(self, streamer: LayerStreamer, cfg: Config, compute: torch.dtype, max_len: int):
        self.s, self.cfg, self.compute, self.max_len = streamer, cfg, compute, max_len
        idx = streamer.device_index  # None on the host backend: CPU tensors
        self.device = torch.device("cpu") if idx is None else torch.device("cuda", idx)
        embed = torch.from_dlpack(streamer.load_static("model.embed_tokens.weight"))
        self.embed = embed
        self.norm = torch.from_dlpack(streamer.load_static("model.norm.weight"))
        head = "lm_head.weight"
        self.lm_head = embed if cfg.tied else torch.from_dlpack(streamer.load_static(head))
        self.inv_freq = rope_frequencies(cfg, self.device)
        self.cache: List[Optional[torch.Tensor]] = [None] * streamer.num_layers
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def forward(self, ids: List[int]) -> torch.Tensor:
        """Logits of every new position ([T, vocab], float32); appends to the cache."""
        cfg, T, p0 = self.cfg, len(ids), self.length
        if p0 + T > self.max_len:
            raise SystemExit(f"the sequence would exceed --max-len {self.max_len}")
        tok = torch.tensor(ids, device=self.device)
        x = self.embed[tok].float()
        pos = torch.arange(p0, p0 + T, device=self.device, dtype=torch.float32)
        ang = torch.outer(pos, self.inv_freq)
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        mask = torch.ones(T, p0 + T, device=self.device, dtype=torch.bool).tril(diagonal=p0)

        def layer_fn(x: torch.Tensor, weights: Dict[str, Tensor], layer: int) -> torch.Tensor:
            w = {k: torch.from_dlpack(t).to(self.compute) for k, t in weights.items()}
            return self.block(x, w, layer, p0, cos, sin, mask)

        x = self.s.run_pass(x, layer_fn)
        self.length = p0 + T
        h = rms_norm(x, self.norm, cfg.eps).to(self.compute)
        return (h @ self.lm_head.to(self.compute).T).float()

    def block(self, x, w, layer, p0, cos, sin, mask) -> torch.Tensor:
        cfg, T = self.cfg, x.shape[0]
        h = rms_norm(x, w["input_layernorm.weight"], cfg.eps).to(self.compute)

        def proj(name: str) -> torch.Tensor:
            y = h @ w[f"self_attn.{name}.weight"].T
            b = w.get(f"self_attn.{name}.bias")
            return y + b if b is not None else y

        q = proj("q_proj").view(T, cfg.heads, cfg.head_dim).transpose(0, 1)
        k = proj("k_proj").view(T, cfg.kv_heads, cfg.head_dim).transpose(0, 1)
        v = proj("v_proj").view(T, cfg.kv_heads, cfg.head_dim).transpose(0, 1)
        q, k = rotate(q.float(), cos, sin), rotate(k.float(), cos, sin)
        if self.cache[layer] is None:
            shape = (2, cfg.kv_heads, self.max_len, cfg.head_dim)
            self.cache[layer] = torch.empty(shape, device=self.device, dtype=torch.float32)
        kv = self.cache[layer]
        kv[0, :, p0 : p0 + T] = k
        kv[1, :, p0 : p0 + T] = v.float()
        keys, values = kv[0, :, : p0 + T], kv[1, :, : p0 + T]
        group = cfg.heads // cfg.kv_heads
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        o = att.transpose(0, 1).reshape(T, cfg.heads * cfg.head_dim).to(self.compute)
        x = x + (o @ w["self_attn.o_proj.weight"].T).float()
        h = rms_norm(x, w["post_attention_layernorm.weight"], cfg.eps).to(self.compute)
        gate, up = h @ w["mlp.gate_proj.weight"].T, h @ w["mlp.up_proj.weight"].T
        return x + ((F.silu(gate) * up) @ w["mlp.down_proj.weight"].T).float()


def sample(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def prompt_ids(args: argparse.Namespace):
    """The prompt's token ids, and the tokenizer (None with --prompt-ids)."""
    if args.prompt_ids:
        return [int(t) for t in args.prompt_ids.split(",")], None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    if args.chat:
        msgs = [{"role": "user", "content": args.prompt}]
        return tok.apply_chat_template(msgs, add_generation_prompt=True), tok
    return tok(args.prompt)["input_ids"], tok


def generate(model: Model, ids: List[int], args: argparse.Namespace, tok) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    logits = model.forward(ids)[-1]
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    prefill = time.perf_counter() - t0
    out: List[int] = []
    t1 = time.perf_counter()
    for _ in range(args.max_new_tokens):
        nxt = sample(logits, args.temperature, args.top_k, gen)
        out.append(nxt)
        if tok is not None and nxt == tok.eos_token_id:
            break
        if len(out) == args.max_new_tokens:
            break
        logits = model.forward([nxt])[-1]
    decode = time.perf_counter() - t1
    text = tok.decode(out, skip_special_tokens=True) if tok is not None else out
    print(text)
    steps = max(len(out) - 1, 1)
    print(
        f"prefill: {len(ids)} tokens in {prefill:.3f} s ({len(ids) / prefill:.1f} tok/s); "
        f"decode: {len(out)} tokens, {steps / decode:.2f} tok/s",
        file=sys.stderr,
    )
    print(f"last pass: {model.s.last_pass_stats}", file=sys.stderr)


def check(args: argparse.Namespace, streamer: LayerStreamer, cfg: Config) -> int:
    """Prompt logits against transformers, both float32; 0 when within tolerance."""
    from transformers import AutoModelForCausalLM

    ids, _ = prompt_ids(args)
    ours = Model(streamer, cfg, torch.float32, len(ids)).forward(ids)
    ref_model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    ref_model = ref_model.to(ours.device).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids], device=ours.device)).logits[0].float()
    rel = float((ours - ref).norm() / ref.norm())
    same = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    ok = rel <= args.tolerance
    print(f"check: {len(ids)} positions, rel-L2 {rel:.3e} (tolerance {args.tolerance:g}), "
          f"argmax agreement {same:.3f}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (Qwen2 or Llama)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-len", type=int, default=4096, help="KV cache length")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda:0", help="cuda:N, or host (CPU tensors)")
    p.add_argument("--dtype", default="bf16", help="streamed dtype: bf16, or file (keep f16)")
    p.add_argument("--n-gpu", type=int, default=2)
    p.add_argument("--n-cpu-pinned", type=int, default=4)
    p.add_argument("--reader-threads", type=int, default=8)
    p.add_argument("--pinned-cache", default="auto", help="none, auto or a size (12GB)")
    p.add_argument("--gpu-cache", default="none", help="none, auto or a size")
    p.add_argument("--check", action="store_true", help="compare logits with transformers")
    p.add_argument("--tolerance", type=float, default=2e-2)
    args = p.parse_args()

    cfg = Config(Path(args.model))
    streamer = LayerStreamer(
        args.model,
        device=args.device,
        dtype="file" if args.check else args.dtype,
        n_gpu=args.n_gpu,
        n_cpu_pinned=args.n_cpu_pinned,
        reader_threads=args.reader_threads,
        pinned_cache=args.pinned_cache,
        gpu_cache=args.gpu_cache,
    )
    with streamer, torch.no_grad():
        if args.check:
            return check(args, streamer, cfg)
        ids, tok = prompt_ids(args)
        stored = "f16" if cfg.stored == "float16" else "bf16"
        compute = {"bf16": torch.bfloat16, "f16": torch.float16}[
            stored if args.dtype == "file" else args.dtype
        ]
        max_len = min(args.max_len, len(ids) + args.max_new_tokens)
        generate(Model(streamer, cfg, compute, max_len), ids, args, tok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
