#!/usr/bin/env python3
"""Write a transformers reference file for `tern verify --reference` (docs/parity.md).

    python -m venv venv && venv/bin/pip install -r scripts/requirements.txt
    venv/bin/python scripts/make_reference.py CHECKPOINT -o reference.safetensors [--prompt TEXT]...

CHECKPOINT is a checkpoint folder or a repo id already in the local Hugging Face cache
(nothing is downloaded). The model runs in float32 with eager attention, the reference
numerics tern is judged against. Per prompt the file holds (safetensors, little-endian):

    prompt.{i}.ids            I64 [T]            the prompt's token ids (with BOS)
    prompt.{i}.logits         F32 [T, vocab]     logits of every position, one full forward
    prompt.{i}.hidden         F32 [L+1, T, h]    output_hidden_states (the last after the final norm)
    prompt.{i}.decode_logits  F32 [T, vocab]     the same positions one token at a time through
                                                 transformers' KV cache: its own noise floor
    prompt.{i}.greedy         I64 [N]            greedy continuation (full forward per step)
    prompt.{i}.greedy_logits  F32 [N, vocab]     the logits that chose each greedy token

Memory: fp32 weights (4 bytes per parameter; ~10 GB for 2.4 B parameters) plus activations:
keep prompts short on big models.
"""

import argparse
import json
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# tern verify's default prompts (verify/src/lib.rs DEFAULT_PROMPTS).
DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
]


def load(spec: str, revision):
    kw = dict(revision=revision, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(spec, **kw)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, attn_implementation="eager", **kw)
    # Packed BitNet checkpoints leave some tensors bf16 after from_pretrained(dtype=float32).
    model = model.to(torch.float32)
    model.eval()
    return tok, model


@torch.no_grad()
def full_forward(model, ids):
    out = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    return out.logits[0].float(), torch.stack([h[0] for h in out.hidden_states]).float()


@torch.no_grad()
def cached_decode(model, ids):
    """Logits of every position, one token at a time through the KV cache."""
    cache, rows = None, []
    for t in range(ids.shape[0]):
        out = model(input_ids=ids[None, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        rows.append(out.logits[0, -1].float())
    return torch.stack(rows)


@torch.no_grad()
def greedy(model, ids, n):
    cur, toks, rows = ids.clone(), [], []
    for _ in range(n):
        last = model(input_ids=cur[None], use_cache=False).logits[0, -1].float()
        nxt = int(torch.argmax(last))
        toks.append(nxt)
        rows.append(last)
        cur = torch.cat([cur, torch.tensor([nxt], dtype=torch.int64)])
    return torch.tensor(toks, dtype=torch.int64), torch.stack(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint folder or cached Hugging Face repo id")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--revision")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable; default: tern's three)")
    ap.add_argument("--greedy", type=int, default=8, help="greedy tokens per prompt (default 8)")
    ap.add_argument("--threads", type=int, help="torch threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = args.prompt or DEFAULT_PROMPTS
    tok, model = load(args.checkpoint, args.revision)
    tensors = {}
    for i, text in enumerate(prompts):
        ids = torch.tensor(tok(text, add_special_tokens=True)["input_ids"], dtype=torch.int64)
        if ids.numel() == 0:
            sys.exit(f"prompt {text!r} has no tokens")
        logits, hidden = full_forward(model, ids)
        decode = cached_decode(model, ids)
        g, gl = greedy(model, ids, args.greedy)
        tensors[f"prompt.{i}.ids"] = ids.contiguous()
        tensors[f"prompt.{i}.logits"] = logits.contiguous()
        tensors[f"prompt.{i}.hidden"] = hidden.contiguous()
        tensors[f"prompt.{i}.decode_logits"] = decode.contiguous()
        if args.greedy > 0:
            tensors[f"prompt.{i}.greedy"] = g
            tensors[f"prompt.{i}.greedy_logits"] = gl.contiguous()
        noise = (logits - decode).abs().max().item()
        print(f"prompt {i}: {ids.numel()} tokens, decode vs full forward max |Δlogit| {noise:.3g}", file=sys.stderr)
    meta = {
        "checkpoint": args.checkpoint,
        "prompts": json.dumps(prompts),
        "dtype": "float32",
        "attn_implementation": "eager",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    save_file(tensors, args.output, metadata=meta)


if __name__ == "__main__":
    main()
