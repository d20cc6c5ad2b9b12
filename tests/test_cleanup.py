"""One cleanup test over every context manager that changes a model (nnsight's
test_memory_cleanup in spirit): after the block, normally or through an exception, no hook, no
replaced forward, no marker, no reference to the model and no recorded tensor is left."""
from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

import pytest
import torch

from conftest import tiny_model
from steer import Adapter, Spec, SteeringProcessor, steering
from steer.hooks import hooks, recording, replaced_forwards
from steer.layers import LayerOp, layer_ops

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[5, 17, 33, 8, 61], [9, 4, 61, 12, 2]])


def _edit_spec(model):
    return Spec.build("e", [("L1.N3", "set", 5.0), ("L0.N2", "scale", -1.0)], model=model)


@contextmanager
def _processor(model):
    """A SteeringProcessor inside generate (the wrapper attaches and removes it)."""
    model.generate(IDS, max_new_tokens=2, do_sample=False, logits_processor=[SteeringProcessor(model, _edit_spec(model))])
    yield


def _early_exit(model):
    from steer.generation import early_exit
    from test_early_exit import exit_model_for

    return early_exit(model, exit_model_for(model, check=(0,), bias=50.0), 0.5)


def _collect(model):
    from steer.generation.collect import recording as collect_recording

    return collect_recording(model, [0, 1])


def _log_probs(model):
    from steer.evaluation.perplexity import LogProbRecorder

    return LogProbRecorder(model)


CONTEXTS = {
    "steering": lambda m: steering(m, _edit_spec(m)),
    "steering per row": lambda m: steering(m, [_edit_spec(m), None]),
    "layer ops in a spec": lambda m: steering(m, Spec("skip", layers=(LayerOp("skip", (1,)),))),
    "layer_ops": lambda m: layer_ops(m, [LayerOp("reorder", (0, 1), order=(1, 0))]),
    "processor in generate": _processor,
    "early_exit": _early_exit,
    "hooks": lambda m: hooks((Adapter(m).ffn_out(0), "pre", lambda mod, args: None)),
    "replaced_forwards": lambda m: replaced_forwards([(Adapter(m).layers[0], Adapter(m).layers[0].forward)]),
    "recording": lambda m: recording({i: layer for i, layer in enumerate(Adapter(m).layers)}),
    "collect.recording": _collect,
    "layer_scan.recording": lambda m: __import__("steer.layer_scan", fromlist=["recording"]).recording(
        Adapter(m).layers, [None] * 2),
    "LogProbRecorder": _log_probs,
    "activation_addition": lambda m: __import__("steer.baselines", fromlist=["activation_addition"]).activation_addition(
        m, 0, torch.ones(32), 2.0),
}


def _clean(model) -> list[str]:
    left = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or module._forward_hooks_with_kwargs:
            left.append(f"hook on {name or 'model'}")
        leftovers = [key for key in module.__dict__ if key == "forward" or key.startswith("_steer")]
        if leftovers:
            left.append(f"{leftovers} on {name or 'model'}")
    return left


@pytest.mark.parametrize("name", sorted(CONTEXTS))
@pytest.mark.parametrize("fail", [False, True], ids=["normal", "exception"])
def test_nothing_is_left_behind(name, fail):
    model = tiny_model("llama", layers=2)
    reference = model(IDS).logits
    stores = []
    with pytest.raises(RuntimeError, match="boom") if fail else _nothing():
        with CONTEXTS[name](model) as yielded:
            model(IDS)
            stores.append(yielded if isinstance(yielded, dict) else None)
            if fail:
                raise RuntimeError("boom")
    yielded = None  # what the block yielded may hold the model (a recorder object); let it go
    assert _clean(model) == []
    torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=0)
    for store in stores:  # what a recorder yielded holds no tensor after the block
        if isinstance(store, dict):
            assert not any(isinstance(v, torch.Tensor) or (isinstance(v, dict) and v) for v in store.values()), name
    ref = weakref.ref(model)
    del model, reference
    gc.collect()
    assert ref() is None, f"{name} keeps the model alive"


@contextmanager
def _nothing():
    yield
