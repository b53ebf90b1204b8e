"""The ``target`` fixture: each kernel test module that declares ``OP`` runs on every backend
of ``targets.TARGETS`` implementing it.  A test that also takes one of ``TARGET_AXES`` (its
dtypes, head dims or cache cases) runs over that target's values of it."""

import itertools

import pytest

from .targets import dtype_id, targets_of

# Arguments whose values depend on the target: name -> (values of a target, id of a value).
TARGET_AXES = {
    "dtype": (lambda t: t.dtypes, dtype_id),
    "head_dims": (lambda t: t.head_dims, lambda dims: f"d{dims[0]}v{dims[1]}"),
    "cache_case": (lambda t: t.cache_cases, lambda case: case[0]),
}


def pytest_generate_tests(metafunc):
    if "target" not in metafunc.fixturenames:
        return
    op = getattr(metafunc.module, "OP", None)
    if op is None:
        raise pytest.UsageError(f"{metafunc.module.__name__} takes the target fixture but declares no OP")
    axes = [name for name in TARGET_AXES if name in metafunc.fixturenames]
    params = []
    for target in targets_of(op):
        for values in itertools.product(*(TARGET_AXES[name][0](target) for name in axes)):
            ids = [target.id] + [TARGET_AXES[name][1](value) for name, value in zip(axes, values, strict=True)]
            params.append(pytest.param(target, *values, marks=target.marks, id="-".join(ids)))
    metafunc.parametrize(["target", *axes], params)


@pytest.fixture(autouse=True)
def _target_available(request):
    """Skip a target this installation cannot run, before the test builds its inputs."""
    callspec = getattr(request.node, "callspec", None)
    target = callspec.params.get("target") if callspec else None
    if target is not None:
        target.require()
