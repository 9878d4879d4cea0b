"""flamingo.cli: what every command shares (one-line errors, --debug, the extra a missing back-end needs)."""

import pytest

from flamingo.cli import run_command


def failing(error: BaseException):
    def main(argv):
        raise error

    return main


def test_an_error_is_one_line_on_stderr_with_exit_status_2(capsys):
    assert run_command(failing(ValueError("--batch-size must be at least 1,\n  got 0")), ["--x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --batch-size must be at least 1, got 0 (--debug for the traceback)" in err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="boom"):
        run_command(failing(ValueError("boom")), ["--debug"])


def test_an_unexpected_error_names_its_type(capsys):
    assert run_command(failing(KeyError("vision_x")), []) == 2
    assert "error: KeyError: 'vision_x'" in capsys.readouterr().err


@pytest.mark.parametrize(("module", "extra"), [("gradio", "demo"), ("peft.tuners", "train"), ("bitsandbytes", "quantization")])
def test_a_missing_optional_dependency_names_its_extra(capsys, module, extra):
    assert run_command(failing(ModuleNotFoundError(f"No module named '{module}'", name=module)), []) == 2
    assert f'pip install "flamingo-otter-hf[{extra}]"' in capsys.readouterr().err


def test_the_exit_status_of_main_is_returned():
    assert run_command(lambda argv: 1, []) == 1
    assert run_command(lambda argv: None, []) == 0
