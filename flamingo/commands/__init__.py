"""flamingo's console commands: each parses its arguments, then imports the library (so `--help` is instant)."""
