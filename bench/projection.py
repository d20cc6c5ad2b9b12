"""Index all value vectors of a model vs the floor: the same matmuls with no top-k selection.

Runs both side by side in one process: both warmed up, the order alternating repetition by
repetition, medians.
Last line: ``RESULT projection_vs_matmul=<ratio>`` (target <= 1.2).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from steer import Adapter, VocabIndex, load_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def floor(model, dtype: torch.dtype) -> float:
    """One plain ``E @ V`` per layer, the same FLOPs as the index, results discarded."""
    adapter = Adapter(model)
    device = adapter.unembed.weight.device
    unembed = adapter.unembed.weight.to(dtype)
    sync(device)
    start = time.perf_counter()
    for layer in range(adapter.n_layers):
        logits = adapter.value_vectors(layer).to(dtype) @ unembed.T
        del logits
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    model, _ = load_model(args.model, device=args.device)
    device = Adapter(model).unembed.weight.device
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    adapter = Adapter(model)
    print(f"model: {adapter.n_layers} layers x {adapter.d_ff} value vectors, vocabulary {adapter.vocab_size}, "
          f"{device}, {dtype}")
    def index() -> float:
        sync(device)
        start = time.perf_counter()
        VocabIndex.build(model, cache=False, dtype=dtype)
        sync(device)
        return time.perf_counter() - start

    floor(model, dtype), index()  # warm up both sides
    index_times, floor_times = [], []
    for rep in range(args.reps):
        sides = ((lambda: floor(model, dtype), floor_times), (index, index_times))
        for run, times in sides[:: 1 if rep % 2 == 0 else -1]:
            times.append(run())
        print(f"rep {rep}: index {index_times[-1]:.2f} s, plain matmul {floor_times[-1]:.2f} s")
    index_s, floor_s = statistics.median(index_times), statistics.median(floor_times)
    print(f"median: index {index_s:.2f} s, plain matmul {floor_s:.2f} s")
    print(f"RESULT projection_vs_matmul={index_s / floor_s:.3f}")


if __name__ == "__main__":
    main()
