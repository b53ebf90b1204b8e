"""GPU smoke test, the first stage of ``benchmarks/gpu.sh``: fails fast when the Triton backend is broken.

For every pattern, ``segment_attention(backend="triton")`` forward and backward in bf16 on
CUDA against the ``torch`` backend on the same inputs in fp32, within the project's error
budget (``rec2pm_kernels.testing``: the baseline is the dense oracle in bf16); then one
``cached_step_attention`` the same way.  Prints one line per check.

Exit status: 0 when every check passes, 1 on a mismatch or an error, 2 when there is no
CUDA device or the Triton backend is unavailable.
"""

from __future__ import annotations

import sys
import time
import traceback

import torch

from rec2pm_kernels import PATTERNS, backends, cached_step_attention, segment_attention
from rec2pm_kernels.ops.cached_step.oracle import cached_step_oracle
from rec2pm_kernels.ops.segment_attention.oracle import segment_attention_oracle
from rec2pm_kernels.testing import cu_seqlens_of, error_budget, max_abs_error, pattern_kwargs

SEGMENT_LEN, MEMORY_TOKENS = 200, 4
UNIT = SEGMENT_LEN + MEMORY_TOKENS
LENGTHS = [2 * UNIT + 37, 3 * UNIT, 1]  # a tail, whole units, a single item
HEADS, DIM = 2, 64
DTYPE = torch.bfloat16


def compare(name: str, got, ref, baseline) -> bool:
    ok = True
    for label, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, baseline, strict=True):
        err, budget = max_abs_error(g, r), error_budget(r, b, DTYPE)
        good = err <= budget  # False for NaN
        ok &= good
        print(f"  {name:<28} {label:<4} max err {err:.3e}  budget {budget:.3e}  {'ok' if good else 'MISMATCH'}")
    return ok


def check_pattern(pattern: str) -> bool:
    kw = pattern_kwargs(pattern, SEGMENT_LEN, MEMORY_TOKENS)
    cu = cu_seqlens_of(LENGTHS, device="cuda")
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, HEADS, DIM, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(total, HEADS, DIM, device="cuda", dtype=DTYPE)

    out = segment_attention(q, k, v, cu, max(LENGTHS), backend="triton", **kw)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    torch.cuda.synchronize()

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out32 = segment_attention(q32, k32, v32, cu, max(LENGTHS), backend="torch", **kw)
    ref = (out32, *torch.autograd.grad(out32, (q32, k32, v32), grad_out.float()))

    base_out = segment_attention_oracle(q, k, v, cu, upcast=False, **kw)
    baseline = (base_out, *torch.autograd.grad(base_out, (q, k, v), grad_out))
    return compare(f"segment_attention/{pattern}", got, ref, baseline)


def check_cached_step() -> bool:
    users, filled = 3, [0, 1, 3 * UNIT]
    capacity = max(filled) + 1
    q, k, v = (torch.randn(users, HEADS, DIM, device="cuda", dtype=DTYPE) for _ in range(3))
    k_cache = torch.randn(users, capacity, HEADS, DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(users, capacity, HEADS, DIM, device="cuda", dtype=DTYPE)
    seqlens = torch.tensor(filled, device="cuda", dtype=torch.int32)
    cu = torch.arange(users + 1, device="cuda", dtype=torch.int32)
    with torch.inference_mode():
        baseline = cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, upcast=False)
        ref = cached_step_attention(
            q.float(), k.float(), v.float(), cu, 1, k_cache.float(), v_cache.float(), seqlens, backend="torch"
        )
        got = cached_step_attention(q, k, v, cu, 1, k_cache.clone(), v_cache.clone(), seqlens, backend="triton")
        torch.cuda.synchronize()
    return compare("cached_step_attention", (got,), (ref,), (baseline,))


def main() -> int:
    if not torch.cuda.is_available():
        print(
            f"gpu smoke: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "nothing to check"
        )
        return 2
    status = backends()["triton"]
    print(f"gpu smoke: {torch.cuda.get_device_name()} | torch {torch.__version__} | {status.reason}")
    if not status.available:
        return 2
    torch.manual_seed(0)
    ok = True
    for name, check in [
        *((f"segment_attention/{p}", lambda p=p: check_pattern(p)) for p in PATTERNS),
        ("cached_step_attention", check_cached_step),
    ]:
        start = time.perf_counter()
        try:
            passed = check()
        except Exception:  # report every check, then fail
            traceback.print_exc()
            passed = False
        ok &= passed
        print(f"{name}: {'passed' if passed else 'FAILED'} ({time.perf_counter() - start:.1f} s)", flush=True)
    print("gpu smoke:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
