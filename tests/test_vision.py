"""Image prompts: the vision tower and projector against transformers' Gemma 4 vision model, the soft tokens placed
in the encoder as transformers' generate() places them (with and without bidirectional attention within an image),
the prompt layout, generation with images on the torch and ONNX Runtime executors, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from canvasrt.core.errors import CanvasrtError
from canvasrt.model.checkpoint import Checkpoint
from canvasrt.runtime.images import (
    ImageProcessor,
    PromptImages,
    expand_ids,
    expand_text,
    image_chunks,
)
from support import assert_refused, bidirectional_images, cli


def _reference(checkpoint: Path):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(checkpoint)).eval()


def test_vision_tower_matches_transformers(vision_checkpoint: Path, images: list[Path]) -> None:
    batch = ImageProcessor(vision_checkpoint)(images)
    assert batch.pixel_values.shape[1] % 9 == 0 and (batch.positions == -1).all(axis=-1).any()  # padding patches
    with torch.no_grad():
        expected = (
            _reference(vision_checkpoint)
            .model.encoder.get_image_features(torch.from_numpy(batch.pixel_values), torch.from_numpy(batch.positions))
            .pooler_output
        )
        soft, real = Checkpoint.open(vision_checkpoint).load_vision_model()(
            torch.from_numpy(batch.pixel_values), torch.from_numpy(batch.positions)
        )
    assert real.sum(dim=1).tolist() == batch.soft_tokens
    assert soft[real].shape == expected.shape
    torch.testing.assert_close(soft[real], expected, atol=1e-5, rtol=1e-5)


def _image_prompt(checkpoint: Path, images: list[Path]) -> tuple[torch.Tensor, object]:
    vision = Checkpoint.open(checkpoint).vision
    batch = ImageProcessor(checkpoint)(images)
    ids = expand_ids([2, 70, 71, vision.image_token_id, 80, 81, vision.image_token_id, 90], batch.soft_tokens, vision)
    return torch.tensor([ids]), batch


@pytest.mark.parametrize("attention", ["vision", None])
def test_prefill_places_soft_tokens_like_generate(
    vision_checkpoint: Path, images: list[Path], tmp_path: Path, attention: str | None
) -> None:
    """The K/V of a prefill with two images equal the reference encoder's under the masks generate() builds from
    mm_token_type_ids (bidirectional within each image with "vision", causal without)."""
    from transformers.cache_utils import DynamicCache

    checkpoint = vision_checkpoint
    if attention is None:
        checkpoint = tmp_path / "causal"
        checkpoint.mkdir()
        for file in vision_checkpoint.iterdir():
            (checkpoint / file.name).write_bytes(file.read_bytes())
        bidirectional_images(checkpoint, None)
    ids, batch = _image_prompt(checkpoint, images)
    opened = Checkpoint.open(checkpoint)
    vision = opened.vision
    reference = _reference(checkpoint)
    cache = DynamicCache(config=reference.config.text_config)
    positions = torch.arange(ids.shape[1])[None]
    pixels, patch_positions = torch.from_numpy(batch.pixel_values), torch.from_numpy(batch.positions)
    with torch.no_grad():
        masks = reference.model.encoder.create_masks_for_generate(
            config=reference.config,
            inputs_embeds=torch.empty(1, ids.shape[1], 0),
            attention_mask=torch.ones_like(ids, dtype=torch.bool),
            past_key_values=cache,
            position_ids=positions,
            mm_token_type_ids=(ids == vision.image_token_id).long(),
        )
        reference.model.encoder(
            input_ids=ids,
            pixel_values=pixels,
            image_position_ids=patch_positions,
            attention_mask=masks,
            past_key_values=cache,
            position_ids=positions,
        )
        model = opened.load_text_model()
        assert model.bidirectional_images == (attention == "vision")
        soft, real = opened.load_vision_model()(pixels, patch_positions)
        placed = PromptImages.place(soft[real].numpy(), ids.numpy(), vision)
        empty = [torch.zeros(1, layer.num_kv_heads, 0, layer.head_dim) for layer in opened.config.layers]
        keys, values = model.encode(
            ids,
            positions,
            empty,
            [e.clone() for e in empty],
            torch.zeros(1, dtype=torch.long),
            torch.ones(1, ids.shape[1], dtype=torch.bool),
            torch.from_numpy(placed.tokens),
            torch.from_numpy(placed.slot),
        )
    for i, layer in enumerate(cache.layers):
        kept = layer.keys.shape[2]  # sliding layers keep the last W - 1 tokens
        torch.testing.assert_close(keys[i][:, :, -kept:], layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[i][:, :, -kept:], layer.values, atol=1e-5, rtol=1e-5)


def test_prompt_layout_follows_the_gemma4_processor() -> None:
    markers = ("<|image>", "<|image|>", "<image|>")
    assert expand_text("a <|image|> b", [2], markers) == "a <|image><|image|><|image|><image|> b"
    assert expand_text("a", [1, 2], markers) == "<|image><|image|><image|><|image><|image|><|image|><image|>a"
    with pytest.raises(CanvasrtError, match="marks 1 image"):
        expand_text("a <|image|>", [1, 1], markers)


def test_prefill_chunks_never_split_an_image() -> None:
    slot = np.full((1, 20), -1)
    slot[0, 3:9] = np.arange(6)  # one image of 6 soft tokens at columns 3..8
    slot[0, 10:14] = np.arange(6, 10)
    assert image_chunks(slot, 20, 8) == [(0, 3), (3, 10), (10, 18), (18, 20)]
    assert image_chunks(None, 20, 8) == [(0, 8), (8, 16), (16, 20)]
    with pytest.raises(CanvasrtError, match="does not fit one prefill chunk of 4"):
        image_chunks(slot, 20, 4)


def test_torch_generation_with_images_matches_generate(vision_checkpoint: Path, images: list[Path]) -> None:
    """`canvasrt generate CKPT --image` with --rng hf reproduces transformers' generate() given the processor's
    pixel values, patch positions and mm_token_type_ids, token for token."""
    ids, batch = _image_prompt(vision_checkpoint, images)
    prompt_ids = ",".join(map(str, [2, 70, 71, 260, 80, 81, 260, 90]))
    result = cli(
        "generate",
        vision_checkpoint,
        "--prompt-ids",
        prompt_ids,
        "--image",
        images[0],
        "--image",
        images[1],
        "--rng",
        "hf",
        "--seed",
        "5",
        "--json",
        "--max-denoising-steps",
        "6",
    )
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)["sequences"][0]
    torch.manual_seed(5)
    with torch.no_grad():
        expected = (
            _reference(vision_checkpoint)
            .generate(
                ids,
                pixel_values=torch.from_numpy(batch.pixel_values),
                image_position_ids=torch.from_numpy(batch.positions),
                mm_token_type_ids=(ids == 260).long(),
                max_denoising_steps=6,
            )
            .sequences[0]
            .tolist()
        )
    assert ours == expected


def test_text_only_request_on_an_image_checkpoint_is_unchanged(vision_checkpoint: Path) -> None:
    """A request without images runs the same on a checkpoint whose model takes images."""
    args = ("generate", vision_checkpoint, "--prompt-ids", "2,70,71", "--json", "--max-denoising-steps", "4")
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["sequences"] == json.loads(second.stdout)["sequences"]


# -- bad input: one line, exit 2 -------------------------------------------------------------------------------------


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    png = folder / "ok.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(png)
    truncated = folder / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:60])
    text = folder / "notes.png"
    text.write_text("not an image")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return {
        "truncated": (truncated, "cannot be decoded|not an image"),
        "not an image": (text, "not an image Pillow can read"),
        "empty file": (empty, "not an image Pillow can read"),
        "missing": (folder / "absent.png", "does not exist"),
        "directory": (folder, "is a directory"),
    }


@pytest.mark.parametrize("case", ["truncated", "not an image", "empty file", "missing", "directory"])
def test_unreadable_images_are_one_line(vision_checkpoint: Path, tmp_path: Path, case: str) -> None:
    path, message = _bad_files(tmp_path)[case]
    line = assert_refused(cli("generate", vision_checkpoint, "--prompt-ids", "2,70", "--image", path))
    assert any(m in line for m in message.split("|")), line


def test_marker_count_must_match_images(vision_checkpoint: Path, images: list[Path]) -> None:
    assert_refused(
        cli("generate", vision_checkpoint, "--prompt-ids", "2,260,70,260", "--image", images[0]), "mark 2 image(s)"
    )


def test_too_many_images_for_the_context(vision_checkpoint: Path, images: list[Path]) -> None:
    """Soft tokens count against the context: images beyond it are refused before any work."""
    many = [arg for _ in range(70) for arg in ("--image", str(images[1]))]
    assert_refused(
        cli("generate", vision_checkpoint, "--prompt-ids", "2,70", *many), "image soft tokens", "maximum context"
    )


def test_huge_and_extreme_images(vision_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image beyond Pillow's decompression limit (lowered here, so that the test needs no 90-megapixel file) is
    refused before it is decoded; an extreme aspect ratio is resized by the processor within its soft-token budget."""
    huge = tmp_path / "huge.png"
    Image.new("L", (120, 100)).save(huge)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert_refused(cli("generate", vision_checkpoint, "--prompt-ids", "2,70", "--image", huge), "more than 10000")
    monkeypatch.undo()
    strip = tmp_path / "strip.png"
    Image.fromarray(np.zeros((1, 4000, 3), np.uint8)).save(strip)
    processor = ImageProcessor(vision_checkpoint)
    assert 1 <= processor([strip]).soft_tokens[0] <= processor.max_soft_tokens


def test_images_need_a_model_that_takes_them(tiny_artifacts: Path, images: list[Path]) -> None:
    """Artifacts exported without --vision refuse images in one line."""
    assert_refused(cli("generate", tiny_artifacts, "--prompt-ids", "2,70", "--image", images[0]), "--vision")


# -- the vision export and ONNX Runtime ------------------------------------------------------------------------------


@pytest.mark.slow
def test_vision_export_runs_on_onnxruntime_like_torch(
    vision_checkpoint: Path, vision_artifacts: Path, images: list[Path]
) -> None:
    """vision.onnx and the backbone's image inputs on ONNX Runtime give torch's soft tokens and the same tokens."""
    from canvasrt.core.manifest import ArtifactManifest
    from canvasrt.runtime.backends.onnxruntime import OnnxVisionEncoder

    manifest = ArtifactManifest.load(vision_artifacts)
    assert manifest.vision == Checkpoint.open(vision_checkpoint).vision
    assert "preprocessor_config.json" in manifest.files
    assert [spec.name for spec in manifest.backbone.inputs if spec.name.startswith("image_")] == [
        "image_tokens",
        "image_slot",
    ]
    batch = ImageProcessor(vision_artifacts)(images)
    soft, real = OnnxVisionEncoder(manifest, "cpu", None).encode(batch.pixel_values, batch.positions)
    with torch.no_grad():
        expected, expected_real = Checkpoint.open(vision_checkpoint).load_vision_model()(
            torch.from_numpy(batch.pixel_values), torch.from_numpy(batch.positions)
        )
    assert (real == expected_real.numpy()).all()
    np.testing.assert_allclose(soft[real], expected[expected_real].numpy(), atol=1e-5, rtol=1e-5)
    args = ["--prompt", "hi <|image|> and <|image|>", "--image", images[0], "--image", images[1], "--json"]
    ours = cli("generate", vision_artifacts, *args)
    theirs = cli("generate", vision_checkpoint, *args)
    assert ours.exit_code == 0 and theirs.exit_code == 0, ours.output + theirs.output
    assert json.loads(ours.stdout)["sequences"] == json.loads(theirs.stdout)["sequences"]


@pytest.mark.slow
@pytest.mark.parametrize("level", ["step", "loop"])
def test_parity_with_images(
    vision_checkpoint: Path, vision_artifacts: Path, images: list[Path], tmp_path: Path, level: str
) -> None:
    """`canvasrt parity --image`: the vision graph's soft tokens, the prefill K/V around them, the steps (step
    level); transformers' generate() with the same pixel values and the loop on ONNX Runtime (loop level)."""
    report = tmp_path / f"parity-{level}.json"
    args = ["--level", level, "--report", report, "--image", images[0], "--image", images[1]]
    result = cli("parity", vision_checkpoint, vision_artifacts, *args)
    assert result.exit_code == 0, result.output
    checks = json.loads(report.read_text())["checks"]
    stages = {check["stage"] for check in checks}
    if level == "step":
        assert {"vision", "prefill", "step_first", "commit"} <= stages
    else:
        assert {"torch_hf_batch1", "torch_hf_batch2", "onnxruntime_vs_torch_block0"} <= stages
    assert all(check["passed"] for check in checks)


def test_parity_refuses_images_for_text_only_artifacts(
    tiny_checkpoint: Path, tiny_artifacts: Path, images: list[Path]
) -> None:
    assert_refused(cli("parity", tiny_checkpoint, tiny_artifacts, "--image", images[0]), "--vision")


@pytest.mark.slow
def test_bench_with_images(vision_artifacts: Path, images: list[Path]) -> None:
    """`canvasrt bench --image`: the vision graph per image beside transformers' vision tower, and the first canvas
    of the image prompt beside a text prompt of the same length, in one run."""
    result = cli("bench", vision_artifacts, "--image", images[0], "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    backends = json.loads(result.stdout)["backends"]
    assert set(backends) == {"onnxruntime", "transformers"}
    ours = backends["onnxruntime"]
    assert (
        ours["vision_ms_per_image"]["median_ms"] > 0
        and backends["transformers"]["vision_ms_per_image"]["median_ms"] > 0
    )
    assert ours["prompt_length"] == 8 + 2 + 60 and ours["image_over_text"] > 0


@pytest.mark.slow
def test_build_and_verify_cover_the_vision_graph(vision_artifacts: Path, tmp_path: Path) -> None:
    """`canvasrt build` (TensorRT-RTX, ahead of time) builds vision.engine with its own profile beside the backbone's;
    `canvasrt verify` covers the vision graph and engine: a changed file is one line each."""
    import shutil

    from canvasrt.core.manifest import ArtifactManifest, EngineManifest

    engines = tmp_path / "eng"
    result = cli("build", vision_artifacts, "-o", engines, "--target", "sm89")
    assert result.exit_code == 0, result.output
    manifest = EngineManifest.load(engines)
    assert set(manifest.engines) == {"backbone", "vision"}
    assert manifest.vision == ArtifactManifest.load(vision_artifacts).vision
    assert list(manifest.engines["vision"].profiles) == ["vision"]
    assert "image_tokens" in manifest.engines["backbone"].profiles["prefill"]
    assert cli("verify", engines).exit_code == 0
    assert cli("verify", vision_artifacts).exit_code == 0
    changed = tmp_path / "changed-eng"
    shutil.copytree(engines, changed)
    (changed / "vision.engine").write_bytes(b"x" * (changed / "vision.engine").stat().st_size)
    assert "vision engine" in cli("verify", changed).stderr
    art = tmp_path / "changed-art"
    shutil.copytree(vision_artifacts, art)
    (art / "vision.onnx").write_bytes((art / "vision.onnx").read_bytes()[:100])
    result = cli("verify", art)
    assert result.exit_code == 2 and "vision graph" in result.stderr, result.stderr


@pytest.mark.slow
def test_triton_serves_images_like_generate(
    vision_artifacts: Path, images: list[Path], triton_env: Path, tmp_path: Path
) -> None:
    """The loop model takes images (BYTES, encoded files): the served tokens equal `canvasrt generate --image`; a
    file that is no image is INVALID_ARGUMENT, and the next request is served exactly."""
    from canvasrt.serving.client import TritonRequestError, generate_grpc
    from canvasrt.serving.protocol import request_inputs
    from canvasrt.serving.repository import write_repository
    from canvasrt.serving.server import TritonServer, free_ports

    prompt = "hi <|image|> and <|image|>"
    result = cli("generate", vision_artifacts, "--prompt", prompt, "--image", images[0], "--image", images[1], "--json")
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout)
    encoded = np.array([path.read_bytes() for path in images], dtype=np.object_)
    repository = tmp_path / "repo"
    write_repository(vision_artifacts, repository, "in-process", instances=1, threads=1)
    http, grpc = free_ports(2)
    with TritonServer(repository, triton_env, http_port=http, grpc_port=grpc) as server:
        responses = generate_grpc(server.grpc_url, {**request_inputs(prompt=prompt, seed=0), "images": encoded})
        new = expected["sequences"][0][len(expected["sequences"][0]) - len(responses[-1]["ids"]) :]
        assert responses[-1]["event"] == "done" and responses[-1]["ids"] == new
        bad = np.array([b"not an image"], dtype=np.object_)
        with pytest.raises(TritonRequestError, match="not an image Pillow can read"):
            generate_grpc(server.grpc_url, {**request_inputs(prompt="<|image|>", seed=0), "images": bad})
        again = generate_grpc(server.grpc_url, {**request_inputs(prompt=prompt, seed=0), "images": encoded})
        assert again[-1]["ids"] == new


def test_openai_chat_takes_image_url_data_parts(vision_checkpoint: Path, images: list[Path]) -> None:
    """The OpenAI-compatible chat endpoint turns `image_url` parts with data: URLs into the loop model's images
    input, each marked where it stood with the image token; other URLs and bad base64 are 400s."""
    import base64

    from canvasrt.serving.openai_api import APIError, FrontEnd

    front = FrontEnd("127.0.0.1:1", vision_checkpoint)
    encoded = base64.b64encode(images[0].read_bytes()).decode()

    def chat(url: str) -> object:
        parts = [{"type": "text", "text": "what is "}, {"type": "image_url", "image_url": {"url": url}}]
        return front.chat(model=front.model, messages=[{"role": "user", "content": parts}])

    inputs = front._inputs(chat(f"data:image/png;base64,{encoded}"), chat=True)
    assert inputs["images"].tolist() == [images[0].read_bytes()]
    assert (inputs["prompt_ids"] == Checkpoint.open(vision_checkpoint).vision.image_token_id).sum() == 1
    for url, message in (("https://example.com/a.png", "data: URL"), ("data:image/png;base64,@@", "base64")):
        with pytest.raises(APIError, match=message):
            front._inputs(chat(url), chat=True)


@pytest.mark.slow
def test_fp8_keeps_the_vision_graph_in_its_export_dtype(
    vision_checkpoint: Path, vision_artifacts: Path, images: list[Path], tmp_path: Path
) -> None:
    """`canvasrt calibrate` quantizes the backbone's GEMMs and rewrites vision.onnx without a Q/DQ node: image
    prompts on FP8 artifacts get the soft tokens of the export dtype (parity: exact), the backbone's FP8 error."""
    import onnx

    from canvasrt.core.manifest import ArtifactManifest

    fp8 = tmp_path / "fp8"
    result = cli("calibrate", vision_checkpoint, vision_artifacts, "-o", fp8, "--samples", "4")
    assert result.exit_code == 0, result.output
    manifest = ArtifactManifest.load(fp8)
    assert manifest.graphs["vision"].quantized == () and manifest.backbone.quantized
    graph = onnx.load(str(fp8 / "vision.onnx"), load_external_data=False)
    assert not [node for node in graph.graph.node if "Quantize" in node.op_type]
    report = tmp_path / "parity.json"
    result = cli("parity", vision_checkpoint, fp8, "--image", images[0], "--report", report)
    assert result.exit_code == 0, result.output
    vision = [c for c in json.loads(report.read_text())["checks"] if c["stage"] == "vision"]
    assert vision and vision[0]["metrics"]["nrmse"] < 1e-5


def test_slice_keeps_the_vision_tower_and_its_processor(vision_checkpoint: Path, tmp_path: Path) -> None:
    result = cli("slice", vision_checkpoint, "--layers", "0,1", "-o", tmp_path / "sliced")
    assert result.exit_code == 0, result.output
    sliced = Checkpoint.open(tmp_path / "sliced")
    assert sliced.vision == Checkpoint.open(vision_checkpoint).vision
    assert (tmp_path / "sliced" / "preprocessor_config.json").is_file()
    assert sliced.problems() == []
