import os
import tempfile
from pathlib import Path

# The models under test are tiny: a second thread buys nothing, and on a busy machine every op then waits for it to
# be scheduled (a 64x128 linear layer: 0.2 ms on one thread, 16 ms on two while other work holds the cores). Set
# before torch is imported, for this process and the commands the tests start.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

torch.set_num_threads(1)

# otter-train records the model it wrote under $XDG_CACHE_HOME, and the other commands read it: keep the user's cache
# out of the tests, subprocesses included (set before any test module builds an environment from os.environ). Compiled
# torch extensions are not user state: DeepSpeed's shared-memory op, built once by .ci/run (minutes on 2 cores), is
# found through a link to the user's folder instead of being rebuilt in every test session.
_user_extensions = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="otter-tests-cache-")
_user_extensions.mkdir(parents=True, exist_ok=True)
(Path(os.environ["XDG_CACHE_HOME"]) / "torch_extensions").symlink_to(_user_extensions, target_is_directory=True)


@pytest.fixture
def model():
    return tiny_model()
