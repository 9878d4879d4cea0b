"""What the bad-input tests check of a refusal: a command-line usage error, and that nothing on disk changed."""

import hashlib
from pathlib import Path

import pytest


def usage_error(parse, argv, capsys) -> str:
    """`parse(argv)` exits as argparse does on a bad flag (status 2); returns what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path ({} for a folder that does not exist)."""
    if not folder.exists():
        return {}
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
