"""The model layer on the Triton kernels: every method's training loss and gradients, and the
serving step, equal the torch backend's (under TRITON_INTERPRET=1, fp32)."""

import pytest
import torch

from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm.toy_data import toy_histories
from rec2pm_kernels import interface

pytestmark = pytest.mark.interpreter

METHODS = ["rec2pm-o", "rec2pm-a", "full", "kv-mask-o", "kv-mask-a"]


def _force_backend(monkeypatch, name):
    """Make ``backend="auto"`` resolve to ``name`` (the model layer always asks for auto)."""
    real = interface.resolve_backend
    monkeypatch.setattr(
        interface,
        "resolve_backend",
        lambda requested, *a, **kw: name if requested == "auto" else real(requested, *a, **kw),
    )


def _loss_and_grads(monkeypatch, backend, method, config_name):
    _force_backend(monkeypatch, backend)
    torch.manual_seed(0)
    items, cu = toy_histories(num_users=3, length=23, num_items=40)
    model = build_model(method, named_config(config_name, num_items=40))
    loss = model(items, cu).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return loss, grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("config_name", ["sasrec-small", "hstu-small"])
def test_training_step_matches_torch_backend(monkeypatch, method, config_name):
    loss_torch, grads_torch = _loss_and_grads(monkeypatch, "torch", method, config_name)
    loss_triton, grads_triton = _loss_and_grads(monkeypatch, "triton", method, config_name)
    torch.testing.assert_close(loss_triton, loss_torch, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_triton, grads_torch, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_serving_steps_match_torch_backend(monkeypatch):
    results = []
    for backend in ("torch", "triton"):
        _force_backend(monkeypatch, backend)
        torch.manual_seed(0)
        items, cu = toy_histories(num_users=3, length=23, num_items=40)
        model = build_model("rec2pm-o", named_config("sasrec-small", num_items=40)).eval()
        with torch.no_grad():
            memory, tail, tail_cu = model.encode(items, cu)
            first = tail[tail_cu[:-1]]
            _, state = model.prefill(memory, first, torch.arange(4), capacity=32)
            results.append(model.step(state, torch.tensor([7, 8, 9]), torch.arange(4)))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
