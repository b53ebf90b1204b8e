import os

import pytest

from rec2pm.run_config import build_run_config
from rec2pm.serving.errors import StoreError
from rec2pm.serving.store import open_store
from rec2pm.training import train


def redis_test_url() -> str:
    """REC2PM_TEST_REDIS_URL (scripts/services.sh start prints one); skip without it, unless
    REC2PM_REQUIRE_REDIS=1 makes a missing or unreachable server a failure."""
    url = os.environ.get("REC2PM_TEST_REDIS_URL")
    required = os.environ.get("REC2PM_REQUIRE_REDIS") == "1"
    if not url:
        if required:
            pytest.fail("REC2PM_REQUIRE_REDIS=1 but REC2PM_TEST_REDIS_URL is not set (bash scripts/services.sh start)")
        pytest.skip("REC2PM_TEST_REDIS_URL is not set (bash scripts/services.sh start prints one)")
    try:
        open_store(url).close()
    except StoreError as exc:
        if required:
            pytest.fail(f"REC2PM_REQUIRE_REDIS=1 but the Redis server is unreachable: {exc}")
        pytest.skip(f"Redis server unreachable: {exc}")
    return url


@pytest.fixture
def redis_url():
    url = redis_test_url()
    store = open_store(url)
    store.delete_all_for_tests()
    yield url
    store.delete_all_for_tests()
    store.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'memories.db'}"
    return request.getfixturevalue("redis_url")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A rec2pm-o checkpoint that ``train`` wrote: 12 users x 14 events, 30 items, S = 4, C = 2."""
    out = tmp_path_factory.mktemp("trained")
    settings = [
        'data.kind="synthetic"',
        "data.synthetic_users=12",
        "data.synthetic_length=14",
        "data.synthetic_items=30",
        "data.max_length=14",
        'model.config="sasrec-small"',
        "model.segment_len=4",
        "model.num_memory_tokens=2",
        'method.name="rec2pm-o"',
        "train.epochs=1",
        "train.batch_size=6",
        "train.progress=false",
        "train.eval_batch_size=12",
        "train.threads=1",
        f'train.out_dir="{out}"',
    ]
    train(build_run_config(None, settings))
    return out / "best.pt"
