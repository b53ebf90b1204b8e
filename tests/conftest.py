import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


def require_extension():
    """Skip without the compiled extension, unless REC2PM_REQUIRE_EXT=1 (CI) makes that a failure."""
    from rec2pm_kernels import _extension

    if _extension.C is None:
        if os.environ.get("REC2PM_REQUIRE_EXT") == "1":
            pytest.fail(f"REC2PM_REQUIRE_EXT=1 but rec2pm_kernels._C is missing: {_extension.IMPORT_ERROR}")
        pytest.skip(f"rec2pm_kernels._C not built: {_extension.IMPORT_ERROR}")
    return _extension.C
