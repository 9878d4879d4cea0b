"""otter-generate end to end on the tiny defaults."""

import re

from otter.generate import main


def test_otter_generate_runs_on_the_tiny_defaults(capsys):
    main(["--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "GPT:<answer> red<|endofchunk|>" in out  # the two in-context examples are in the prompt
    assert "images: 3 (32 px)" in out and "answer:" in out
    generated = int(re.search(r"generated (\d+) tokens", out).group(1))
    assert 1 <= generated <= 4  # at most --max-new-tokens; fewer if <|endofchunk|> came first
