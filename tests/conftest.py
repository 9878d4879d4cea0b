import pytest

from tiny_models import tiny_model


@pytest.fixture
def model():
    return tiny_model()
