import os

import pytest
import torch


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
