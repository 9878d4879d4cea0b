"""The package as users install it: a wheel that carries its defaults, environment.yml, quiet and fast commands,
and the seams between flamingo and otter."""

import ast
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMANDS = PYPROJECT["project"]["scripts"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_flamingo_never_imports_otter():
    offenders = {str(p.relative_to(ROOT)) for p in (ROOT / "flamingo").rglob("*.py")
                 if any(name == "otter" or name.startswith("otter.") for name in imported_modules(p))}
    assert not offenders, f"flamingo/ must not import otter/: {sorted(offenders)}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_does_not_import_torch(command):
    """What makes `--help` answer at once: a command parses its arguments before it imports torch/transformers."""
    module, function = COMMANDS[command].split(":")
    probe = (f"import sys\nfrom {module} import {function}\ntry:\n    {function}(['--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'gradio', 'accelerate') if m in sys.modules)\n"
             "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert "HEAVY []" in result.stdout, f"{command} --help imports {result.stdout.split('HEAVY')[-1].strip()}"


def test_environment_yml_agrees_with_pyproject():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    python = next(d for d in conda if d.startswith("python="))
    minimum = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.removeprefix("python=").split("."))) >= tuple(map(int, minimum.split(".")))
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    (install,) = pip
    extras = re.fullmatch(r'-e "\.\[([a-z,]+)\]"', install).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]), "environment.yml names unknown extras"
    assert {"train", "demo"} <= set(extras)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh virtual environment with the built wheel installed --no-deps; its dependencies come from the test
    environment's site-packages (a .pth line: the editable install of this checkout is not seen there)."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (work / "dist").glob("*.whl")
    venv.create(work / "env", with_pip=False)
    env_python = work / "env" / "bin" / "python"
    site = subprocess.run([env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # pip skips a wheel "already installed with the same version": it must see no other install of this package, so
    # it runs before the .pth line (the test environment's editable install) and outside the checkout, with no
    # PYTHONPATH (the checkout's .egg-info, written by the wheel build).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=600, cwd=work, env=env)
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (Path(site) / "test-deps.pth").write_text(ours + "\n")
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    env.update(XDG_CACHE_HOME=str(work / "cache"), OMP_NUM_THREADS="1", PATH=f"{work / 'env' / 'bin'}:{env['PATH']}")
    return work / "env" / "bin", elsewhere, env


def run_installed(wheel_env, *command, timeout=600):
    bin_dir, cwd, env = wheel_env
    return subprocess.run([str(bin_dir / command[0]), *command[1:]], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


@pytest.mark.slow
def test_wheel_installed_outside_the_repo_runs_every_default(wheel_env):
    bin_dir, cwd, env = wheel_env
    where = subprocess.run([str(bin_dir / "python"), "-c", "import otter, flamingo; print(otter.__file__, flamingo.__file__)"],
                           capture_output=True, text=True, cwd=cwd, env=env)
    assert str(ROOT) not in where.stdout and "site-packages" in where.stdout, where.stdout + where.stderr

    trained = run_installed(wheel_env, "otter-train", "--max-steps", "2", "--batch-size", "4", "--eval-samples", "4")
    assert trained.returncode == 0, trained.stderr[-3000:]
    copier = json.loads((cwd / "outputs/otter-tiny/summary.json").read_text())["copying"]["from"]
    assert "site-packages" in copier and copier.endswith("tiny-otter-copier"), "the wheel ships the copier"

    generated = run_installed(wheel_env, "otter-generate", "--max-new-tokens", "2")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert f"model: {(cwd / 'outputs/otter-tiny/model').resolve()}" in generated.stdout, "the trained model is the default"

    planned = run_installed(wheel_env, "flamingo-memory", "otter-9b-llama", "--gpus", "2x24GB", "--strategy", "device_map")
    assert planned.returncode in (0, 1), planned.stderr[-3000:]  # 1 = does not fit; either way a plan was printed
    assert "otter-9b-llama: training" in planned.stdout


@pytest.mark.slow
def test_an_error_is_one_line_and_debug_shows_the_traceback(wheel_env):
    missing = run_installed(wheel_env, "otter-generate", "--model", "./no/such/folder")
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert lines == ["otter-generate: error: model folder './no/such/folder' does not exist (nor is it a shipped "
                     "config: openflamingo-9b-llama, openflamingo-9b-mpt7b, otter-9b-llama, otter-9b-mpt7b, "
                     "otter-video-llama7b, tiny-flamingo, tiny-otter, tiny-otter-video) (--debug for the traceback)"], missing.stderr
    debug = run_installed(wheel_env, "otter-generate", "--model", "./no/such/folder", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
