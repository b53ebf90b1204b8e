"""The model layer chooses its kernels: ``ModelConfig.kernels`` reaches every attention call,
the backends it picks agree, and it is set from a run config and left out of fingerprints."""

from __future__ import annotations

import pytest
import torch

import rec2pm.backbones.decoder as decoder_module
from rec2pm.backbones import fused_step
from rec2pm.backbones.decoder import caches_from_kv
from rec2pm.config import KernelOptions, ModelConfig, named_config
from rec2pm.methods import build_model
from rec2pm.run_config import build_run_config
from rec2pm.serving.fingerprint import model_fingerprint
from rec2pm_kernels.testing import cu_seqlens_of

from ..conftest import require_extension


def small_model(backbone: str, method: str = "full", **kernels):
    torch.manual_seed(0)
    config = named_config(f"{backbone}-small", num_items=40, kernels=KernelOptions(**kernels))
    return build_model(method, config).eval()


def record_calls(monkeypatch, name: str) -> list[dict]:
    """Every keyword set the decoder passes to ``name`` (``segment_attention`` or ``cached_step_attention``)."""
    calls, original = [], getattr(decoder_module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder_module, name, spy)
    return calls


def test_kernel_options_accept_a_table_and_check_their_fields():
    assert ModelConfig(kernels={"backend": "torch"}).kernels == KernelOptions(backend="torch")
    assert ModelConfig().kernels == KernelOptions()
    choices = r"\('auto', 'torch', 'triton', 'cpp', 'cuda'\)"
    with pytest.raises(ValueError, match=rf"kernels.backend must be one of {choices}"):
        ModelConfig(kernels={"backend": "metal"})
    with pytest.raises(TypeError, match="kernels.allow_tf32 must be true or false"):
        ModelConfig(kernels={"allow_tf32": "yes"})
    with pytest.raises(ValueError, match="unknown key kernels.backnd"):
        ModelConfig(kernels={"backnd": "torch"})
    with pytest.raises(TypeError, match="kernels must be a KernelOptions or a table"):
        ModelConfig(kernels="torch")


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
def test_every_attention_call_gets_the_models_kernel_options(monkeypatch, backbone):
    calls = record_calls(monkeypatch, "segment_attention")
    model = small_model(backbone, "rec2pm-o", backend="torch", allow_tf32=True, deterministic=True)
    items = torch.randint(1, 41, (30,))
    model.train()
    model(items, torch.tensor([0, 19, 30])).loss.backward()
    assert len(calls) >= 2 * model.config.num_layers  # Stage 1 and Stage 2, every layer
    assert {(c["backend"], c["allow_tf32"], c["deterministic"]) for c in calls} == {("torch", True, True)}


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
def test_cpp_and_torch_backends_score_alike(backbone):
    require_extension()
    items, cu = torch.randint(1, 41, (23,)), torch.tensor([0, 1, 12, 23])
    scores = {}
    for backend in ("torch", "cpp"):
        with torch.no_grad():
            scores[backend] = small_model(backbone, backend=backend).score_history(items, cu)
    torch.testing.assert_close(scores["cpp"], scores["torch"], rtol=2e-5, atol=2e-5)


def test_a_named_backend_turns_the_fused_step_off(monkeypatch):
    require_extension()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the fused step ran although the model names a backend")

    monkeypatch.setattr(fused_step, "fused_step", must_not_run)
    step_calls = record_calls(monkeypatch, "cached_step_attention")
    decoder = small_model("hstu", backend="torch").decoder
    prefix, d = [4, 2], decoder.config.d_model
    cu = cu_seqlens_of(prefix)
    with torch.no_grad():
        _, kv = decoder(torch.randn(6, d), torch.tensor([0, 1, 2, 3, 0, 1]), cu, 4, collect_kv=True)
        caches, seqlens = caches_from_kv(kv, cu, capacity=8)
        decoder.step(torch.randn(2, d), torch.tensor([4, 2]), cu_seqlens_of([1, 1]), 1, caches, seqlens)
    assert [c["backend"] for c in step_calls] == ["torch"] * decoder.config.num_layers


def test_run_config_sets_kernel_options_by_table_and_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nconfig = "sasrec-small"\n[model.kernels]\nbackend = "torch"\n')
    run = build_run_config(path, ["model.kernels.deterministic=true"])
    assert run["model"]["kernels"] == {"backend": "torch", "deterministic": True}
    assert named_config("sasrec-small", **{k: v for k, v in run["model"].items() if k != "config"}).kernels == (
        KernelOptions(backend="torch", deterministic=True)
    )
    with pytest.raises(ValueError, match="unknown key kernels.speed"):
        build_run_config(path, ["model.kernels.speed=3"])
    with pytest.raises(TypeError, match="model: kernels.allow_tf32 must be true or false"):
        build_run_config(path, ['model.kernels.allow_tf32="no"'])


def test_fingerprint_ignores_kernel_options():
    fingerprints = {model_fingerprint(small_model("sasrec", "rec2pm-o", backend=b)) for b in ("auto", "torch", "cpp")}
    assert len(fingerprints) == 1
    other = small_model("sasrec", "rec2pm-o")
    with torch.no_grad():
        other.item_embedding.weight[1, 0] += 1.0
    assert model_fingerprint(other) not in fingerprints
