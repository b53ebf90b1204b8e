"""The decoder's input LayerNorm (ModelConfig.input_norm): where it sits, and that off builds
the models of before it existed."""

from __future__ import annotations

import pytest
import torch

from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm_kernels.testing import cu_seqlens_of


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
def test_the_first_block_reads_normalised_inputs(backbone):
    """With the norm, scaling every input (item embedding plus position) leaves the output as
    it is (inputs of std 10 and more, far from the norm's eps); without it, the output changes."""
    lengths = [5, 1, 3]
    outputs = {}
    for input_norm in (True, False):
        torch.manual_seed(0)
        config = named_config(f"{backbone}-small", num_items=30, input_norm=input_norm)
        decoder = build_model("full", config).decoder.double().eval()
        with torch.no_grad():  # blocks whose updates are not negligible next to the input
            for p in decoder.parameters():
                p.add_(torch.randn_like(p) * 0.3)
            if decoder.position is not None:
                decoder.position.weight.zero_()  # so that scaling x scales the whole input
        x = torch.randn(sum(lengths), config.d_model, dtype=torch.float64)
        positions = torch.cat([torch.arange(n) for n in lengths])
        with torch.no_grad():
            runs = [decoder(x * s, positions, cu_seqlens_of(lengths), max(lengths)) for s in (10.0, 400.0)]
        outputs[input_norm] = runs
    torch.testing.assert_close(outputs[True][0], outputs[True][1], rtol=1e-5, atol=1e-5)
    assert (outputs[False][0] - outputs[False][1]).abs().max() > 1e-2


def test_off_builds_the_decoder_without_the_norm_and_its_weights():
    with_norm = build_model("full", named_config("sasrec-small", num_items=30))
    without = build_model("full", named_config("sasrec-small", num_items=30, input_norm=False))
    assert with_norm.config.input_norm and with_norm.decoder.input_norm is not None
    assert without.decoder.input_norm is None
    extra = set(with_norm.state_dict()) - set(without.state_dict())
    assert extra == {"decoder.input_norm.weight", "decoder.input_norm.bias"}
