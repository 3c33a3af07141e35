import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def leftovers(folder) -> list[str]:
    """Files in a folder, temporary ones included (for 'nothing left behind' checks)."""
    return sorted(os.listdir(folder))


@pytest.fixture(autouse=True)
def _private_hash_cache(monkeypatch, tmp_path_factory):
    """Each test gets its own hash cache (never the user's ~/.cache), outside its tmp_path."""
    monkeypatch.setenv("ASTOLFOMIX_CACHE", str(tmp_path_factory.mktemp("cache") / "hashes.json"))
