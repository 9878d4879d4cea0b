import os
import tempfile

import pytest
from tiny_models import tiny_model

# otter-train records the model it wrote under $XDG_CACHE_HOME, and the other commands read it: keep the user's cache
# out of the tests, subprocesses included (set before any test module builds an environment from os.environ).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="otter-tests-cache-")


@pytest.fixture
def model():
    return tiny_model()
