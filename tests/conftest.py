"""Shared fixtures: tiny random models of every supported family, and the embedded model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96

TINY_CONFIGS = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=128, initializer_range=0.2),
    "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64),
    "mistral": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64),
    "qwen2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64),
    "gpt_neox": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "opt": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128),
    "gemma": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, head_dim=16),
    "gemma2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, head_dim=16),
    "phi": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "phi3": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
}


def tiny_model(model_type: str, seed: int = 0, layers: int | None = None, **overrides) -> torch.nn.Module:
    """A random, tiny ``*ForCausalLM`` of ``model_type`` in eval mode (float32); ``layers``: its
    number of decoder layers (``n_layer`` for gpt2, ``num_hidden_layers`` for the others)."""
    torch.manual_seed(seed)
    kwargs = dict(TINY_CONFIGS[model_type], vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if layers is not None:
        kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def any_tiny(request) -> torch.nn.Module:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (loaded once per test session)."""
    from steer import load_model

    return load_model()


def tiny_tokenizer():
    """A word-level tokenizer over ``w0 .. w95`` matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["[UNK]"] = VOCAB - 1
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="w2", pad_token="w0", unk_token="[UNK]")


def save_tiny(folder, model_type: str = "llama", seed: int = 0, **overrides):
    """Save a tiny model (``overrides`` as for :func:`tiny_model`) and its tokenizer to ``folder``
    (loadable with ``load_model(folder)``)."""
    model = tiny_model(model_type, seed, **overrides)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~20x faster on one thread than on two contended ones (``pytestmark`` a module with it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_blocks(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``(n, length)`` random token ids inside every tiny model's vocabulary."""
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))
