"""What every console command shares: a quiet start, `--debug`, and errors as one line.

A command module keeps its imports of torch/transformers inside functions, so that `--help` answers at once:

    def main(argv=None) -> int:
        return run_command(_main, argv)

`_main(argv)` parses its arguments (with `add_debug_flag(parser)`) and does the work. An exception becomes
`<command>: error: <message>` on stderr and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

# Known third-party noise at import or load time, none of it actionable by a user of these commands.
NOISY_LOGGERS = (
    "torch.utils._pytree",  # torchao registers Enum constants the deprecated way (imported by transformers)
    "torch.utils.cpp_extension",  # "No CUDA runtime is found" when deepspeed is imported on a CPU machine
    "bitsandbytes",  # "Failed to load CPU gemm_4bit_forward" on machines without its CPU kernels
    "bitsandbytes.cextension",
    "deepspeed",
    "DeepSpeed",  # its own logger: "Setting accelerator to CPU" when imported on a machine without GPUs
    "accelerate.checkpointing",  # one line per file of every checkpoint; otter-train logs one line per checkpoint
    "accelerate.accelerator",
    "httpx",
    "httpx2",  # openai 3.x logs each request through it
)
# Optional back-ends and the extra that installs each (pyproject.toml): a command that needs one and finds it missing
# says which extra to install.
EXTRAS = {
    "gradio": "demo", "peft": "train", "matplotlib": "train", "tensorboard": "train", "pandas": "train",
    "pyarrow": "train", "yaml": "train", "bitsandbytes": "quantization", "torchao": "quantization",
    "deepspeed": "deepspeed", "fastapi": "serve", "uvicorn": "serve", "openai": "serve", "pycocoevalcap": "eval",
    "sklearn": "eval", "lmms_eval": "eval",
}
NOISY_WARNINGS = (
    r".*is an Enum subclass and is now natively supported.*",
    r".*TRANSFORMERS_CACHE.*",
    r".*`torch_dtype` is deprecated.*",
)


def quiet_third_party() -> None:
    """Silence the warnings and log lines listed above; errors from those libraries still show."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def one_line(error: BaseException) -> str:
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXTRAS:
        extra = EXTRAS[error.name.split(".")[0]]
        return f"this needs {error.name}, which is not installed: pip install \"flamingo-otter-hf[{extra}]\""
    message = " ".join(str(error).split()) or type(error).__name__
    return message if isinstance(error, (ValueError, FileNotFoundError, OSError)) else f"{type(error).__name__}: {message}"


def run_command(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main(argv)` with the shared start and error handling; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  a command's last line of defence
        if "--debug" in argv:
            raise
        print(f"{os.path.basename(sys.argv[0]) or 'error'}: error: {one_line(error)} (--debug for the traceback)",
              file=sys.stderr)
        return 2


__all__ = ["add_debug_flag", "quiet_third_party", "run_command"]
