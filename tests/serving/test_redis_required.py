"""REC2PM_REQUIRE_REDIS=1 turns a missing or unreachable Redis into failures, not skips."""

import pytest

from .conftest import redis_test_url


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", None], ids=["unreachable", "unset"])
@pytest.mark.parametrize("required", [True, False])
def test_required_redis_fails_instead_of_skipping(monkeypatch, url, required):
    monkeypatch.delenv("REC2PM_TEST_REDIS_URL", raising=False)
    if url:
        monkeypatch.setenv("REC2PM_TEST_REDIS_URL", url)
    monkeypatch.setenv("REC2PM_REQUIRE_REDIS", "1" if required else "0")
    try:
        redis_test_url()
    except BaseException as exc:  # noqa: BLE001 (pytest's skip and fail outcomes are BaseExceptions)
        caught = exc
    else:
        caught = None
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    assert type(caught) is outcome, f"expected {outcome.__name__}, got {caught!r}"
    assert ("REC2PM_REQUIRE_REDIS=1" in str(caught)) == required
