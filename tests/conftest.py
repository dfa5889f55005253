"""Shared fixtures: tiny random checkpoints written through transformers, and their exported artifacts.

Session-scoped because exports take tens of seconds, and built once for the whole run: pytest-xdist's workers share
them (see `_built_once`). Tests must not modify them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

from canvasrt.exporter.export import export
from canvasrt.model.random_checkpoint import (
    PRESETS,
    build_random_model,
    byte_level_tokenizer,
    generation_config,
    preset_text,
    write_random_checkpoint,
)
from support import bidirectional_images, cli

# Two cores in CI; one intra-op thread keeps torch from oversubscribing them next to ONNX Runtime.
torch.set_num_threads(1)

# Fixtures whose first use costs tens of seconds (an FP8 calibration, TensorRT-RTX engines) and the Triton models'
# environment, which every test that starts a server needs: a test that asks for one, directly or through another
# fixture, is in the slow tier. Other expensive tests carry `@pytest.mark.slow` themselves.
SLOW_FIXTURES = {"sort_fp8", "tiny_fp8_artifacts", "tiny_engines", "triton_env"}


# The files that take longest in the full suite, longest first. scripts/test.sh hands whole files to its two workers
# in collection order (`--dist loadfile --no-loadscope-reorder`), so these start first and the shorter files fill in
# behind them: the workers finish close together instead of one of them starting a long file near the end.
LONGEST_FILES = (
    "test_integrity.py",
    "test_engine_build.py",
    "test_triton.py",
    "test_bad_input.py",
    "test_vision.py",
    "test_calibration.py",
    "test_openai.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# A second geometry, different from the tiny preset on every axis the graphs depend on: no GQA on sliding layers,
# a full layer first, top-1 routing, a window longer than the prompt of the step parity (so the ring wraps later),
# another vocabulary size; same canvas so transfer sizes stay comparable.
VARIANT = dict(
    vocab_size=320,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    layer_types=["full_attention", "sliding_attention", "full_attention"],
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=24,
    global_head_dim=16,
    num_global_key_value_heads=2,
    num_experts=3,
    top_k_experts=1,
    moe_intermediate_size=16,
    sliding_window=20,
    max_position_embeddings=1024,
    initializer_range=0.2,
)


def _write_checkpoint(
    path: Path,
    text: dict,
    canvas: int = 16,
    seed: int = 0,
    old_format: bool = False,
    shard: str | None = None,
    eos_boost: float | None = None,
) -> Path:
    """A random checkpoint saved by transformers (optionally sharded, or rewritten in the older config format)."""
    model = build_random_model(text, canvas, seed)
    if eos_boost is not None:
        with torch.no_grad():  # make EOS the argmax often enough to exercise the loop's EOS/pad handling
            model.model.decoder.embed_tokens.weight[1] *= eos_boost
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), **kwargs)
    generation_config(max_new_tokens=2 * canvas, max_denoising_steps=12).save_pretrained(str(path))
    byte_level_tokenizer(text["vocab_size"]).save(str(path / "tokenizer.json"))
    if old_format:
        config = json.loads((path / "config.json").read_text())
        per_layer = config["text_config"].pop("per_layer_config")
        first_full = next(iter(per_layer.values()))
        text_config = config["text_config"]
        # per_layer_config records only what differs from the global values.
        text_config["global_head_dim"] = first_full.get("head_dim", text_config["head_dim"])
        text_config["num_global_key_value_heads"] = first_full.get(
            "num_key_value_heads", text_config["num_key_value_heads"]
        )
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(path)` once per test run. pytest-xdist's workers have base directories of their own under the run's;
    the artifacts live beside them, and the first worker to ask builds them while the others wait on its lock, so
    a checkpoint and its exports are the same files on every worker.

    The build writes into a temporary sibling that becomes `path` by a rename once `build` has returned, so `path`
    exists only complete: a build that fails (or a worker killed in the middle of one) leaves nothing that counts as
    built, and the next fixture call that asks for it, on any worker, builds it again."""
    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    shared = root / "shared"
    shared.mkdir(exist_ok=True)
    path = shared / name
    with FileLock(shared / f"{name}.lock"):
        if not path.exists():
            building = shared / f"{name}.building"
            shutil.rmtree(building, ignore_errors=True)  # what a worker killed while building left
            try:
                build(building)
            except BaseException:
                shutil.rmtree(building, ignore_errors=True)
                raise
            building.rename(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built_once(tmp_path_factory, "tiny-ckpt", lambda path: _write_checkpoint(path, PRESETS["tiny"]["text"]))


@pytest.fixture(scope="session")
def short_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset cut to its first two layers (a sliding and a full one), for tests whose export is refused at
    its end or whose outcome does not depend on the depth: an export traces every layer, so it takes about half as
    long."""
    return _built_once(tmp_path_factory, "short-ckpt", lambda path: _write_checkpoint(path, preset_text("tiny", 2)))


@pytest.fixture(scope="session")
def variant_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built_once(
        tmp_path_factory, "variant-ckpt", lambda path: _write_checkpoint(path, VARIANT, old_format=True, shard="40KB")
    )


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default export (no logits output), dense MoE, fp32, the vocabulary (288) in chunks of 100, 100 and 88."""
    return _built_once(
        tmp_path_factory, "tiny", lambda out: export(tiny_checkpoint, out, max_context=128, vocab_chunk=100)
    )


@pytest.fixture(scope="session")
def tiny_debug_artifacts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built_once(
        tmp_path_factory, "tiny-debug", lambda out: export(tiny_checkpoint, out, max_context=96, debug_logits=True)
    )


@pytest.fixture(scope="session")
def variant_artifacts(variant_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default export (no logits) of the variant: other vocabulary, context capacity and prefill chunking; the
    vocabulary (320) in chunks of 96 (the last of 32)."""
    return _built_once(
        tmp_path_factory,
        "variant",
        lambda out: export(variant_checkpoint, out, max_context=160, max_prefill=40, vocab_chunk=96),
    )


@pytest.fixture(scope="session")
def tiny_fp16_artifacts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp16 with weights streamed into external data files (converted from the fp32 checkpoint on the way)."""
    return _built_once(
        tmp_path_factory,
        "tiny-fp16",
        lambda out: export(tiny_checkpoint, out, dtype="fp16", max_context=96, debug_logits=True, external_data=True),
    )


@pytest.fixture(scope="session")
def tiny_sparse_artifacts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built_once(
        tmp_path_factory,
        "tiny-sparse",
        lambda out: export(tiny_checkpoint, out, moe="sparse", max_context=96, debug_logits=True),
    )


@pytest.fixture(scope="session")
def tiny_grouped_artifacts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built_once(
        tmp_path_factory,
        "tiny-grouped",
        lambda out: export(tiny_checkpoint, out, moe="grouped", max_context=96, debug_logits=True),
    )


@pytest.fixture(scope="session")
def eos_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny geometry whose EOS embedding is scaled up, so that EOS shows up in committed canvases."""
    return _built_once(
        tmp_path_factory,
        "eos-ckpt",
        lambda path: _write_checkpoint(path, PRESETS["tiny"]["text"], seed=3, eos_boost=2.0),
    )


@pytest.fixture(scope="session")
def write_checkpoint() -> Callable[..., Path]:
    """The writer behind the checkpoint fixtures, for tests that need a checkpoint of their own."""
    return _write_checkpoint


@pytest.fixture(scope="session")
def triton_env() -> Path:
    """The Triton models' Python environment (numpy<2), which scripts/setup.sh creates."""
    env = Path(os.environ.get("CANVASRT_TRITON_ENV", Path(__file__).resolve().parents[1] / ".venv-triton"))
    if not (env / "pyvenv.cfg").is_file():
        pytest.fail(f"{env} is missing: run scripts/setup.sh, which creates the Triton models' environment")
    return env


@pytest.fixture(scope="session")
def sort_checkpoint() -> Path:
    """The trained sort model (tests/fixtures/sort-tiny); read only."""
    return Path(__file__).parent / "fixtures" / "sort-tiny"


@pytest.fixture(scope="session")
def sort_artifacts(sort_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained sort model, exported in fp32, its vocabulary (32) in chunks of 12, 12 and 8."""
    return _built_once(
        tmp_path_factory, "sort", lambda out: export(sort_checkpoint, out, max_context=64, vocab_chunk=12)
    )


@pytest.fixture(scope="session")
def sort_fp8(sort_checkpoint: Path, sort_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained sort model's FP8 artifacts, calibrated on 32 prompts of the task's calibration split."""
    from canvasrt.calibration.calibrate import calibrate

    return _built_once(
        tmp_path_factory,
        "sort-fp8",
        lambda out: calibrate(sort_checkpoint, sort_artifacts, out, task="sort", samples=32),
    )


@pytest.fixture(scope="session")
def tiny_fp8_artifacts(tiny_checkpoint: Path, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's FP8 artifacts, calibrated on the built-in calibration prompts."""
    from canvasrt.calibration.calibrate import calibrate

    return _built_once(
        tmp_path_factory, "tiny-fp8", lambda out: calibrate(tiny_checkpoint, tiny_artifacts, out, samples=8)
    )


@pytest.fixture(scope="session")
def tiny_engines(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's fp32 engine for SM89 (TensorRT-RTX, ahead of time), built once through `canvasrt build`."""
    pytest.importorskip("tensorrt_rtx")

    def build(out: Path) -> None:
        result = cli("build", tiny_artifacts, "-o", out, "--target", "sm89")
        assert result.exit_code == 0, result.output

    return _built_once(tmp_path_factory, "tiny-sm89", build)


@pytest.fixture(scope="session")
def vision_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset (its tiny vision tower and image processor) with images attending bidirectionally, as the
    released config has it; two text layers (a sliding and a full one), which every vision test covers, so that
    its export, calibration and engines take about half as long."""
    return _built_once(
        tmp_path_factory,
        "vision-ckpt",
        lambda path: bidirectional_images(write_random_checkpoint(path, "tiny", layers=2), "vision"),
    )


@pytest.fixture(scope="session")
def vision_artifacts(vision_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vision checkpoint exported with --vision (vision.onnx beside a backbone that places soft tokens)."""
    return _built_once(
        tmp_path_factory,
        "vision",
        lambda out: export(vision_checkpoint, out, max_context=512, vocab_chunk=100, vision=True),
    )


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two random images of other sizes and aspect ratios (so they get other patch counts and padding)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    wide, tall = folder / "wide.png", folder / "tall.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(wide)
    Image.fromarray(rng.integers(0, 255, (200, 120, 3), dtype=np.uint8)).save(tall)
    return [wide, tall]
