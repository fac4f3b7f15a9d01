"""The official `openai` client against a live `layer-streamer serve`.

Run by tests/serve_openai.rs, which starts the servers and computes what
`generate` gives for each case alone:

    openai_client.py functional CASES.json   chat and completions, streamed and not,
                                             16 concurrent clients, bad requests
    openai_client.py limits CASES.json       a client that disconnects, a full queue,
                                             SIGTERM during a stream

Every wait is bounded; the server is on 127.0.0.1. Exits non-zero on the
first failed check.
"""

import concurrent.futures as cf
import http.client
import json
import os
import signal
import sys
import time
import urllib.parse

import openai


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def raw(cfg, method, path, body=None, headers=None, key=True, timeout=30):
    """One HTTP request with the standard library: (status, headers, body bytes)."""
    u = urllib.parse.urlparse(cfg["base_url"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    if key and cfg.get("api_key"):
        h["Authorization"] = "Bearer " + cfg["api_key"]
    h.update(headers or {})
    try:
        try:
            conn.request(method, path, body=body, headers=h)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading the whole body: read that answer
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def client(cfg, key=None, retries=0):
    return openai.OpenAI(
        base_url=cfg["base_url"] + "/v1",
        api_key=key or cfg.get("api_key") or "none",
        max_retries=retries,
        timeout=60,
    )


def completion_args(cfg, case):
    if case.get("messages") is not None:
        return dict(model=cfg["model"], messages=case["messages"], max_tokens=case["max_tokens"], temperature=0)
    return dict(model=cfg["model"], prompt=case["prompt_ids"], max_tokens=case["max_tokens"], temperature=0)


def run_case(cfg, case, stream):
    """Runs one case; returns (text, finish_reason, usage)."""
    c = client(cfg)
    args = completion_args(cfg, case)
    chat = "messages" in args
    api = c.chat.completions if chat else c.completions
    if not stream:
        r = api.create(**args)
        check(len(r.choices) == 1, "one choice")
        ch = r.choices[0]
        text = ch.message.content if chat else ch.text
        check(r.id.startswith("chatcmpl-" if chat else "cmpl-"), f"id {r.id}")
        return text, ch.finish_reason, r.usage
    text, finish, usage, chunks = "", None, None, 0
    for chunk in api.create(stream=True, stream_options={"include_usage": True}, **args):
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            piece = (ch.delta.content or "") if chat else ch.text
            text += piece
            if ch.finish_reason is not None:
                check(finish is None, "one finish_reason")
                finish = ch.finish_reason
    check(chunks >= 2, f"a stream of {chunks} chunks")
    return text, finish, usage


def expect(case, got, label):
    text, finish, usage = got
    check(text == case["text"], f"{label}: text {text!r} != generate's {case['text']!r}")
    check(finish == case["finish"], f"{label}: finish_reason {finish} != {case['finish']}")
    check(usage is not None, f"{label}: no usage")
    check(usage.prompt_tokens == case["prompt_tokens"], f"{label}: prompt_tokens {usage.prompt_tokens} != {case['prompt_tokens']}")
    check(usage.completion_tokens == case["completion_tokens"], f"{label}: completion_tokens {usage.completion_tokens} != {case['completion_tokens']}")
    check(usage.total_tokens == case["prompt_tokens"] + case["completion_tokens"], f"{label}: total_tokens")


def still_serving(cfg):
    case = cfg["cases"][0]
    expect(case, run_case(cfg, case, False), "after a bad request")


def bad_requests(cfg):
    path = "/v1/chat/completions"
    status, _, body = raw(cfg, "POST", path, body=b'{"model": "m", "messages": [')
    check(status == 400 and b"not valid JSON" in body, f"invalid JSON: {status} {body[:200]!r}")
    err = json.loads(body)["error"]
    check(err["type"] == "invalid_request_error", f"error type {err}")
    status, _, body = raw(cfg, "POST", path, body=json.dumps({"model": cfg["model"]}))
    check(status == 400 and json.loads(body)["error"]["param"] == "messages", f"missing messages: {status} {body!r}")
    c = client(cfg)
    try:
        c.chat.completions.create(model=cfg["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=-5)
        check(False, "negative max_tokens accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "max_tokens" in str(e), f"negative max_tokens: {e}")
    try:
        c.completions.create(model=cfg["model"], prompt=[1] * (cfg["max_len"] + 1), max_tokens=1)
        check(False, "a prompt longer than --max-len accepted")
    except openai.BadRequestError as e:
        check(e.code == "context_length_exceeded", f"long prompt: {e}")
    try:
        client(cfg, key="wrong-" + cfg["api_key"]).models.list()
        check(False, "a wrong API key accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"wrong key: {e}")
    status, _, _ = raw(cfg, "GET", "/v1/models", key=False)
    check(status == 401, f"no key: {status}")
    big = b'{"model": "m", "prompt": "' + b"a" * (10 << 20) + b'"}'
    status, _, body = raw(cfg, "POST", "/v1/completions", body=big)
    check(status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error", f"10 MB body: {status} {body[:200]!r}")
    try:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        check(False, "an unknown model accepted")
    except openai.NotFoundError:
        pass
    try:
        c.completions.create(model=cfg["model"], prompt=[1, 2], n=2, max_tokens=2)
        check(False, "n=2 accepted")
    except openai.BadRequestError:
        pass
    still_serving(cfg)


def functional(cfg):
    c = client(cfg)
    models = c.models.list().data
    check([m.id for m in models] == [cfg["model"]], f"models {models}")
    status, _, body = raw(cfg, "GET", "/health", key=False)
    check(status == 200, f"health {status} {body!r}")
    cases = cfg["cases"]
    chat = next(k for k in cases if k.get("messages") is not None)
    plain = next(k for k in cases if k.get("messages") is None)
    for case in (chat, plain):
        for stream in (False, True):
            expect(case, run_case(cfg, case, stream), f"{'chat' if case is chat else 'completion'} stream={stream}")
    # Every case at once, half of them streamed: batched, each must still get
    # exactly what it gets alone.
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        futs = [pool.submit(run_case, cfg, k, i % 2 == 0) for i, k in enumerate(cases)]
        for i, (k, f) in enumerate(zip(cases, futs)):
            expect(k, f.result(timeout=120), f"concurrent client {i}")
    # A stop string ends the text before it.
    text = chat["text"]
    if len(text) > 4:
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        r = c.chat.completions.create(model=cfg["model"], messages=chat["messages"], max_tokens=chat["max_tokens"], temperature=0, stop=[stop])
        got = r.choices[0].message.content
        check(got == text[: text.index(stop)] and r.choices[0].finish_reason == "stop", f"stop {stop!r}: {got!r} (text {text!r}, finish {r.choices[0].finish_reason})")
    bad_requests(cfg)
    status, _, body = raw(cfg, "GET", "/metrics")
    text = body.decode()
    check(status == 200 and "ls_pass_seconds_count" in text, "metrics page")
    accepted = next(l for l in text.splitlines() if l.startswith('ls_requests_total{outcome="accepted"}'))
    check(int(float(accepted.split()[-1])) >= len(cases) + 5, f"metrics: {accepted}")
    print(f"functional: {len(cases)} cases, all checks passed")


def metric(cfg, name):
    _, _, body = raw(cfg, "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def wait_for(what, cond, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def long_stream(cfg, max_tokens):
    """A streamed chat completion that ignores end-of-sequence tokens; returns
    the open stream once its first chunk came. That chunk carries the role
    alone and goes out with the first token, so the request is running then;
    text chunks are no such sign: an incomplete UTF-8 character is held back,
    and a random model may hold back its text until the very last chunk."""
    chat = next(k for k in cfg["cases"] if k.get("messages") is not None)
    c = client(cfg)
    s = c.chat.completions.create(model=cfg["model"], messages=chat["messages"], max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    it = iter(s)
    first = next(it).choices[0]
    check(first.delta.role == "assistant" and first.finish_reason is None, f"first chunk {first}")
    return s, it


def limits(cfg):
    chat = next(k for k in cfg["cases"] if k.get("messages") is not None)
    long = cfg["max_len"] - chat["prompt_tokens"] - 1
    # A client that goes away mid-stream frees its slot (this server has one).
    s, it = long_stream(cfg, long)
    s.close()
    cancelled = 'ls_requests_total{outcome="cancelled"}'
    wait_for("the cancelled request to be dropped", lambda: metric(cfg, cancelled) >= 1)
    still_serving(cfg)
    # One running, one waiting (--max-queue 1): the next gets 429.
    s1, it1 = long_stream(cfg, long)
    c = client(cfg)
    s2 = c.completions.create(model=cfg["model"], prompt=[1, 2, 3], max_tokens=2, temperature=0, stream=True)
    wait_for("the second request to be queued", lambda: metric(cfg, "ls_queue_length") == 1)
    try:
        c.completions.create(model=cfg["model"], prompt=[1, 2, 3], max_tokens=2)
        check(False, "a full queue accepted a request")
    except openai.RateLimitError as e:
        check(e.status_code == 429, f"429: {e}")
        check(int(e.response.headers.get("retry-after", "0")) >= 1, "Retry-After")
    before = metric(cfg, cancelled)
    s2.close()
    s1.close()
    # s1 is cut; s2 may be admitted in the pass that frees s1's slot, before
    # the server saw its client go, and then finish its two tokens.
    wait_for(
        "both to be gone",
        lambda: metric(cfg, cancelled) > before and metric(cfg, "ls_queue_length") == 0 and metric(cfg, "ls_running_sequences") == 0,
    )
    still_serving(cfg)
    # SIGTERM during a stream: the stream still ends normally, with every
    # token it asked for.
    n = 64
    s, it = long_stream(cfg, n)
    os.kill(cfg["pid"], signal.SIGTERM)
    got, finish, usage = 0, None, None
    for chunk in it:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            got += 1
            check(finish is None, "one finish_reason")
            finish = ch.finish_reason
    check(finish == "length", f"after SIGTERM the stream ended with {finish!r}")
    check(usage is not None and usage.completion_tokens == n, f"after SIGTERM: usage {usage}")
    print(f"limits: disconnect, 429 and SIGTERM checks passed ({got} chunks after the signal)")


def main():
    mode, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        cfg = json.load(f)
    {"functional": functional, "limits": limits}[mode](cfg)


if __name__ == "__main__":
    main()
