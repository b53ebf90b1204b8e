"""Ahead-of-time compile check of the Triton kernels (``python -m rec2pm_kernels.aot``).

The compile runs in a subprocess without ``TRITON_INTERPRET``: ``@triton.jit`` reads the
flag at import, so a process that imported the kernels for the interpreter cannot compile
them.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("triton")

from rec2pm_kernels import aot  # noqa: E402
from rec2pm_kernels.ops.triton_args import MODEL_SIZES, TUPLE_ARGS  # noqa: E402
from rec2pm_kernels.ops.triton_configs import config_key, configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _without_interpreter() -> dict:
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def _expected_values(arch: int, kernel: str) -> dict[str, set]:
    """Every value a covering run must show for ``kernel`` on ``arch``."""
    values = dict(
        score=set(aot.SCORES),
        dtype=set(aot.DTYPES),
        head_dim=set(aot.HEAD_DIMS),
        precision={"ieee", "tf32"},
        has_bias={False, True},
        config={
            (dtype, head_dim, config_key(c))
            for dtype, torch_dtype in aot.DTYPES.items()
            for head_dim in aot.HEAD_DIMS
            for c in configs(kernel, torch_dtype, head_dim, arch)
        },
    )
    if kernel == "cached_step":
        values["num_splits"] = set(aot.NUM_SPLITS)
    else:
        values["pattern"] = set(aot.PATTERNS)
        values["has_dropout"] = {False, True}
        values["has_time_bias"] = {False, True}
    return values


def _covered_values(rows) -> dict[tuple, dict[str, set]]:
    covered = defaultdict(lambda: defaultdict(set))
    for row in rows:
        seen = covered[(row["arch"], row["kernel"])]
        for name in ("score", "dtype", "head_dim", "precision", "num_splits", "pattern", *aot.SWITCHES):
            seen[name].add(row[name])
        seen["config"].add((row["dtype"], row["head_dim"], row["config"]))
    return covered


def _assert_covers(rows, archs) -> None:
    covered = _covered_values(rows)
    for arch in archs:
        for kernel in aot.KERNELS:
            for name, values in _expected_values(arch, kernel).items():
                missing = values - covered[(arch, kernel)][name]
                assert not missing, f"sm_{arch} {kernel}: {name} {sorted(missing, key=str)} never compiled"


def test_subset_covers_every_value_of_the_full_product():
    full = aot.all_specialisations()
    subset = aot.covering_subset(full)
    assert len(subset) < len(full) / 10
    edge = [spec for spec in full if aot.at_the_register_edge(spec)]
    assert len(edge) == 2 * 4 * 3 and set(edge) <= set(subset)  # archs x segment kernels x (fp16, fp32 ieee/tf32)
    rows = [dict(vars(spec), config=spec.config) for spec in subset]
    _assert_covers(rows, aot.ARCHS)


def test_lengths_are_not_specialised():
    """Every loose integer argument is a runtime value that changes with the batch;
    specialising it (value 1, multiple of 16) would recompile on ragged batches.  Tuple
    arguments are specialised (``do_not_specialize`` cannot reach inside them), so the only
    integers they may hold are strides and the sizes a model fixes."""
    specs = aot.all_specialisations(archs=(90,))
    for kernel in aot.KERNELS:
        spec = next(s for s in specs if s.kernel == kernel)
        fn = aot._kernel_function(kernel)
        unspecialised = {param.name for param in fn.params if param.do_not_specialize}
        loose, in_tuples = set(), set()
        for name, kind in aot.compile_source(spec).signature.items():
            if isinstance(kind, tuple):
                in_tuples |= {member for member, t in zip(TUPLE_ARGS[name], kind, strict=True) if t in ("i32", "i64")}
            elif kind in ("i32", "i64"):
                loose.add(name)
        assert loose, kernel
        assert loose <= unspecialised, f"{kernel} specialises {sorted(loose - unspecialised)}"
        sizes = {name for name in in_tuples if not name.startswith("stride_")}
        assert sizes <= MODEL_SIZES, f"{kernel} specialises {sorted(sizes - MODEL_SIZES)} inside a tuple"


def test_refuses_to_run_under_the_interpreter():
    env = dict(_without_interpreter(), TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "rec2pm_kernels.aot", "--subset"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "TRITON_INTERPRET" in result.stderr


@pytest.mark.parametrize("count", [1, 3, 7])
def test_shards_split_the_product_into_disjoint_parts(count):
    full = aot.all_specialisations()
    shards = [aot.shard_of(full, (index, count)) for index in range(1, count + 1)]
    assert sorted(map(repr, itertools.chain(*shards))) == sorted(map(repr, full))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", ""])
def test_a_shard_is_i_of_n(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--shard must be I/N"):
        aot.parse_shard(text)


def _fake_report(path, specs, shard, failing=()):
    """A --json report of ``specs`` as a compile would write it, without compiling."""
    rows = [
        dict(vars(spec), config=spec.config, shared=1024, registers=64, stack=0, local=0, spill=None, seconds=0.5)
        | dict(failures=["shared memory 1 B > limit"] if i in failing else [])
        for i, spec in enumerate(specs)
    ]
    run = dict(archs=[90], subset=True, shard=list(shard))
    path.write_text(json.dumps(dict(run=run, summary=dict(wall_seconds=2.0), results=rows)))
    return str(path)


def test_merge_summarises_the_shards_of_one_run(tmp_path, capsys):
    subset = aot.covering_subset(aot.all_specialisations((90,)))
    one = _fake_report(tmp_path / "1.json", aot.shard_of(subset, (1, 2)), (1, 2))
    two = _fake_report(tmp_path / "2.json", aot.shard_of(subset, (2, 2)), (2, 2), failing={3})
    summary, failed = aot.merge_reports([two, one])
    assert summary["specialisations"] == len(subset) and summary["wall_seconds"] == 4.0
    assert summary["archs"][90]["failures"] == 1 and len(failed) == 1 and "shared memory" in failed[0]
    assert aot.main(["--merge", one, two]) == 1
    assert "=== 1 failures ===" in capsys.readouterr().out


def test_merge_refuses_what_is_not_one_whole_run(tmp_path, capsys):
    subset = aot.covering_subset(aot.all_specialisations((90,)))
    one = _fake_report(tmp_path / "1.json", aot.shard_of(subset, (1, 2)), (1, 2))
    two = _fake_report(tmp_path / "2.json", aot.shard_of(subset, (2, 2)), (2, 2))
    wrong = _fake_report(tmp_path / "w.json", aot.shard_of(subset, (1, 2)), (2, 2))
    of_three = _fake_report(tmp_path / "3.json", aot.shard_of(subset, (3, 3)), (3, 3))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for paths, message in [
        ([one], "shards 2/2 are missing"),
        ([one, one, two], "are both shard 1/2"),
        ([one, wrong], "w.json: its results are not the specialisations of shard 2/2"),
        ([one, of_three], "3.json is a shard of another run"),
        ([str(broken), one], "broken.json: not a report"),
    ]:
        with pytest.raises(ValueError, match=message):
            aot.merge_reports(paths)
    assert aot.main(["--merge", one]) == 2
    assert "shards 2/2 are missing" in capsys.readouterr().err


def test_compiles_are_ordered_by_the_seconds_an_earlier_report_measured(tmp_path, capsys):
    subset = aot.covering_subset(aot.all_specialisations((90,)))
    earlier = _fake_report(tmp_path / "1.json", aot.shard_of(subset, (1, 2)), (1, 2))
    report = json.loads(open(earlier).read())
    # Measured the slowest: the class the heuristic ranks last of those the earlier shard holds
    # (as segment_bwd_bias at M16_N16 with 8 warps was: 3-14 s against about 1 s).
    later = aot.shard_of(subset, (2, 2))
    earlier_classes = {aot._compile_class(aot._spec_of(row)) for row in report["results"]}
    slow = [spec for spec in aot.compile_order(later) if aot._compile_class(spec) in earlier_classes][-1]
    for row in [r for r in report["results"] if aot._compile_class(aot._spec_of(r)) == aot._compile_class(slow)]:
        row["seconds"] = 9.0
    open(earlier, "w").write(json.dumps(report))
    costs = aot.measured_costs([earlier])
    ordered = aot.compile_order(later, costs)
    assert sorted(map(repr, ordered)) == sorted(map(repr, later))
    measured = [costs.get(aot._compile_class(spec)) for spec in ordered]
    unmeasured = measured.count(None)
    assert None not in measured[unmeasured:], "classes never measured come first"
    assert measured[unmeasured:] == sorted(measured[unmeasured:], reverse=True)
    assert aot._compile_class(ordered[unmeasured]) == aot._compile_class(slow)
    broken = tmp_path / "broken.json"
    broken.write_text("[]")
    with pytest.raises(ValueError, match="broken.json: not a report"):
        aot.measured_costs([str(broken)])
    assert aot.main(["--order-from", str(broken)]) == 2
    assert "broken.json" in capsys.readouterr().err


@pytest.mark.aot
def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    """Every pattern, score, bias, dtype, head dim and config compiles for sm_80 and sm_90,
    within shared memory and without spills; prints the per-specialisation report."""
    report = tmp_path / "aot.json"
    result = subprocess.run(
        [sys.executable, "-m", "rec2pm_kernels.aot", "--subset", "--json", str(report)],
        cwd=ROOT,
        env=_without_interpreter(),
        capture_output=True,
        text=True,
    )
    print(result.stdout)
    print(result.stderr, file=sys.stderr)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = json.loads(report.read_text())["results"]
    assert all(not row["failures"] for row in rows)
    _assert_covers(rows, aot.ARCHS)
