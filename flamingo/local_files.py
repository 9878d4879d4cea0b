"""Checks of a local model folder before transformers reads it, so that the errors name the folder or file.

Without them a mistyped folder is reported as `Repo id must be in the form 'repo_name' or
'namespace/repo_name'` (transformers takes a name that is not a folder for a hub id), and a truncated
safetensors file as `Error while deserializing header: ...` without saying which file.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

SAFETENSORS_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
_HEADER_LIMIT = 100 * 2**20  # safetensors itself refuses headers over 100 MB


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """Whether `name` can only be a folder on this machine: a hub id is `name` or `namespace/name`, so a path
    object, a path with two or more separators, or one starting with `/`, `.` or `~` is not one."""
    if isinstance(name, Path):
        return True
    text = os.fspath(name)
    return text.startswith(("/", ".", "~")) or text.replace(os.sep, "/").strip("/").count("/") >= 2 or "\\" in text


def check_local_model(name: str | os.PathLike, *, weights: bool = True, what: str = "model") -> None:
    """Raise a clear error for a local `what` folder (model, tokenizer, ...) that cannot load: missing, a file, or
    (with `weights`) a missing or truncated safetensors file. Hub ids and names that are not folders pass
    unchecked."""
    path = Path(os.path.expanduser(os.fspath(name)))
    if not path.exists():
        if looks_like_local_path(name):
            raise FileNotFoundError(f"{what} folder {name} does not exist")
        return
    if not path.is_dir():
        raise NotADirectoryError(f"{name} is a file; expected a {what} folder")
    if weights:
        check_safetensors_files(path)


def check_safetensors_files(folder: Path) -> None:
    """Every shard the index lists exists, and every `*.safetensors` file is as long as its header says."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as error:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {error}") from None
        for shard in shards:
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard}{_shard_label(shard)} is missing: {index.name} lists it")
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"{file}{_shard_label(file.name)} is damaged: {problem}. Save or download it again.")


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be read (truncated, bad header), or None; reads only its header."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"it has {size} bytes, fewer than the 8 of a safetensors header length"
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > _HEADER_LIMIT or 8 + header_length > size:
            return f"its header claims {header_length} bytes but the file has {size} (truncated, or not safetensors)"
        try:
            header = json.loads(handle.read(header_length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            return f"its header is not valid safetensors JSON ({error})"
    expected = 8 + header_length + end
    if size < expected:
        return f"it has {size} bytes but its tensors need {expected} (truncated)"
    return None


def _shard_label(name: str) -> str:
    match = _SHARD.search(name)
    return f" (shard {int(match.group(1))} of {int(match.group(2))})" if match else ""


__all__ = ["check_local_model", "check_safetensors_files", "looks_like_local_path", "safetensors_problem"]
