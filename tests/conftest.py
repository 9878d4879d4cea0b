import pytest

from tiny_models import tiny_model


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Commands record the model otter-train wrote under $XDG_CACHE_HOME: keep the user's cache out of the tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def model():
    return tiny_model()
