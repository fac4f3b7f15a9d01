#!/usr/bin/env python3
"""Load generator for `layer-streamer serve`: N concurrent streaming clients.

For each concurrency level, every client sends --requests streaming
completions one after another (random token-id prompts, end-of-sequence
ignored so that each yields exactly --max-tokens tokens) and the script
prints aggregate tokens/s, time to first token and per-client speed.
Standard library only, so that it runs wherever python3 does.

    scripts/serve-load.py --url http://127.0.0.1:8000 --concurrency 1,8,32,64
"""

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse


def stream_one(url, key, model, prompt, max_tokens, timeout):
    """One streaming completion: (ttft seconds, tokens, seconds)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    body = json.dumps({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    })
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", body=body, headers=headers)
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, tokens = None, None
    for raw in r:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        msg = json.loads(data)
        if "error" in msg:
            raise RuntimeError(msg["error"]["message"])
        if ttft is None and msg.get("choices"):
            ttft = time.monotonic() - t0
        if msg.get("usage"):
            tokens = msg["usage"]["completion_tokens"]
    conn.close()
    return ttft or 0.0, tokens or 0, time.monotonic() - t0


def model_name(url, key):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
    conn.request("GET", "/v1/models", headers={"Authorization": "Bearer " + key} if key else {})
    r = conn.getresponse()
    return json.loads(r.read())["data"][0]["id"]


def level(args, model, vocab, n):
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        rng = random.Random(args.seed * 1000 + i)
        for _ in range(args.requests):
            prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
            try:
                res = stream_one(args.url, args.api_key, model, prompt, args.max_tokens, args.timeout)
                with lock:
                    results.append(res)
            except Exception as e:  # reported below, the run goes on
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    tokens = sum(r[1] for r in results)
    ttfts = sorted(r[0] for r in results) or [0.0]
    per_client = [r[1] / r[2] for r in results if r[2] > 0] or [0.0]
    p90 = ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]
    print(
        f"{n:>4} clients: {len(results)} requests, {tokens} tokens in {wall:.1f} s: "
        f"{tokens / wall:8.1f} tokens/s aggregate, {statistics.mean(per_client):6.2f} per client; "
        f"TTFT mean {statistics.mean(ttfts):.3f} s, p50 {statistics.median(ttfts):.3f} s, p90 {p90:.3f} s"
        + (f"; {len(errors)} errors, first: {errors[0]}" if errors else ""),
        flush=True,
    )
    return not errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="")
    p.add_argument("--model", help="default: the one /v1/models lists")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1000, help="prompt ids are drawn below this")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true",
                   help="measure from the first request (by default one short request, not"
                        " counted, fills the server's caches first)")
    args = p.parse_args()
    model = args.model or model_name(args.url, args.api_key)
    print(f"{args.url} {model}: prompts of {args.prompt_len} tokens, {args.max_tokens} new tokens each", flush=True)
    if not args.no_warmup:
        t0 = time.monotonic()
        stream_one(args.url, args.api_key, model, [1] * 8, 2, args.timeout)
        print(f"warm-up request: {time.monotonic() - t0:.1f} s (not counted)", flush=True)
    ok = True
    for n in [int(x) for x in args.concurrency.split(",")]:
        ok &= level(args, model, args.vocab, n)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
