import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Loaders called without cache_dir write under tmp_path, never into the user's ~/.cache."""
    monkeypatch.setenv("REC2PM_CACHE", str(tmp_path / "default-cache"))
