"""The generation loop: transformers' generate() reproduced bit for bit (torch, --rng hf), backends agreeing token
for token (counter mode), EOS/pad handling, adaptive stop, transfer sizes, CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from canvasrt.core.manifest import ArtifactManifest
from canvasrt.runtime.backends import open_backend
from canvasrt.runtime.backends.torch import TorchExecutor
from canvasrt.runtime.loop import generate, left_pad
from canvasrt.runtime.rng import make_draws
from canvasrt.runtime.settings import resolve_settings
from canvasrt.runtime.step import StepBackend
from canvasrt.validation.reference import Reference
from support import cli

# A confidence threshold above log(vocab) makes the adaptive stop depend on stability alone, so rows stop (and
# freeze) at different steps even in a random model.
EARLY_STOP = {"max_new_tokens": 48, "max_denoising_steps": 10, "confidence_threshold": 10.0, "stability_threshold": 1}


def hf_generate(checkpoint, rows, seed, **settings):
    ids, padding = left_pad(rows, 0)
    reference = Reference(checkpoint, attention="eager" if padding.all() else "sdpa")
    return reference.generate(ids, padding, seed, **settings)


@pytest.mark.parametrize(
    "rows", [[[9, 10, 11, 12, 13, 14, 15, 16, 17, 18]], [[9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41, 42, 43]]]
)
@pytest.mark.parametrize("overrides", [{"max_new_tokens": 40}, EARLY_STOP])
def test_generate_cli_torch_hf_equals_transformers(eos_checkpoint, tmp_path, rows, overrides):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows))
    args = [
        "generate",
        eos_checkpoint,
        "--prompts-file",
        prompts,
        "--backend",
        "torch",
        "--rng",
        "hf",
        "--seed",
        "11",
        "--json",
        "--threads",
        "1",
    ]
    for key, value in overrides.items():
        args += ["--" + key.replace("_", "-"), value]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    ours = json.loads(result.output)
    expected = hf_generate(eos_checkpoint, rows, 11, **overrides)
    assert ours["sequences"] == expected.sequences.tolist()
    assert ours["tokens_per_forward"] == expected.tokens_per_forward.tolist()


def test_eos_and_pad_handling_is_exercised(eos_checkpoint):
    """The EOS checkpoint really ends rows with EOS at different positions, followed by pads."""
    rows = [[9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41, 42, 43]]
    out = hf_generate(eos_checkpoint, rows, 11, **EARLY_STOP)
    new = out.sequences[:, 10:]
    first_eos = [row.index(1) for row in new.tolist()]
    assert first_eos[0] < 16 <= first_eos[1]  # one row ends in the first canvas, the other in the second
    assert all((row[i + 1 :] == 0).all() for row, i in zip(new, first_eos))
    assert (out.tokens_per_forward > 0).all()


def test_onnxruntime_equals_torch_in_counter_mode(tiny_checkpoint, tiny_artifacts):
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]
    ids, padding = left_pad(rows, 0)
    results = []
    for backend in (
        StepBackend(TorchExecutor(tiny_checkpoint, max_context=128)),
        open_backend(tiny_artifacts, "onnxruntime"),
    ):
        with backend:
            settings = resolve_settings(backend.spec.generation, EARLY_STOP)
            results.append(generate(backend, ids, padding, settings, make_draws("counter", 4, 2, 288, 16)))
    torch_result, ort_result = results
    assert np.array_equal(torch_result.sequences, ort_result.sequences)
    assert torch_result.steps_per_block == ort_result.steps_per_block
    assert np.array_equal(torch_result.tokens_per_forward, ort_result.tokens_per_forward)


def test_counter_draws_depend_on_row_seed_only():
    a = make_draws("counter", 0, 3, 100, 8, row_seeds=[5, 6, 7])
    b = make_draws("counter", 0, 1, 100, 8, row_seeds=[6])
    assert np.array_equal(a.initial_canvas(2)[1], b.initial_canvas(2)[0])
    assert np.array_equal(a.step(1, 3).uniforms[1], b.step(1, 3).uniforms[0])
    assert not np.array_equal(a.step(1, 3).uniforms[1], a.step(1, 4).uniforms[1])


@pytest.mark.parametrize("fixture", ["tiny_artifacts", "variant_artifacts"])
def test_loop_parity_cli(fixture, request, tiny_checkpoint, variant_checkpoint, tmp_path):
    artifacts = request.getfixturevalue(fixture)
    checkpoint = tiny_checkpoint if fixture == "tiny_artifacts" else variant_checkpoint
    result = cli("parity", checkpoint, artifacts, "--level", "loop", "--report", tmp_path / "r.json", "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    outputs = {(c["stage"], c["output"]) for c in report["checks"]}
    assert ("torch_hf_batch2", "sequences") in outputs and (
        "onnxruntime_vs_torch_block1",
        "committed_tokens",
    ) in outputs


def test_loop_parity_generates_what_max_new_tokens_says(tiny_checkpoint, tiny_artifacts, tmp_path):
    """--max-new-tokens: one canvas instead of the default two (what makes the released width's loop level half as
    long); with the step level it is refused, since that level generates nothing."""
    result = cli(
        "parity",
        tiny_checkpoint,
        tiny_artifacts,
        "--level",
        "loop",
        "--max-new-tokens",
        16,
        "--report",
        tmp_path / "r.json",
        "--threads",
        "1",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["info"]["settings"]["max_new_tokens"] == 16
    stages = {c["stage"] for c in report["checks"]}
    assert "onnxruntime_vs_torch_block0" in stages and "onnxruntime_vs_torch_block1" not in stages
    refused = cli("parity", tiny_checkpoint, tiny_artifacts, "--max-new-tokens", 16)
    assert refused.exit_code == 2 and "--max-new-tokens sets what the loop level generates" in refused.output


def _bytes_per_step(artifacts) -> float:
    with open_backend(artifacts, "onnxruntime") as backend:
        settings = resolve_settings(backend.spec.generation, {"max_new_tokens": 32, "max_denoising_steps": 4})
        ids, padding = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], 0)
        result = generate(
            backend, ids, padding, settings, make_draws("counter", 0, 2, backend.spec.model.vocab_size, 16)
        )
    return backend.crossing["denoise"] / result.timings["steps"]


def test_bytes_per_step_do_not_grow_with_vocabulary_or_context(tiny_artifacts, variant_artifacts, tiny_debug_artifacts):
    tiny, variant = _bytes_per_step(tiny_artifacts), _bytes_per_step(variant_artifacts)
    manifests = [json.loads((a / "manifest.json").read_text()) for a in (tiny_artifacts, variant_artifacts)]
    assert manifests[0]["model"]["vocab_size"] != manifests[1]["model"]["vocab_size"]
    assert manifests[0]["capacity"]["max_context"] != manifests[1]["capacity"]["max_context"]
    assert tiny == variant
    # batch 2 x canvas 16: a few int64/float32/bool planes, nowhere near one vocab row per position
    assert tiny < 2 * 16 * 64
    # The same measurement sees the logits of a --debug-logits export, so it would catch a [B, C, V] transfer.
    assert _bytes_per_step(tiny_debug_artifacts) > tiny + 2 * 16 * 288 * 4 - 1


def test_generate_text_prompt_json_and_watch(tiny_artifacts):
    result = cli(
        "generate",
        tiny_artifacts,
        "--prompt",
        "hello canvas",
        "--json",
        "--max-new-tokens",
        "16",
        "--max-denoising-steps",
        "3",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out["sequences"][0]) == len("hello canvas") + 16 and isinstance(out["text"][0], str)
    assert out["steps_per_block"] == [3] and out["backend"] == "onnxruntime"
    watch = cli(
        "generate",
        tiny_artifacts,
        "--prompt-ids",
        "5,6,7",
        "--watch",
        "--max-new-tokens",
        "16",
        "--max-denoising-steps",
        "3",
    )
    assert watch.exit_code == 0, watch.output
    assert "canvas 0, step 3" in watch.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", ",".join(["5"] * 200)], "more than the maximum context of 128"),
        (["--prompt-ids", "5,999"], "outside the vocabulary [0, 288)"),
        (["--prompt-ids", "5,6", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        (["--prompt-ids", "5,6", "--backend", "tensorflow"], "unknown backend 'tensorflow'"),
        (["--prompt-ids", "5,6", "--rng", "hf"], "--rng hf reproduces transformers' torch RNG"),
        (["--prompt", "x", "--prompt-ids", "5"], "exactly one of"),
    ],
)
def test_generate_bad_input(tiny_artifacts, args, message):
    result = cli("generate", tiny_artifacts, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_generate_refuses_broken_or_foreign_artifacts(tiny_artifacts, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither an artifact directory" in cli("generate", empty, "--prompt-ids", "5").output
    old = shutil.copytree(tiny_artifacts, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest))
    result = cli("generate", old, "--prompt-ids", "5")
    assert result.exit_code == 2 and "re-export it" in result.output
    (tmp_path / "nographs").mkdir()
    shutil.copy(tiny_artifacts / "manifest.json", tmp_path / "nographs" / "manifest.json")
    result = cli("generate", tmp_path / "nographs", "--prompt-ids", "5")
    assert result.exit_code == 2 and "lacks the backbone graph" in result.output


def test_bench_reports_backends_side_by_side(tiny_artifacts):
    result = cli(
        "bench",
        tiny_artifacts,
        "--backend",
        "onnxruntime",
        "--backend",
        "torch",
        "--backend",
        "transformers",
        "--steps",
        "3",
        "--prompt-length",
        "8",
        "--canvases",
        "2",
        "--threads",
        "1",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    entries = report["backends"]
    assert set(entries) == {"onnxruntime", "torch", "transformers"}
    assert entries["onnxruntime"]["steps_per_block"] == [3, 3]
    assert 0 <= entries["onnxruntime"]["host_overhead_share"] < 1
    # prefill and two canvases: at most three copies of the K/V buffers' slots over the six steps, not one per step
    kv_bytes = (
        2
        * 4
        * sum(
            layer.num_kv_heads * layer.slots * layer.head_dim
            for layer in ArtifactManifest.load(tiny_artifacts).kv_layout
        )
    )
    assert 0 < entries["onnxruntime"]["context_copy_bytes_per_step"] <= 3 * kv_bytes / 6
    # bytes per call between host and the executor's device: a step's canvas-sized arrays (batch 1, canvas 16); a
    # prefill's 8 ids and positions with the empty canvas group; a commit's 16
    for name in ("onnxruntime", "torch"):
        assert entries[name]["host_device_bytes"] == {"prefill": 8 * 16 + 16, "commit": 16 * 16 + 16, "denoise": 806}
    assert entries["torch"]["step_speedup_vs_onnxruntime"] > 0
    for name in ("onnxruntime", "torch"):  # batch 1: the working memory at one row, no growth per row
        memory = entries[name]["memory"]
        assert list(memory["working_bytes"]) == ["1"] and memory["working_bytes_per_row"] is None
        assert memory["peak_anonymous_bytes"]["1"] >= memory["loaded_anonymous_bytes"] > 0
    assert entries["onnxruntime"]["step_speedup_vs_transformers"] > 0


def test_bench_reports_working_memory_per_added_row(tiny_artifacts):
    from canvasrt.validation.bench import bench

    memory = bench(tiny_artifacts, ["onnxruntime"], 3, 8, 2, 1, 1)["backends"]["onnxruntime"]["memory"]
    assert list(memory["working_bytes"]) == ["1", "3"]
    working = memory["working_bytes"]
    assert memory["working_bytes_per_row"] == (working["3"] - working["1"]) / 2
    assert all(
        memory["peak_anonymous_bytes"][rows] == memory["loaded_anonymous_bytes"] + working[rows] for rows in working
    )


def test_chunked_prefill_equals_one_pass(variant_checkpoint, variant_artifacts):
    """A prompt longer than the artifacts' max_prefill (40) is prefilled in chunks; the torch backend takes it in
    one pass. Same tokens either way, past the sliding window (20) too."""
    assert json.loads((variant_artifacts / "manifest.json").read_text())["capacity"]["max_prefill"] == 40
    rows = [list(range(3, 3 + 93)), list(range(100, 150))]
    ids, padding = left_pad(rows, 0)
    results = []
    for backend in (
        StepBackend(TorchExecutor(variant_checkpoint, max_context=160)),
        open_backend(variant_artifacts, "onnxruntime"),
    ):
        with backend:
            settings = resolve_settings(backend.spec.generation, {"max_new_tokens": 32, "max_denoising_steps": 4})
            results.append(generate(backend, ids, padding, settings, make_draws("counter", 1, 2, 320, 16)))
    assert np.array_equal(results[0].sequences, results[1].sequences)
