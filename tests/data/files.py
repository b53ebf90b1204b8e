"""Helpers for the data tests: small files in tmp_path and the shared data folder beside the checkout.

The real data sets are read from ``$REC2PM_SHARED_DATA``, by default the ``shared/data``
folder beside the checkout.  When a file is missing the test fails if
``REC2PM_REQUIRE_SHARED_DATA=1`` (``scripts/test.sh`` sets it, so CI cannot pass by skipping
them), and is skipped otherwise: run ``REC2PM_REQUIRE_SHARED_DATA=0 bash scripts/test.sh``
without the data.
"""

import gzip
import os
from pathlib import Path

import pytest

# By default the shared folder sits beside the checkout: <parent>/<checkout> and <parent>/shared.
SHARED_DATA = Path(os.environ.get("REC2PM_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, gzip-compressed when the name ends with ``.gz``."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def shared_file(relative: str) -> Path:
    """The shared data file, or skip the test saying where it was looked for."""
    path = SHARED_DATA / relative
    if not path.is_file():
        message = f"shared data file not found: {path} (set REC2PM_SHARED_DATA to the data folder)"
        if os.environ.get("REC2PM_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + "; REC2PM_REQUIRE_SHARED_DATA=1 makes this a failure, set it to 0 to skip")
        pytest.skip(message)
    return path
