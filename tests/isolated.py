"""Run Python in a fresh process that has torch and transformers but cannot import this package, nor reach the
network: what a transformers user without `flamingo-otter-hf` has, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flamingo", "otter")

# Runs first in the child. The package may be installed in this environment (editable, as CI does), so `-I` alone
# does not hide it: a finder ahead of all others refuses its names. Every socket connection is refused and recorded.
PRELUDE = """
import importlib.abc, json, socket, sys

HIDDEN = {hidden!r}
ATTEMPTS = []

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden for this test)", name=name)
        return None

sys.meta_path.insert(0, Hide())

def refuse(*args, **kwargs):
    ATTEMPTS.append(repr(args[:2]))
    raise OSError("network access refused in this test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

def package_importable():
    try:
        import flamingo  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True

def report(**results):
    print("\\nRESULTS " + json.dumps({{**results, "package_importable": package_importable(),
        "package_modules": sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN), "network": ATTEMPTS}}))
"""


def run_isolated(code: str, cwd: Path, *, package: bool = False, timeout: float = 300) -> dict:
    """Run `code` (after `PRELUDE`; it must call `report(**results)`) with `HF_HUB_OFFLINE=1`, in `cwd`, and return
    what it reported plus `package_importable`, `package_modules` (loaded modules of this package) and `network`
    (refused connection attempts). With `package=True` the package is importable (from this checkout)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"), OMP_NUM_THREADS="1")
    if package:
        env["PYTHONPATH"] = str(REPO)
    flags = [] if package else ["-I"]
    prelude = PRELUDE.format(hidden=() if package else PACKAGES)
    result = subprocess.run(
        [sys.executable, *flags, "-c", prelude + code],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, f"child failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULTS "))
