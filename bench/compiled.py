"""Steering on the compiled path: eager vs compiled static-cache generation, plain vs steered.

SmolLM2-135M's shape with random weights (nothing to download; speed does not depend on the
weights), greedy, ``--new-tokens`` tokens, batch 1 and 16. Variants, each warmed up, timed in an
order that rotates run by run, medians over ``--repeats``:

* eager plain / eager steered (``SteeringProcessor``, default dynamic cache);
* compiled plain / compiled steered / compiled per-row (static cache, decode step compiled by
  transformers: a CUDA graph on GPU). Per-row: every row its own forcing spec, every fourth none.

Each steering spec sets one last-layer value vector's coefficient to 3000, which forces that
vector's top token: the forced share is the fraction of generated tokens equal to it (1.0 = the
edit acted on every step). ``recompiles_on_spec_change`` counts new dynamo graphs while the
spec changes between calls. Last line::

    RESULT forced_share_min=... compiled_overhead_bs1=... compiled_overhead_bs16=... compiled_speedup_bs1=... recompiles_on_spec_change=...

(overhead: compiled steered time / compiled plain time; speed-up: eager steered / compiled steered).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from steer import Adapter, Spec, SteeringProcessor


def smollm2_shape(dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def forcing_specs(model, n: int) -> list[tuple[Spec, int]]:
    """``n`` specs, each setting one last-layer value vector to 3000, with the token it forces."""
    adapter = Adapter(model)
    last = adapter.n_layers - 1
    logits = adapter.readout(adapter.value_vectors(last)).float()
    best = logits.topk(2, dim=-1).values
    clear = (best[:, 0] - best[:, 1]) > 0.02 * best[:, 0].abs()  # a clear winner also in bf16
    tops = torch.where(clear, logits.argmax(-1), -1)
    config = model.config
    out, seen = [], {config.bos_token_id, config.eos_token_id, config.pad_token_id, 0, -1}  # min_new_tokens bans eos
    for index in range(tops.numel()):
        if int(tops[index]) not in seen:
            seen.add(int(tops[index]))
            out.append((Spec.build(f"force L{last}.N{index}", [(last, index, "set", 3000.0)], model=model), int(tops[index])))
        if len(out) == n:
            return out
    raise RuntimeError("not enough distinct forced tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 on cuda, 8 on cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 on cuda, 2 on cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: fast compile on cpu)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    new_tokens = args.new_tokens or (64 if cuda else 8)
    repeats = args.repeats or (7 if cuda else 2)
    model = smollm2_shape(torch.bfloat16 if cuda else torch.float32, args.device)
    compile_config = CompileConfig(backend=args.backend, fullgraph=True,
                                   mode="reduce-overhead" if cuda and args.backend == "inductor" else None)
    compile_config._compile_all_devices = True  # on cpu transformers compiles only when told
    specs = forcing_specs(model, 17)
    prompt = torch.randint(3, 49152, (16, 12), generator=torch.Generator().manual_seed(0)).to(args.device)

    def run(batch: int, compiled: bool, steer) -> tuple[float, torch.Tensor]:
        ids = prompt[:batch]
        kwargs = dict(cache_implementation="static", compile_config=compile_config) if compiled else {}
        if steer is not None:
            kwargs["logits_processor"] = [SteeringProcessor(model, steer)]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / new_tokens, out[:, ids.shape[1]:]

    results, forced = {}, {}
    recompiles = 0
    for batch in (1, 16):
        per_row = [None if i % 4 == 3 else specs[i][0] for i in range(batch)]
        variants = {
            "eager plain": (False, None), "eager steered": (False, specs[0][0]),
            "compiled plain": (True, None), "compiled steered": (True, specs[0][0]),
            "compiled per-row": (True, per_row if batch > 1 else [specs[1][0]]),
        }
        for name, (compiled, steer) in variants.items():  # warm up (compiles) every side
            run(batch, compiled, steer)
        before = counters["stats"]["unique_graphs"]
        for spec, top in specs[2:6]:  # spec changes between compiled calls
            _, out = run(batch, True, spec)
            forced[f"compiled steered, spec change (bs{batch})"] = min(
                forced.get(f"compiled steered, spec change (bs{batch})", 1.0), float((out == top).float().mean()))
        recompiles += counters["stats"]["unique_graphs"] - before
        times = {name: [] for name in variants}
        names = list(variants)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order run by run
                compiled, steer = variants[name]
                seconds, out = run(batch, compiled, steer)
                times[name].append(seconds)
                if steer is not None:
                    rows = steer if isinstance(steer, list) else [steer] * batch
                    hits = [float((out[i] == specs[[s for s, _ in specs].index(spec)][1]).float().mean())
                            for i, spec in enumerate(rows) if spec is not None]
                    forced[f"{name} (bs{batch})"] = min(hits)
        for name in names:
            results[(name, batch)] = statistics.median(times[name])
        print(f"batch {batch}:")
        for name in names:
            ms = results[(name, batch)] * 1e3
            share = forced.get(f"{name} (bs{batch})")
            print(f"  {name:<18} {ms:8.2f} ms/token" + (f"   forced share {share:.3f}" if share is not None else ""))
    for key, share in forced.items():
        if "spec change" in key:
            print(f"  {key}: forced share {share:.3f}")
    overhead = {b: results[("compiled steered", b)] / results[("compiled plain", b)] for b in (1, 16)}
    speedup = results[("eager steered", 1)] / results[("compiled steered", 1)]
    print(f"device {args.device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), torch {torch.__version__}, "
          f"{new_tokens} tokens, {repeats} repeats, backend {args.backend}")
    print(f"RESULT forced_share_min={min(forced.values()):.3f} compiled_overhead_bs1={overhead[1]:.3f} "
          f"compiled_overhead_bs16={overhead[16]:.3f} compiled_speedup_bs1={speedup:.2f} "
          f"recompiles_on_spec_change={recompiles}")


if __name__ == "__main__":
    main()
