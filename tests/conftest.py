import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """``interpreter`` tests need ``TRITON_INTERPRET=1`` in their own process (the flag is read
    when the kernels are defined), ``gpu`` tests a CUDA device; elsewhere they are skipped
    with the reason."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if item.get_closest_marker("interpreter") and not interpreting:
            item.add_marker(
                pytest.mark.skip(
                    reason="needs TRITON_INTERPRET=1 in its own process (scripts/test.sh runs the interpreter stage)"
                )
            )
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _nan_filled_outputs():
    """Kernel outputs start as NaN in every test: a row no kernel writes cannot pass as zero."""
    from rec2pm_kernels.testing import nan_filled_outputs

    with nan_filled_outputs():
        yield


def require_extension():
    """Skip without the compiled extension, unless REC2PM_REQUIRE_EXT=1 (CI) makes that a failure."""
    from rec2pm_kernels import _extension

    if _extension.C is None:
        if os.environ.get("REC2PM_REQUIRE_EXT") == "1":
            pytest.fail(f"REC2PM_REQUIRE_EXT=1 but rec2pm_kernels._C is missing: {_extension.IMPORT_ERROR}")
        pytest.skip(f"rec2pm_kernels._C not built: {_extension.IMPORT_ERROR}")
    return _extension.C
