"""Helpers the test modules share (fixtures live in conftest.py): running the CLI in process and checking a refusal."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from canvasrt.cli import main


def cli(*args: object, catch_exceptions: bool = True, input: str | None = None) -> Result:
    """`canvasrt ARGS...` in this process; arguments are turned into strings (paths, numbers); `input` is standard
    input."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch_exceptions, input=input)


def assert_refused(result: Result, *fragments: str) -> str:
    """Exit code 2 and one `error:` line, the last on stderr (after any progress line), holding every fragment; no
    traceback. Returns the line."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def bidirectional_images(checkpoint: Path, value: str | None) -> Path:
    """Sets the checkpoint config's `use_bidirectional_attention` ("vision": images attend bidirectionally within
    themselves, as the released config has it; None: causal throughout). Returns the checkpoint."""
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = value
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    return checkpoint
