"""The SASRec and HSTU blocks against float64 references written from their formulas.

Model-level tests compare one path of a decoder with another path of the same decoder, so
a block that lost a term (HSTU's U gate, SASRec's feed-forward residual) would pass them;
these references share nothing with the blocks but the weights.  SASRec's attention is
also checked against ``torch.nn.MultiheadAttention`` loaded with the same weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rec2pm.backbones.hstu import HSTUBlock
from rec2pm.backbones.sasrec import SASRecBlock
from rec2pm_kernels import segment_attention
from rec2pm_kernels.testing import cu_seqlens_of

D, HEADS = 12, 3
LENGTHS = [7, 1, 5]


def randomised(block: torch.nn.Module) -> torch.nn.Module:
    """Float64, eval mode, every parameter random (LayerNorm gains and biases too)."""
    block = block.double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return block


def causal_attend(**fixed):
    cu = cu_seqlens_of(LENGTHS)
    return lambda q, k, v, **options: segment_attention(q, k, v, cu, max(LENGTHS), **options, **fixed)


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def per_sequence(x):
    return torch.split(x, LENGTHS)


def sasrec_reference(block: SASRecBlock, x):
    """``y = x + W_o MHA(LN_1 x)``, ``out = y + W_2 gelu(W_1 LN_2 y + b_1) + b_2``, causal per sequence."""
    outs = []
    for xs in per_sequence(x):
        n, d = xs.shape
        h = layer_norm(xs, block.attn_norm)
        q, k, v = (
            linear(h, layer).view(n, HEADS, d // HEADS).transpose(0, 1)
            for layer in (block.query, block.key, block.value)
        )
        scores = q @ k.transpose(1, 2) / (d // HEADS) ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, d)
        y = xs + linear(attended, block.attn_out)
        first, second = block.ffn[0], block.ffn[3]
        outs.append(y + linear(F.gelu(linear(layer_norm(y, block.ffn_norm), first)), second))
    return torch.cat(outs)


def hstu_reference(block: HSTUBlock, x):
    """``U, V, Q, K = split(silu(f1(LN x)))``; ``A = silu(Q K^T / sqrt(dh) + rab[i - j]) / n`` on
    ``j <= i``; ``out = x + f2(LN(A V) * U)``."""
    outs = []
    buckets = block.rel_bias.shape[1]
    for xs in per_sequence(x):
        n, d = xs.shape
        u, v, q, k = F.silu(linear(layer_norm(xs, block.input_norm), block.f1)).split(d, dim=-1)
        heads = [t.view(n, HEADS, d // HEADS).transpose(0, 1) for t in (v, q, k)]
        v_h, q_h, k_h = heads
        distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(0, buckets - 1)
        scores = q_h @ k_h.transpose(1, 2) / (d // HEADS) ** 0.5 + block.rel_bias[:, distance]
        weights = F.silu(scores) / block.silu_norm * torch.ones(n, n, dtype=torch.float64).tril()
        attended = (weights @ v_h).transpose(0, 1).reshape(n, d)
        outs.append(xs + linear(layer_norm(attended, block.output_norm) * u, block.f2))
    return torch.cat(outs)


def test_sasrec_block_equals_its_formula():
    block = randomised(SASRecBlock(D, HEADS, dropout=0.0))
    x = torch.randn(sum(LENGTHS), D, dtype=torch.float64)
    torch.testing.assert_close(block(x, causal_attend()), sasrec_reference(block, x), rtol=1e-12, atol=1e-12)


def test_sasrec_attention_equals_torch_multihead_attention():
    block = randomised(SASRecBlock(D, HEADS, dropout=0.0))
    mha = torch.nn.MultiheadAttention(D, HEADS, bias=True, batch_first=True).double().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([block.query.weight, block.key.weight, block.value.weight]))
        mha.in_proj_bias.copy_(torch.cat([block.query.bias, torch.zeros(D, dtype=torch.float64), block.value.bias]))
        mha.out_proj.weight.copy_(block.attn_out.weight)
        mha.out_proj.bias.copy_(block.attn_out.bias)
    x = torch.randn(sum(LENGTHS), D, dtype=torch.float64)
    # The block's attention sublayer alone: the block with its feed-forward branch cut off.
    with torch.no_grad():
        for p in block.ffn[3].parameters():
            p.zero_()
    want = []
    for xs in per_sequence(x):
        h = layer_norm(xs, block.attn_norm)[None]
        mask = torch.ones(xs.shape[0], xs.shape[0], dtype=torch.bool).triu(1)
        want.append(xs + mha(h, h, h, attn_mask=mask, need_weights=False)[0][0])
    torch.testing.assert_close(block(x, causal_attend()), torch.cat(want), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("buckets", [2, 16])  # 2: distances past 1 share the last bucket
def test_hstu_block_equals_its_formula(buckets):
    block = randomised(HSTUBlock(D, HEADS, dropout=0.0, num_buckets=buckets, silu_norm=6.0))
    x = torch.randn(sum(LENGTHS), D, dtype=torch.float64)
    torch.testing.assert_close(block(x, causal_attend()), hstu_reference(block, x), rtol=1e-12, atol=1e-12)
