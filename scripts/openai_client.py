#!/usr/bin/env python3
"""Talk to `tern serve` with the official `openai` Python client (outside CI).

    pip install openai
    tern serve model.tern --port 8080 &
    python3 scripts/openai_client.py --base-url http://127.0.0.1:8080/v1

Runs a chat completion (whole and streamed), a text completion, lists the models, and
checks that a greedy request gives the same text streamed and not. Exits non-zero on
any mismatch.
"""

import argparse
import sys

from openai import OpenAI


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--prompt", default="Write one sentence about the sea.")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    # The server checks no key; the client insists on one.
    client = OpenAI(base_url=args.base_url, api_key="unused", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    messages = [{"role": "user", "content": args.prompt}]
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0
    )
    text = whole.choices[0].message.content
    print(f"chat: {text!r} ({whole.choices[0].finish_reason}, usage {whole.usage})")

    pieces = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    streamed = "".join(pieces)
    print(f"chat, streamed: {streamed!r} (usage {usage})")

    completion = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=args.max_tokens, temperature=0
    )
    print(f"completion: {completion.choices[0].text!r}")

    ok = streamed == text and usage is not None and usage == whole.usage
    print("OK: streamed and whole agree" if ok else "MISMATCH between streamed and whole")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
