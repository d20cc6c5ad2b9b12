"""Loading and the family table, on tiny random models of every family and the embedded model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import save_tiny
from steer import Adapter, UnsupportedModelError, family_of, load_model
from steer.models import embedded_gguf


def test_readout_reproduces_the_models_logits(any_tiny):
    model = any_tiny
    adapter = Adapter(model)
    captured = {}
    handle = adapter.final_norm.register_forward_hook(lambda m, args, out: captured.setdefault("h", args[0]))
    ids = torch.tensor([[4, 9, 30, 2, 77]])
    with torch.no_grad():
        logits = model(ids).logits
        readout = adapter.readout(captured["h"])
    handle.remove()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        readout = torch.tanh(readout / cap) * cap
    torch.testing.assert_close(readout, logits, atol=1e-5, rtol=1e-5)


def test_value_vectors_are_what_the_ffn_writes(any_tiny):
    """Coefficient vector e_k through the FFN output projection gives value vector k (plus bias)."""
    adapter = Adapter(any_tiny)
    proj = adapter.ffn_out(1)
    basis = torch.eye(adapter.d_ff)[:5]
    with torch.no_grad():
        written = proj(basis) - proj(torch.zeros(1, adapter.d_ff))
    torch.testing.assert_close(written, adapter.value_vectors(1)[:5])


def test_unsupported_model_names_supported_families():
    config = AutoConfig.for_model("bloom", n_layer=1, hidden_size=16, n_head=2, vocab_size=50)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'bloom'.*gpt2.*llama.*Family row"):
        family_of(model)


def test_load_local_folder_ready_for_batches(tmp_path):
    save_tiny(tmp_path)
    loaded, tokenizer = load_model(tmp_path, device_map="cpu")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "w0"
    assert not loaded.training
    batch = tokenizer(["w5 w6 w7", "w9"], return_tensors="pt", padding=True)
    out = loaded.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 6)
    with pytest.raises(OSError, match="could not load model"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tmp_path, dtype="float8")


@pytest.mark.embedded
def test_embedded_model(embedded):
    model, tokenizer = embedded
    adapter = Adapter(model)
    assert (adapter.family.name, adapter.n_layers, adapter.d_ff, adapter.vocab_size) == ("llama", 30, 1536, 49152)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    batch = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert " Paris" in tokenizer.decode(out[0, -5:])


@pytest.mark.embedded
def test_gguf_file_loads_directly(embedded):
    """The real GGUF path (what the cached conversion is made from) gives the same model."""
    model, _ = embedded
    direct, _ = load_model(embedded_gguf())
    ids = torch.tensor([[1, 504, 3458, 282]])
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, model(ids).logits)
