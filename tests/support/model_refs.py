"""For the tests of model references (``shared.model_ref``): a private conversion cache per test, file hashes."""
import hashlib
from pathlib import Path

import pytest

from shared import model_ref


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Autouse in every test module that imports it: the conversion cache lives in the test's tmp_path."""
    monkeypatch.setenv(model_ref.CACHE_ENV, str(tmp_path / "om2-cache"))
    return tmp_path / "om2-cache"


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
