"""Layer scan on the embedded model: the cheap scan (prefix outputs reused) against the naive way
(one full pass per skipped layer), timed side by side on the same held-out text, whole scans in
alternation so load bursts on a shared machine hit both alike (fastest of a few each); then the
best greedy two-layer plan and its decoding speed against plain ``generate`` at batch 1.

    python bench/layers.py [--tokens 1024] [--threads 1] [--scan-rounds 3]

Last line: ``RESULT scan_vs_naive=... best_single_ppl_rise=... best_pair_ppl_rise=... speedup_skip2_bs1=...``
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def held_out_text(max_chars: int = 60_000) -> str:
    """English prose never used for fitting: the held-out split of the stdlib's docstrings."""
    from steer.generation.corpus import docstring_text

    return docstring_text("heldout", max_chars)


def timed_scans(model, blocks: torch.Tensor, batch_size: int, rounds: int = 3):
    """The single-layer scan timed both ways: whole ``scan_skips`` calls with and without prefix
    reuse, in alternation (so load bursts on a shared machine hit both alike), fastest of
    ``rounds`` each; returns (cheap Scan, naive Scan, cheap seconds, naive seconds)."""
    from steer.layer_scan import scan_skips

    scans, seconds = {}, {True: math.inf, False: math.inf}
    for r in range(rounds):
        for reuse in ((True, False) if r % 2 == 0 else (False, True)):
            start = time.perf_counter()
            scans[reuse] = scan_skips(model, blocks, batch_size=batch_size, reuse=reuse)
            seconds[reuse] = min(seconds[reuse], time.perf_counter() - start)
        print(f"round {r + 1}/{rounds}: fastest scan {seconds[True]:.1f}s, naive {seconds[False]:.1f}s so far", flush=True)
    return scans[True], scans[False], seconds[True], seconds[False]


@torch.no_grad()
def scan_bound(model, batch: torch.Tensor, repeats: int = 3) -> str:
    """The ratio the pass's parts allow: every candidate still pays the unembedding and scoring."""
    from steer import Adapter
    from steer.layer_scan import _forward, _Tally, recording
    from steer.layers import LayerOp, layer_ops

    adapter = Adapter(model)
    n = adapter.n_layers
    outputs: list = [None] * n
    with recording(adapter.layers, outputs):
        reference = _forward(model, batch).max(-1).indices

    def timed(fn) -> float:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    def full():
        _Tally().add(_forward(model, batch), batch, reference)

    def head_only():  # skip the last layer, replay all others: what no reuse can avoid
        with layer_ops(model, [LayerOp.skip(n - 1)], replay=outputs[: n - 1]):
            _Tally().add(_forward(model, batch), batch, reference)

    whole, fixed = timed(full), timed(head_only)
    layer = (whole - fixed) / n
    cheap = whole + n * fixed + layer * n * (n - 1) / 2
    naive = whole + n * (fixed + layer * (n - 1))
    return (f"one pass {whole:.2f}s = {n} layers x {layer * 1000:.0f}ms + {fixed:.2f}s that every candidate pays "
            f"(embedding, final norm, the {adapter.vocab_size}-token unembedding, scoring: "
            f"{fixed / whole:.0%} of a pass); with perfect prefix reuse the ratio is {cheap / naive:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a shared 2-core box)")
    parser.add_argument("--speed-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="paired decoding-speed runs")
    parser.add_argument("--scan-rounds", type=int, default=3, help="timed scans each way (fastest kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from steer import load_model
    from steer.layer_scan import greedy_plans, text_blocks, tokens_per_second

    model, tokenizer = load_model()
    blocks = text_blocks(tokenizer, held_out_text(), args.block, args.tokens)
    print(f"embedded model, {blocks.numel()} held-out tokens in {blocks.shape[0]} blocks, {args.threads} thread(s)")

    with torch.no_grad():  # warm-up: the first passes pay one-time allocation costs
        for _ in range(2):
            model(blocks[: args.batch_size], use_cache=False)
    first, naive, cheap_s, naive_s = timed_scans(model, blocks, args.batch_size, args.scan_rounds)
    base, singles = first.base, first.candidates
    worst_gap = max(abs(singles[k].perplexity / naive.candidates[k].perplexity - 1) for k in singles)
    print(f"single-layer scan (fastest of {args.scan_rounds}): {cheap_s:.1f}s cheap vs {naive_s:.1f}s naive; "
          f"largest relative perplexity difference between the two {worst_gap:.1e}")
    print(f"unmodified perplexity {base.perplexity:.3f}")
    print(f"{'skip':>5} {'ppl':>10} {'rise':>9} {'top1':>6}")
    for k, s in singles.items():
        print(f"{k:>5} {s.perplexity:>10.3f} {s.rise:>+9.1%} {s.agreement:>6.1%}")
    best_single = first.best()

    plans = greedy_plans(model, blocks, max_skips=2, first=first, batch_size=args.batch_size)
    pair = plans[1]
    print(f"best single: {best_single.name} {best_single.rise:+.1%}; greedy pair: {pair.name} {pair.rise:+.1%} "
          f"(top-1 agreement {pair.agreement:.1%})")

    prompt = blocks[0, :32]
    plain, skip2 = [], []
    tokens_per_second(model, prompt, new_tokens=4)  # warm-up
    for _ in range(args.repeats):  # alternate, so both see the same load
        plain.append(tokens_per_second(model, prompt, (), args.speed_tokens))
        skip2.append(tokens_per_second(model, prompt, pair.ops, args.speed_tokens))
    # Runs are paired (back to back), so the median of per-pair ratios shrugs off load bursts.
    speedup = statistics.median(s / p for s, p in zip(skip2, plain))
    print(f"plain tok/s runs: {' '.join(f'{x:.2f}' for x in plain)}; {pair.name}: {' '.join(f'{x:.2f}' for x in skip2)}")
    print(f"batch-1 greedy decoding, {args.speed_tokens} tokens, {args.repeats} paired runs: plain median "
          f"{statistics.median(plain):.2f} tok/s, {pair.name} {statistics.median(skip2):.2f} tok/s; "
          f"median paired speed-up {speedup:.3f} (layer compute kept {pair.compute:.1%})")

    bound = scan_bound(model, blocks[: args.batch_size])
    print(f"why not lower: {bound}")
    print(f"RESULT scan_vs_naive={cheap_s / naive_s:.3f} best_single_ppl_rise={best_single.rise:.4f} "
          f"best_pair_ppl_rise={pair.rise:.4f} speedup_skip2_bs1={speedup:.3f}")


if __name__ == "__main__":
    main()
