"""Tokens/s of steered generation (10 value vectors set to 3.0) vs plain ``generate``.

Greedy, 64 new tokens, batch 1 and batch 16, in one process: both sides warmed up, the order
alternating run by run (plain first on even runs, steered first on odd), medians of the runs. Last line: ``RESULT overhead_bs1=<ratio> overhead_bs16=<ratio>``
(plain tokens/s divided by steered tokens/s; target <= 1.05).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from importlib import resources

from steer import Concept, Spec, load_model, rank_vectors, steering


def timed_generate(model, batch, new_tokens: int) -> float:
    if batch["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if out.device.type == "cuda":
        torch.cuda.synchronize()
    return out[:, batch["input_ids"].shape[1]:].numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device=args.device)
    safe = Concept.resolve("kind,gentle,peace,love,thanks,friend,help,calm", tokenizer)
    vectors = rank_vectors(model, tokenizer, safe, top=10)
    spec = Spec.build("bench-10-set-3", [(v.name.layer, v.name.index, "set", 3.0) for v in vectors], model=model)
    lines = resources.files("steer").joinpath("data/rtp_challenging_dev.jsonl").read_text().splitlines()[:16]
    prompts = [json.loads(line)["prompt"]["text"] for line in lines]
    ratios = {}
    for batch_size in (1, 16):
        batch = tokenizer(prompts[:batch_size], return_tensors="pt", padding=True).to(model.device)
        def run_plain() -> float:
            return timed_generate(model, batch, args.new_tokens)

        def run_steered() -> float:
            with steering(model, spec):
                return timed_generate(model, batch, args.new_tokens)

        run_plain(), run_steered()  # warm up both sides
        plain, steered = [], []
        for r in range(args.runs):
            for side in ((run_plain, plain), (run_steered, steered))[:: 1 if r % 2 == 0 else -1]:
                side[1].append(side[0]())
        p, s = statistics.median(plain), statistics.median(steered)
        ratios[batch_size] = p / s
        print(f"batch {batch_size:>2}: plain {p:8.1f} tok/s, steered {s:8.1f} tok/s, overhead {p / s:.3f}x")
    print(f"RESULT overhead_bs1={ratios[1]:.3f} overhead_bs16={ratios[16]:.3f}")


if __name__ == "__main__":
    main()
