"""Skip marks for tests that need an optional extra or tool, each saying what to install."""

import importlib.util
import shutil

import pytest

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer (CIDEr) runs Java")
needs_eval_extra = pytest.mark.skipif(
    any(importlib.util.find_spec(module) is None for module in ("pycocoevalcap", "sklearn")),
    reason="needs the `eval` extra (CIDEr from pycocoevalcap, ROC AUC from scikit-learn): pip install -e '.[eval]'",
)
