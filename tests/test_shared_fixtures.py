"""conftest's `_built_once`, behind every shared session artifact: an artifact counts as built only complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import _built_once


def test_a_failed_build_leaves_nothing_built_and_the_next_call_builds_again(tmp_path_factory):
    name = "built-once-probe"
    calls: list[Path] = []

    def failing(path: Path) -> None:
        calls.append(path)
        path.mkdir()
        (path / "half").write_text("written before the build failed")
        raise RuntimeError("the build failed midway")

    def complete(path: Path) -> None:
        calls.append(path)
        path.mkdir()
        (path / "whole").write_text("the whole artifact")

    with pytest.raises(RuntimeError, match="failed midway"):
        _built_once(tmp_path_factory, name, failing)
    shared = calls[0].parent
    assert sorted(p.name for p in shared.iterdir() if p.name.startswith(name)) == [f"{name}.lock"]

    (shared / f"{name}.building").mkdir()  # what a worker killed while building leaves
    (shared / f"{name}.building" / "stale").write_text("from the killed build")
    path = _built_once(tmp_path_factory, name, complete)
    assert path == shared / name and sorted(p.name for p in path.iterdir()) == ["whole"] and len(calls) == 2
    assert not (shared / f"{name}.building").exists()

    assert _built_once(tmp_path_factory, name, failing) == path and len(calls) == 2  # built: not built again
