"""Layer scan on the embedded model: the cheap scan (prefix outputs reused) against the naive way
(one full pass per skipped layer), timed side by side on the same held-out text, candidate by
candidate in alternation so load bursts on a shared machine hit both alike; then the best greedy
two-layer plan and its decoding speed against plain ``generate`` at batch 1.

    python bench/layers.py [--tokens 1024] [--threads 1]

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
    from generation.corpus import docstring_text

    return docstring_text("heldout", max_chars)


@torch.no_grad()
def timed_scans(model, blocks: torch.Tensor, batch_size: int):
    """Every single-layer skip scored both ways, candidate by candidate in alternation, with the
    primitives ``scan_skips`` uses; returns (cheap Scan, naive Scan, cheap seconds, naive seconds)."""
    from steer import Adapter
    from steer.layer_scan import PlanScore, Scan, _forward, _recording, _Tally
    from steer.layers import LayerOp, layer_ops

    adapter = Adapter(model)
    n = adapter.n_layers
    seconds = {True: 0.0, False: 0.0}
    base = _Tally()
    tallies = {reuse: {k: _Tally() for k in range(n)} for reuse in (True, False)}
    reference = []
    for b, ids in enumerate(torch.split(blocks, batch_size)):
        outputs: list = [None] * n
        start = time.perf_counter()  # the cheap way's reference pass records every layer's output
        with _recording(adapter.layers, outputs):
            logits = _forward(model, ids)
        reference.append(logits.max(-1).indices)
        base.add(logits, ids, reference[-1])
        seconds[True] += time.perf_counter() - start
        start = time.perf_counter()  # the naive way's reference pass
        _Tally().add(_forward(model, ids), ids, reference[-1])
        seconds[False] += time.perf_counter() - start
        for k in range(n):
            for reuse in ((True, False) if (b + k) % 2 == 0 else (False, True)):
                start = time.perf_counter()
                with layer_ops(model, [LayerOp.skip(k)], replay=outputs[:k] if reuse else None):
                    tallies[reuse][k].add(_forward(model, ids), ids, reference[-1])
                seconds[reuse] += time.perf_counter() - start
        print(f"batch {b + 1}: scan {seconds[True]:.1f}s, naive {seconds[False]:.1f}s so far", flush=True)

    def score(k: int, tally) -> PlanScore:
        return PlanScore((k,), tally.perplexity, tally.perplexity / base.perplexity - 1,
                         tally.agree / tally.positions, (n - 1) / n)

    base_score = PlanScore((), base.perplexity, 0.0, 1.0, 1.0)
    scans = [Scan(base_score, {k: score(k, t) for k, t in tallies[reuse].items()}, reference) for reuse in (True, False)]
    return scans[0], scans[1], seconds[True], seconds[False]


@torch.no_grad()
def scan_bound(model, batch: torch.Tensor, repeats: int = 3) -> str:
    """The ratio the pass's parts allow: every candidate still pays the unembedding and scoring."""
    from steer import Adapter
    from steer.layer_scan import _forward, _recording, _Tally
    from steer.layers import LayerOp, layer_ops

    adapter = Adapter(model)
    n = adapter.n_layers
    outputs: list = [None] * n
    with _recording(adapter.layers, outputs):
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
    parser.add_argument("--repeats", type=int, default=5)
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
    first, naive, cheap_s, naive_s = timed_scans(model, blocks, args.batch_size)
    base, singles = first.base, first.candidates
    worst_gap = max(abs(singles[k].perplexity / naive.candidates[k].perplexity - 1) for k in singles)
    print(f"single-layer scan: {cheap_s:.1f}s cheap vs {naive_s:.1f}s naive; largest relative perplexity "
          f"difference between the two {worst_gap:.1e}")
    print(f"unmodified perplexity {base.perplexity:.3f}")
    print(f"{'skip':>5} {'ppl':>10} {'rise':>9} {'top1':>6}")
    for k, s in singles.items():
        print(f"{k:>5} {s.perplexity:>10.3f} {s.rise:>+9.1%} {s.agreement:>6.1%}")
    best_single = min(singles.values(), key=lambda s: s.perplexity)

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
