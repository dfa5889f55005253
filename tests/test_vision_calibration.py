"""Images in FP8 calibration and in prompts files: calibration prompts whose images' soft tokens flow through the
prefill, the vision graph in FP8 on request (`calibrate --quantize-vision`) and in `parity --bisect`, and prompts
files whose prompts carry their own images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from canvasrt.calibration.ranges import collect_ranges
from canvasrt.core.manifest import ArtifactManifest
from canvasrt.model.fp8 import VISION_QUANTIZED
from canvasrt.model.random_checkpoint import write_random_checkpoint
from support import assert_refused, cli

IMAGE_TOKEN = 260  # the tiny preset's image token id


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole tiny preset (four text layers, its tiny vision tower and image processor), run by torch: images
    change its tokens, where the two-layer vision checkpoint's can come out the same."""
    return write_random_checkpoint(tmp_path_factory.mktemp("vision-cal") / "tiny", "tiny")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two random images of the same size (the same soft-token count) and different pixels."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    paths = [folder / "first.png", folder / "second.png"]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(path)
    return paths


def _new_ids(result: object) -> list[list[int]]:
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    return json.loads(result.stdout)["sequences"]  # type: ignore[attr-defined]


def test_a_prompts_file_carries_each_prompts_images(tiny_vision: Path, pictures: list[Path]) -> None:
    """Each line's "images" (relative to the prompts file) go with that prompt only: row i of the batch is the
    prompt generated alone with its own image and row i's seed."""
    prompts = pictures[0].parent / "prompts.jsonl"
    lines = [
        {"ids": [2, 70, IMAGE_TOKEN, 71], "images": [pictures[0].name]},
        {"ids": [2, 70, IMAGE_TOKEN, 72], "images": [str(pictures[1])]},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ("--json", "--max-new-tokens", "1", "--max-denoising-steps", "4")
    batch = _new_ids(cli("generate", tiny_vision, "--prompts-file", prompts, "--seed", "3", *common))
    for row, (line, picture) in enumerate(zip(lines, pictures)):
        ids = ",".join(map(str, line["ids"]))
        alone = cli("generate", tiny_vision, "--prompt-ids", ids, "--image", picture, "--seed", 3 + row, *common)
        assert _new_ids(alone)[0] == batch[row]
    swapped = prompts.with_name("swapped.jsonl")
    swapped.write_text(
        "".join(json.dumps({**line, "images": [p.name]}) + "\n" for line, p in zip(lines, pictures[::-1]))
    )
    assert _new_ids(cli("generate", tiny_vision, "--prompts-file", swapped, "--seed", "3", *common)) != batch


def test_prompts_file_images_bad_input_is_one_line(tiny_vision: Path, pictures: list[Path]) -> None:
    folder = pictures[0].parent
    bad = folder / "bad.jsonl"
    bad.write_text(json.dumps({"ids": [2, 70], "images": pictures[0].name}) + "\n")
    assert_refused(cli("generate", tiny_vision, "--prompts-file", bad), "bad.jsonl:1", '"images" must be a list')
    missing = folder / "missing.jsonl"
    missing.write_text(json.dumps({"ids": [2, 70], "images": ["absent.png"]}) + "\n")
    assert_refused(cli("generate", tiny_vision, "--prompts-file", missing), "absent.png does not exist")
    both = folder / "both.jsonl"
    both.write_text(json.dumps({"ids": [2, 70], "images": [pictures[0].name]}) + "\n")
    assert_refused(cli("generate", tiny_vision, "--prompts-file", both, "--image", pictures[1]), "not both")


def test_calibration_ranges_see_the_images_soft_tokens(tiny_vision: Path, pictures: list[Path]) -> None:
    """Calibration prompts with images put their soft tokens through the prefill (the backbone's ranges move);
    the vision model's GEMM inputs are recorded only when asked, one range per quantizable vision GEMM."""
    ids = [2, 70, IMAGE_TOKEN, 71, 72]
    text = collect_ranges(tiny_vision, [ids])
    imaged = collect_ranges(tiny_vision, [{"ids": ids, "images": [pictures[0]]}])
    other = collect_ranges(tiny_vision, [{"ids": ids, "images": [pictures[1]]}])
    assert set(text.amax) == set(imaged.amax)
    # the image's 60 soft tokens and its two markers in place of one token: 61 more prefill tokens routed to two
    # experts each, in every layer but the last, whose FFN the encoder skips
    routed = {name: sum(counts) for name, counts in text.expert_tokens.items()}
    assert {name: sum(counts) - routed[name] for name, counts in imaged.expert_tokens.items()} == {
        name: 0 if name.startswith("layers.3.") else 61 * 2 for name in routed
    }
    # the same prompt with other pixels: other soft tokens, other inputs to the first layer's GEMMs
    first = "layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(imaged.samples[first], other.samples[first])
    with_vision = collect_ranges(tiny_vision, [{"ids": ids, "images": [pictures[0]]}], vision=True)
    vision = {name for name in with_vision.amax if VISION_QUANTIZED.search(name)}
    assert vision == {
        *(f"vision_tower.encoder.layers.0.self_attn.{p}_proj.linear.weight" for p in "qkvo"),
        *(f"vision_tower.encoder.layers.0.mlp.{p}_proj.linear.weight" for p in ("gate", "up", "down")),
        "embed_vision.embedding_projection.weight",
    }
    assert all(with_vision.amax[name] > 0 for name in vision)
    assert {n: v for n, v in with_vision.amax.items() if n not in vision} == imaged.amax


def test_calibrate_refuses_images_artifacts_cannot_take(
    tiny_checkpoint: Path, tiny_artifacts: Path, pictures: list[Path], tmp_path: Path
) -> None:
    """Artifacts exported without --vision: --image and --quantize-vision are one line each, nothing written."""
    out = tmp_path / "fp8"
    args = ("calibrate", tiny_checkpoint, tiny_artifacts, "-o", out, "--samples", "1")
    assert_refused(cli(*args, "--image", pictures[0]), "exported without --vision", "re-export with --vision")
    assert_refused(cli(*args, "--quantize-vision"), "exported without --vision", "--quantize-vision")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"ids": [2, 70], "images": [str(pictures[0])]}) + "\n")
    assert_refused(cli(*args, "--prompts", prompts), "exported without --vision", "prompts with images")
    assert not out.exists()


@pytest.mark.slow
def test_fp8_vision_graph_calibrated_on_images_and_bisected(
    vision_checkpoint: Path, vision_artifacts: Path, pictures: list[Path], tmp_path: Path
) -> None:
    """`calibrate --image --quantize-vision`: vision.onnx gets Q/DQ on its encoder and projector GEMMs (not the patch
    embedding); ONNX Runtime on it generates the torch simulation's tokens; parity judges its soft tokens by FP8's
    budget; `parity --bisect --image` ranks its layers and projector, the soft tokens' error included. Bad input is
    one line and writes nothing."""
    fp8 = tmp_path / "fp8"
    calibrate = ("calibrate", vision_checkpoint, vision_artifacts)
    assert_refused(cli(*calibrate, "-o", fp8, "--quantize-vision"), "--quantize-vision", "pass --image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(pictures[0].read_bytes()[:60])
    assert_refused(cli(*calibrate, "-o", fp8, "--image", broken), "broken.png")
    assert not fp8.exists()
    result = cli(*calibrate, "-o", fp8, "--samples", "2", "--image", pictures[0], "--quantize-vision")
    assert result.exit_code == 0, result.output
    manifest = ArtifactManifest.load(fp8)
    assert manifest.quantization is not None and manifest.quantization.vision
    quantized = set(manifest.graphs["vision"].quantized or ())
    assert len(quantized) == 8 and all(VISION_QUANTIZED.search(name) for name in quantized)
    graph = onnx.load(str(fp8 / "vision.onnx"), load_external_data=False)
    dequantized = {node.input[1] for node in graph.graph.node if node.op_type == "Gemm"}
    assert "vision_tower.patch_embedder.input_proj.weight" in {i.removeprefix("model.") for i in dequantized}
    assert {f"{name}.dequantized" for name in quantized} <= dequantized

    args = ("--prompt-ids", f"2,70,{IMAGE_TOKEN},71", "--image", pictures[0], "--json", "--max-denoising-steps", "4")
    assert _new_ids(cli("generate", fp8, *args)) == _new_ids(cli("generate", fp8, "--backend", "torch", *args))

    report = tmp_path / "parity.json"
    cli("parity", vision_checkpoint, fp8, "--image", pictures[0], "--report", report)  # FP8 of a random model
    vision = next(c for c in json.loads(report.read_text())["checks"] if c["stage"] == "vision")
    assert vision["limits"] == {"nrmse": 0.25, "cos": 0.97} and 0 < vision["metrics"]["nrmse"] < 0.25

    assert_refused(cli("parity", vision_checkpoint, fp8, "--bisect"), "--quantize-vision", "pass --image")
    bisected = tmp_path / "bisect.json"
    result = cli("parity", vision_checkpoint, fp8, "--bisect", "--image", pictures[0], "--report", bisected)
    assert result.exit_code == 0, result.output
    found = json.loads(bisected.read_text())
    groups = {row["group"]: row for row in found["bisect"]}
    assert {"vision_tower.encoder.layers.0", "embed_vision", "layers.0", "self_conditioning", "all"} <= set(groups)
    for name in ("vision_tower.encoder.layers.0", "embed_vision"):
        assert groups[name]["soft_tokens_nrmse"] > 0 and groups[name]["nrmse"] > 0
    assert "soft_tokens_nrmse" not in groups["layers.0"]
    assert found["vision"]["quantized"] and found["vision"]["soft_tokens"] == [60]
    assert found["vision"]["soft_tokens_nrmse"] == pytest.approx(vision["metrics"]["nrmse"], rel=1e-3)

    default, prompts = tmp_path / "fp8-default", tmp_path / "prompts.jsonl"
    lines = [{"text": "a <|image|> b", "images": [str(pictures[0])]}, {"text": "text alone"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = cli(*calibrate, "-o", default, "--prompts", prompts)
    assert result.exit_code == 0, result.output
    manifest = ArtifactManifest.load(default)
    assert manifest.graphs["vision"].quantized == () and manifest.quantization is not None
    assert manifest.quantization.samples == 2 and not manifest.quantization.vision
    result = cli("parity", vision_checkpoint, default, "--bisect", "--image", pictures[0], "--report", bisected)
    assert result.exit_code == 0 and "vision graph is not quantized" in result.output, result.output
    found = json.loads(bisected.read_text())
    assert not found["vision"]["quantized"] and not any(r["group"].startswith("vision") for r in found["bisect"])


@pytest.mark.slow
def test_step_models_refuse_a_vision_export(vision_artifacts: Path, tmp_path: Path) -> None:
    """The BLS step models serve no images: a --vision export is refused for them in one line, nothing written."""
    out = tmp_path / "repo"
    result = cli("triton", vision_artifacts, "-o", out, "--step-backend", "python")
    assert_refused(result, "vision graph", "leave out --step-backend")
    assert not out.exists()


def test_bench_against_times_one_text_request_on_two_exports(
    tiny_artifacts: Path, tiny_debug_artifacts: Path, variant_artifacts: Path, pictures: list[Path]
) -> None:
    """`bench --against`: one text request on two exports of one model, alternating, with ratios of the medians
    (how the text-only cost of a --vision export is measured); another model or other modes are one line."""
    args = ("--steps", "2", "--prompt-length", "8", "--json")
    result = cli("bench", tiny_artifacts, "--against", tiny_debug_artifacts, *args)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["config"]["rounds"] == 6 and len(found["first_canvas_pair_ratios"]["ratios"]) == 6
    assert [found["targets"][role]["path"] for role in ("target", "other")] == [
        str(tiny_artifacts),
        str(tiny_debug_artifacts),
    ]
    for key in ("first_canvas", "prefill", "step"):
        mine, theirs = (found["targets"][role][key]["median_ms"] for role in ("target", "other"))
        assert mine > 0 and theirs > 0 and found["other_over_target"][key] == pytest.approx(theirs / mine)
    assert_refused(cli("bench", tiny_artifacts, "--against", variant_artifacts, *args), "another model")
    assert_refused(cli("bench", tiny_artifacts, "--against", tiny_debug_artifacts, "--image", pictures[0]), "--against")
    assert_refused(cli("bench", tiny_artifacts, "--rounds", "3"), "--rounds")


def test_bisect_refuses_images_for_artifacts_without_the_vision_graph(
    tiny_checkpoint: Path, tiny_fp8_artifacts: Path, pictures: list[Path]
) -> None:
    result = cli("parity", tiny_checkpoint, tiny_fp8_artifacts, "--bisect", "--image", pictures[0])
    assert_refused(result, "exported without --vision", "without --image")
