"""Tiny, fully offline stand-ins for the evaluation tests: a character tokenizer and a small
llama saved to a folder (usable as ``--model PATH``), plus a check that they round-trip."""
from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from steer.models import prepare_tokenizer

CHARS = string.ascii_letters + string.digits + " .,;:!?'\"-()\n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids 0..3 are pad, bos, eos, unk (matching conftest's tiny models)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    prepare_tokenizer(tokenizer)
    return tokenizer


def tiny_lm(seed: int = 0, model_type: str = "llama"):
    """A tiny random llama whose vocabulary is the character tokenizer's."""
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), num_hidden_layers=2, hidden_size=32,
                                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def save_tiny_lm(folder: Path, seed: int = 0) -> Path:
    model, tokenizer = tiny_lm(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_tiny_lm_round_trips_through_load_model(tmp_path):
    from steer import load_model

    folder = save_tiny_lm(tmp_path / "tiny")
    model, tokenizer = load_model(folder)
    ids = tokenizer("Hi there!").input_ids
    assert tokenizer.decode(ids) == "Hi there!" and len(ids) == 9
    assert model.config.vocab_size == len(tokenizer) and tokenizer.padding_side == "left"
