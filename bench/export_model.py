"""Write the embedded model as a bf16 safetensors folder in shards small enough to carry to a GPU machine.

The embedded GGUF cannot be read there (no ``gguf`` package), and one transfer carries at most
64 MiB: SmolLM2-135M in bf16 is about 270 MB, so it goes as five ~55 MB shards plus config and
tokenizer. ``load_model(FOLDER, dtype="float32")`` there upcasts to the same values as here in bf16.

    python bench/export_model.py --out gpu_model        # gpu_model/ is git-ignored (see .gitignore)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_model")
    parser.add_argument("--shard", default="55MB")
    args = parser.parse_args()
    from steer import load_model

    model, tokenizer = load_model(dtype="float32")
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size=args.shard)
    tokenizer.save_pretrained(args.out)
    for path in sorted(Path(args.out).iterdir()):
        print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
