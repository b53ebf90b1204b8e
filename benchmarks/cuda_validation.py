"""Writes the record of the CUDA kernels' check against the oracle (``benchmarks/gpu.sh``).

    python benchmarks/cuda_validation.py JUNIT_XML PYTEST_EXIT OUT_JSON

The record says whether every test ran and passed, with the device and the versions, so a
later change of ``backend="auto"`` can point at the run that justifies it.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import torch

import rec2pm_kernels


def main(junit: str, exit_code: str, out: str) -> None:
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    status = rec2pm_kernels.backends()["cuda"]
    ran = counts["tests"] - counts["skipped"]
    record = dict(
        passed=int(exit_code) == 0 and status.available and ran > 0,
        exit=int(exit_code),
        ran=ran,
        **counts,
        available=status.available,
        reason=status.reason,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"{out}: {record}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
