#!/usr/bin/env python3
"""A bounded load test of `tern serve` over loopback (standard library only).

    tern serve model.tern --port 8080 --parallel 8 -t 2 &
    python3 scripts/load_test.py --url http://127.0.0.1:8080 --streams 1,2,4,8

For each concurrency C it runs C client threads; each sends `--requests` streamed greedy
completions of a `--prompt-tokens`-token prompt (token ids, so the length is exact) with
`--max-tokens` to generate, one after another. It stops by itself: a fixed number of
requests, and no new request after `--duration` seconds. Reported per C: requests/s,
p50/p99 time to first token, and aggregate decode tokens/s (tokens after each request's
first, over the time from each request's first to last token, summed over requests and
divided by C: the mean decode rate of a stream times C), and overall tokens/s (every
generated token over the level's wall time, prefills included).
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlparse


def one_request(host, port, prompt, max_tokens, timeout):
    """One streamed completion; returns (ttft_s, total_s, completion_tokens, first_to_last_s)."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first = last = None
    tokens = None
    buf = b""
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        doc = json.loads(data)
        if doc.get("usage"):
            tokens = doc["usage"]["completion_tokens"]
        for choice in doc.get("choices", []):
            if choice.get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
    conn.close()
    end = time.perf_counter()
    first = first or end
    last = last or end
    return first - start, end - start, tokens or 0, last - first


def run_level(args, host, port, streams, prompt):
    results = []
    errors = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + args.duration

    def client():
        for _ in range(args.requests):
            if time.perf_counter() > stop_at:
                return
            try:
                r = one_request(host, port, prompt, args.max_tokens, args.timeout)
                with lock:
                    results.append(r)
            except Exception as e:  # recorded, reported, never retried
                with lock:
                    errors.append(str(e))
                return

    threads = [threading.Thread(target=client) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    decode_tokens = sum(max(r[2] - 1, 0) for r in results)
    decode_time = sum(r[3] for r in results) / max(streams, 1)

    def pct(p):
        if not ttft:
            return float("nan")
        return ttft[min(len(ttft) - 1, int(round(p / 100 * (len(ttft) - 1))))]

    return {
        "streams": streams,
        "requests": len(results),
        "errors": errors[:3],
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "ttft_p50_s": pct(50),
        "ttft_p99_s": pct(99),
        "decode_tokens": decode_tokens,
        "aggregate_decode_tok_s": decode_tokens / decode_time if decode_time else 0.0,
        "overall_tok_s": sum(r[2] for r in results) / wall,
        "mean_completion_tokens": statistics.mean(r[2] for r in results) if results else 0,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300, help="no new request after this")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    u = urlparse(args.url)
    host, port = u.hostname, u.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("the load test runs over loopback only")
    # Token ids 100.. : plain tokens in any vocabulary of a few hundred or more.
    prompt = [100 + (i * 7) % 200 for i in range(args.prompt_tokens)]
    # Warm up: page the weights in.
    one_request(host, port, prompt[:8], 4, args.timeout)
    rows = []
    for s in [int(x) for x in args.streams.split(",")]:
        row = run_level(args, host, port, s, prompt)
        rows.append(row)
        if not args.json:
            print(
                f"{s} streams: {row['requests']} requests in {row['wall_s']:.1f} s, "
                f"{row['requests_per_s']:.3f} req/s, TTFT p50 {row['ttft_p50_s']*1000:.0f} ms "
                f"p99 {row['ttft_p99_s']*1000:.0f} ms, aggregate decode "
                f"{row['aggregate_decode_tok_s']:.1f} tok/s, overall {row['overall_tok_s']:.1f} tok/s"
                + (f", errors: {row['errors']}" if row["errors"] else ""),
                flush=True,
            )
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
