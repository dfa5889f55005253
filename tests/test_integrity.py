"""Nothing lost, nothing silently wrong: commands replace only their own kind of output and
never their input; artifacts, engines and weights that do not match what they promise are refused; files named
outside their directory are not followed; `canvasrt verify` checks everything; exit code 1 means only "outside
tolerance". Every bad input is built from a copy of a good fixture."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from canvasrt.core.errors import CheckpointError
from canvasrt.core.manifest import sha256_file
from canvasrt.model.checkpoint import Checkpoint
from canvasrt.model.random_checkpoint import PRESETS, write_random_checkpoint
from support import assert_refused, cli

TENSOR = "model.decoder.layers.1.self_attn.q_proj.weight"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def with_tensor(checkpoint: Path, out: Path, name: str, value: torch.Tensor) -> Path:
    """A copy of `checkpoint` whose tensor `name` is replaced by `value`."""
    copy = shutil.copytree(checkpoint, out)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors[name] = value
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


# -- 1. data loss ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "random_over_real_checkpoint",
        "export_over_engines",
        "export_into_its_input",
        "export_inside_its_input",
        "calibrate_over_its_input",
        "build_over_its_input",
        "triton_over_a_checkpoint",
    ],
)
def test_a_command_replaces_only_its_own_kind_of_output_and_never_its_input(
    case, tiny_checkpoint, tiny_artifacts, tiny_engines, tmp_path
):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "art")
    engines = shutil.copytree(tiny_engines, tmp_path / "eng")
    args, victim, words = {
        "random_over_real_checkpoint": (
            ["random-checkpoint", checkpoint],
            checkpoint,
            ["holds a checkpoint", "new or empty output path"],
        ),
        "export_over_engines": (["export", checkpoint, "-o", engines], engines, ["holds canvasrt engines"]),
        "export_into_its_input": (["export", checkpoint, "-o", checkpoint], checkpoint, ["is the input"]),
        "export_inside_its_input": (["export", checkpoint, "-o", checkpoint / "art"], checkpoint, ["lies inside"]),
        "calibrate_over_its_input": (
            ["calibrate", checkpoint, artifacts, "-o", artifacts],
            artifacts,
            ["is the input"],
        ),
        "build_over_its_input": (["build", artifacts, "-o", artifacts], artifacts, ["is the input"]),
        "triton_over_a_checkpoint": (["triton", artifacts, "-o", checkpoint], checkpoint, ["holds a checkpoint"]),
    }[case]
    before = {d: snapshot(d) for d in (checkpoint, artifacts, engines)}
    assert_refused(cli(*args), *words)
    for directory, files in before.items():
        assert snapshot(directory) == files, directory  # byte-identical, nothing added
    assert leftovers(tmp_path) == [] and leftovers(checkpoint) == []


def test_random_checkpoint_replaces_its_own_earlier_output(tmp_path):
    out = write_random_checkpoint(tmp_path / "random", seed=1)
    first = sha256_file(out / "model.safetensors")
    write_random_checkpoint(out, seed=2)
    assert sha256_file(out / "model.safetensors") != first and leftovers(tmp_path) == []


# -- 2. integrity ------------------------------------------------------------------------------------------------


def test_a_changed_or_swapped_graph_is_refused_on_load(tiny_artifacts, tiny_debug_artifacts, tmp_path):
    grown = shutil.copytree(tiny_artifacts, tmp_path / "grown")
    with open(grown / "backbone.onnx", "ab") as f:
        f.write(b"\0")
    assert_refused(cli("generate", grown, "--prompt-ids", "5"), "backbone.onnx has", "changed, truncated or swapped")
    swapped = shutil.copytree(tiny_artifacts, tmp_path / "swapped")
    shutil.copy2(tiny_debug_artifacts / "backbone.onnx", swapped / "backbone.onnx")  # another export's graph
    assert_refused(cli("generate", swapped, "--prompt-ids", "5"), "backbone.onnx has", "re-run `canvasrt export`")


def flip_a_byte(path: Path) -> None:
    """Same size, other contents: only a digest tells."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_graph_with_other_contents_is_refused_where_digests_are_checked(tiny_checkpoint, tiny_artifacts, tmp_path):
    broken = shutil.copytree(tiny_artifacts, tmp_path / "art")
    flip_a_byte(broken / "backbone.onnx")
    for args in (
        ["triton", broken, "-o", tmp_path / "repo"],
        ["build", broken, "-o", tmp_path / "eng"],
        ["calibrate", tiny_checkpoint, broken, "-o", tmp_path / "fp8", "--samples", "1"],
    ):
        assert_refused(
            cli(*args), "backbone.onnx does not match the sha256 in its manifest", "re-run `canvasrt export`"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    result = cli("verify", broken)
    assert_refused(result, "backbone.onnx does not match the sha256")


def test_a_reused_build_whose_engine_changed_is_rebuilt(tiny_artifacts, tiny_engines, tmp_path):
    engines = shutil.copytree(tiny_engines, tmp_path / "eng")
    again = cli("build", tiny_artifacts, "-o", engines, "--target", "sm89")
    assert again.exit_code == 0 and "up to date" in again.output
    flip_a_byte(engines / "backbone.engine")
    assert_refused(cli("verify", engines), "backbone.engine does not match the sha256", "rebuild it")
    assert_refused(cli("triton", engines, "-o", tmp_path / "repo"), "backbone.engine does not match the sha256")
    rebuilt = cli("build", tiny_artifacts, "-o", engines, "--target", "sm89")
    assert rebuilt.exit_code == 0 and "up to date" not in rebuilt.output, rebuilt.output
    assert cli("verify", engines).exit_code == 0


def test_verify_reports_every_problem_and_passes_clean_targets(tiny_checkpoint, tiny_artifacts, tiny_engines, tmp_path):
    for clean in (tiny_checkpoint, tiny_artifacts, tiny_engines):
        result = cli("verify", clean)
        assert result.exit_code == 0 and "verified" in result.output, result.output
    broken = shutil.copytree(tiny_artifacts, tmp_path / "art")
    flip_a_byte(broken / "backbone.onnx")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["tokenizer"].append("../../etc/passwd")
    manifest["kv_layout"].pop()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = cli("verify", broken)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output and len(lines) == 3, result.output
    assert "backbone.onnx does not match" in lines[0] and "tokenizer file ../../etc/passwd resolves outside" in lines[1]
    assert "kv_layout has 3 layers, the model 4" in lines[2]


def test_directories_of_the_previous_formats_are_refused_with_the_fix(tiny_artifacts, tiny_engines, tmp_path):
    for source, fix in ((tiny_artifacts, "re-export it"), (tiny_engines, "rebuild it with `canvasrt build`")):
        old = shutil.copytree(source, tmp_path / source.name)
        manifest = json.loads((old / "manifest.json").read_text())
        manifest["format_version"] = 3  # K/V inputs of the full capacity
        (old / "manifest.json").write_text(json.dumps(manifest))
        assert_refused(cli("generate", old, "--prompt-ids", "5"), fix)


# -- 2. weights that cannot be weights ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "value, words",
    [
        (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), ["holds NaN or Inf", TENSOR]),
        (lambda t: t.index_fill(1, torch.tensor([0]), float("inf")), ["holds NaN or Inf", TENSOR]),
        (lambda t: t.to(torch.int32), ["stored as I32", TENSOR, "float weights"]),
        (lambda t: t.to(torch.float64), ["stored as F64", TENSOR]),
    ],
)
def test_weights_that_are_not_finite_floats_are_refused_with_their_name(
    value, words, tiny_checkpoint, tiny_artifacts, short_checkpoint, tmp_path
):
    # the export refuses the weight after tracing every layer: the two-layer checkpoint is as refused, in half the time
    original = load_file(str(short_checkpoint / "model.safetensors"))[TENSOR]
    broken = with_tensor(short_checkpoint, tmp_path / "ckpt", TENSOR, value(original))
    for args in (
        ["export", broken, "-o", tmp_path / "out"],
        ["generate", broken, "--prompt-ids", "5"],
        ["verify", broken],
    ):
        assert_refused(cli(*args), *words)
    # calibrate meets artifacts of the intact checkpoint: refused as another checkpoint before any weight is read
    original = load_file(str(tiny_checkpoint / "model.safetensors"))[TENSOR]
    broken = with_tensor(tiny_checkpoint, tmp_path / "tiny-ckpt", TENSOR, value(original))
    assert_refused(
        cli("calibrate", broken, tiny_artifacts, "-o", tmp_path / "out", "--samples", "1"),
        "is not the checkpoint",
        "model.safetensors differ",
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_the_streaming_copy_checks_values_and_conversions(tiny_checkpoint, tmp_path):
    original = load_file(str(tiny_checkpoint / "model.safetensors"))[TENSOR]
    nan = Checkpoint.open(
        with_tensor(tiny_checkpoint, tmp_path / "nan", TENSOR, original.index_fill(0, torch.tensor([1]), float("nan")))
    )
    with open(tmp_path / "out.data", "wb") as out, pytest.raises(CheckpointError, match=f"{TENSOR} holds NaN"):
        nan.write_tensor(TENSOR, "fp32", out)
    large = with_tensor(tiny_checkpoint, tmp_path / "large", TENSOR, original.index_fill(0, torch.tensor([1]), 1e6))
    with open(tmp_path / "out.data", "wb") as out, pytest.raises(CheckpointError, match=f"{TENSOR} overflows fp16"):
        Checkpoint.open(large).write_tensor(TENSOR, "fp16", out)
    assert_refused(cli("export", large, "-o", tmp_path / "art", "--dtype", "fp16"), "overflows fp16", "--dtype fp32")
    with open(tmp_path / "out.data", "wb") as out:  # fp32 holds 1e6: the plain copy goes through
        assert Checkpoint.open(large).write_tensor(TENSOR, "fp32", out) == original.numel() * 4


# -- 2. exit code 1 means only "outside tolerance" ---------------------------------------------------------------


@pytest.mark.parametrize("option", ["--report", "--junit"])
def test_parity_refuses_an_unwritable_report_before_running(option, tiny_checkpoint, tiny_artifacts, tmp_path):
    result = cli("parity", tiny_checkpoint, tiny_artifacts, option, tmp_path / "missing" / "r.json")
    assert_refused(result, option, "does not exist", "create it")
    assert "passed" not in result.output and not (tmp_path / "missing").exists()  # the check never ran


# -- 3. reading outside what the user named ----------------------------------------------------------------------


def test_a_checkpoint_index_naming_files_outside_is_refused(variant_checkpoint, tmp_path):
    for how in ("dotdot", "link"):
        checkpoint = shutil.copytree(variant_checkpoint, tmp_path / how / "ckpt")
        index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
        shard = sorted(set(index["weight_map"].values()))[0]
        os.replace(checkpoint / shard, tmp_path / how / shard)
        if how == "dotdot":
            index["weight_map"] = {k: f"../{shard}" if v == shard else v for k, v in index["weight_map"].items()}
            (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            (checkpoint / shard).symlink_to(tmp_path / how / shard)
        for args in (
            ["generate", checkpoint, "--prompt-ids", "5"],
            ["export", checkpoint, "-o", tmp_path / "art"],
            ["verify", checkpoint],
        ):
            assert_refused(cli(*args), "resolves outside the checkpoint directory", "put the file itself in")
        assert not (tmp_path / "art").exists()


def test_a_hugging_face_cache_snapshot_is_a_checkpoint(tiny_checkpoint, tmp_path):
    """huggingface_hub's layout: every file of a snapshot links into the repository's blobs/."""
    repo = tmp_path / "models--google--tiny"
    snapshot_dir = repo / "snapshots" / "0123abc"
    snapshot_dir.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in tiny_checkpoint.iterdir():
        blob = repo / "blobs" / sha256_file(file)
        shutil.copy2(file, blob)
        (snapshot_dir / file.name).symlink_to(Path("../../blobs") / blob.name)
    assert Checkpoint.open(snapshot_dir).problems() == []


def test_manifests_naming_files_outside_are_refused(tiny_artifacts, tiny_engines, tmp_path):
    for graph_file in ("../outside/backbone.onnx", "link.onnx"):
        artifacts = shutil.copytree(tiny_artifacts, tmp_path / "art")
        (tmp_path / "outside").mkdir()
        os.replace(artifacts / "backbone.onnx", tmp_path / "outside" / "backbone.onnx")
        if graph_file == "link.onnx":
            (artifacts / "link.onnx").symlink_to(tmp_path / "outside" / "backbone.onnx")
        manifest = json.loads((artifacts / "manifest.json").read_text())
        manifest["graphs"]["backbone"]["file"] = graph_file
        (artifacts / "manifest.json").write_text(json.dumps(manifest))
        for args in (
            ["generate", artifacts, "--prompt-ids", "5"],
            ["triton", artifacts, "-o", tmp_path / "repo"],
            ["verify", artifacts],
        ):
            assert_refused(cli(*args), f"the backbone graph {graph_file} resolves outside the directory")
        assert not (tmp_path / "repo").exists()
        shutil.rmtree(artifacts)
        shutil.rmtree(tmp_path / "outside")
    engines = shutil.copytree(tiny_engines, tmp_path / "eng")
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["engines"]["backbone"]["file"] = "../elsewhere.engine"
    (engines / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(cli("verify", engines), "the backbone engine ../elsewhere.engine resolves outside the directory")
    assert_refused(cli("triton", engines, "-o", tmp_path / "repo"), "resolves outside the directory")


# -- the output is checked again at the swap ------------------------------------------------------------------------


def _intruding(monkeypatch, make) -> None:
    """Runs `make(final)` the moment before a command swaps its output in: what another process (a user, another
    tool) may put at the output path while the command ran."""
    from canvasrt.core import output

    swap = output._swap_in

    def racing(staging, final, kind):
        make(final)
        swap(staging, final, kind)

    monkeypatch.setattr(output, "_swap_in", racing)


def _notes(final: Path) -> None:
    final.mkdir()
    (final / "notes.txt").write_text("mine")


def _checkpoint_of_another_tool(final: Path) -> None:
    final.mkdir()
    (final / "config.json").write_text("{}")


@pytest.mark.parametrize("intruder", [_notes, _checkpoint_of_another_tool, lambda f: f.write_text("a file")])
@pytest.mark.parametrize(
    "command", ["random-checkpoint", pytest.param("export", marks=pytest.mark.slow), "triton"]
)  # an export is a whole trace in a subprocess
def test_what_appears_at_the_output_while_a_command_runs_is_never_replaced(
    command, intruder, short_checkpoint, tiny_artifacts, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    args = {
        "random-checkpoint": ["random-checkpoint", out],
        "export": ["export", short_checkpoint, "-o", out, "--max-context", 64],
        "triton": ["triton", tiny_artifacts, "-o", out],
    }[command]
    _intruding(monkeypatch, intruder)
    assert_refused(cli(*args), f"{out} changed while this command ran", "nothing was written")
    assert (out / "notes.txt").read_text() == "mine" if intruder is _notes else out.exists()
    assert leftovers(tmp_path) == []


def test_an_empty_directory_or_an_earlier_output_appearing_meanwhile_is_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _intruding(monkeypatch, lambda final: final.mkdir())
    assert cli("random-checkpoint", out).exit_code == 0 and (out / "model.safetensors").is_file()
    earlier = tmp_path / "earlier"
    write_random_checkpoint(earlier, seed=3)
    shutil.rmtree(out)
    monkeypatch.undo()
    _intruding(monkeypatch, lambda final: shutil.copytree(earlier, final))
    assert cli("random-checkpoint", out, "--seed", 4).exit_code == 0
    assert sha256_file(out / "model.safetensors") != sha256_file(earlier / "model.safetensors")
    assert leftovers(tmp_path) == []


def test_an_output_path_that_is_a_link_stays_a_link(tiny_artifacts, tmp_path):
    target, link = tmp_path / "repo-v1", tmp_path / "current"
    link.symlink_to(target)  # dangling: the output is created where it points
    for _ in range(2):  # written, then replaced through the link
        result = cli("triton", tiny_artifacts, "-o", link)
        assert result.exit_code == 0, result.output
        assert link.is_symlink() and (target / "canvasrt_generate" / "config.pbtxt").is_file()
    assert leftovers(tmp_path) == []


def test_outputs_get_the_permissions_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        out = write_random_checkpoint(tmp_path / "random")
    finally:
        os.umask(previous)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {p.name: "0o644" for p in out.iterdir()}


# -- inputs read once: rechecked by digest before the output is swapped in -------------------------------------------


@pytest.mark.slow
def test_inputs_that_change_while_a_command_reads_them_are_refused(
    tiny_checkpoint, tiny_artifacts, variant_artifacts, short_checkpoint, tmp_path
):
    """An export into the artifact directory while calibrate runs, a checkpoint rewritten while export runs: each
    refused before the output is swapped in, nothing written."""
    from canvasrt.calibration.calibrate import calibrate
    from canvasrt.core.errors import CanvasrtError
    from canvasrt.exporter.export import export

    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "art")

    def swap_artifacts(text: str) -> None:
        if text.startswith("running the loop"):
            for source in variant_artifacts.iterdir():
                shutil.copy2(source, artifacts / source.name)

    with pytest.raises(CanvasrtError, match="changed while `canvasrt calibrate` ran"):
        calibrate(tiny_checkpoint, artifacts, tmp_path / "fp8", samples=1, progress=swap_artifacts)
    assert not (tmp_path / "fp8").exists()

    checkpoint = shutil.copytree(short_checkpoint, tmp_path / "ckpt")
    weight = load_file(str(checkpoint / "model.safetensors"))[TENSOR]
    retrained = with_tensor(checkpoint, tmp_path / "retrained", TENSOR, weight * 2)  # same config, other weights

    def swap_weights(text: str) -> None:
        if text.startswith("exporting"):
            shutil.copy2(retrained / "model.safetensors", checkpoint / "model.safetensors")

    with pytest.raises(CanvasrtError, match="changed while exporting"):
        export(checkpoint, tmp_path / "exported", max_context=64, progress=swap_weights)
    assert not (tmp_path / "exported").exists() and leftovers(tmp_path) == []


# -- checkpoint identity ---------------------------------------------------------------------------------------------


def test_a_checkpoint_other_than_the_one_exported_is_refused_wherever_it_meets_artifacts(
    tiny_artifacts, write_checkpoint, tmp_path
):
    """Same config, other weights: calibrate, parity, and the torch backend on artifacts whose checkpoint was
    rewritten in place, each one line saying so."""
    other = write_checkpoint(tmp_path / "other", PRESETS["tiny"]["text"], seed=7)
    for args in (
        ["calibrate", other, tiny_artifacts, "-o", tmp_path / "fp8", "--samples", 1],
        ["parity", other, tiny_artifacts],
    ):
        assert_refused(cli(*args), f"{other} is not the checkpoint", "model.safetensors differ", "re-export")
    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "art")
    source = tmp_path / "source"
    shutil.copytree(json.loads((artifacts / "manifest.json").read_text())["checkpoint"]["path"], source)
    edit = json.loads((artifacts / "manifest.json").read_text())
    edit["checkpoint"]["path"] = str(source)
    (artifacts / "manifest.json").write_text(json.dumps(edit))
    shutil.copy2(other / "model.safetensors", source / "model.safetensors")  # the checkpoint rewritten since
    assert_refused(cli("generate", artifacts, "--backend", "torch", "--prompt-ids", "5"), "is not the checkpoint")
    assert not (tmp_path / "fp8").exists()


# -- every file a manifest relies on is in its record ---------------------------------------------------------------


def _swap_tokenizer(artifacts: Path, variant_artifacts: Path) -> None:
    shutil.copy2(variant_artifacts / "tokenizer.json", artifacts / "tokenizer.json")


def _same_size_tokenizer(artifacts: Path, _: Path) -> None:
    data = (artifacts / "tokenizer.json").read_text()
    (artifacts / "tokenizer.json").write_text(data.replace('"<pad>"', '"<pa_>"', 1))


def _tokenizer_a_directory(artifacts: Path, _: Path) -> None:
    (artifacts / "tokenizer.json").unlink()
    (artifacts / "tokenizer.json").mkdir()


def _generation_config_edited(artifacts: Path, _: Path) -> None:
    path = artifacts / "generation_config.json"
    path.write_text(path.read_text().replace("12", "13", 1))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda a, _: (a / "tokenizer.json").unlink(),
        _tokenizer_a_directory,
        _swap_tokenizer,
        _same_size_tokenizer,
        _generation_config_edited,
    ],
    ids=["tokenizer deleted", "tokenizer a directory", "another model's", "same size", "generation config"],
)
def test_every_file_a_manifest_relies_on_is_in_its_record(corrupt, tiny_artifacts, variant_artifacts, tmp_path):
    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "art")
    corrupt(artifacts, variant_artifacts)
    assert_refused(cli("generate", artifacts, "--prompt", "hi"), str(artifacts))
    assert cli("verify", artifacts).exit_code == 2
    assert_refused(cli("triton", artifacts, "-o", tmp_path / "repo"), str(artifacts))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_artifacts, variant_artifacts, tmp_path):
    """Even where the record is made to match it: the vocabulary is checked wherever a tokenizer is opened."""
    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "art")
    _swap_tokenizer(artifacts, variant_artifacts)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {
        "bytes": (artifacts / "tokenizer.json").stat().st_size,
        "sha256": sha256_file(artifacts / "tokenizer.json"),
    }
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    for args in (["generate", artifacts, "--prompt", "hi"], ["verify", artifacts]):
        assert_refused(cli(*args), "has 320 tokens, more than the model's vocabulary of 288")


@pytest.mark.slow
def test_the_engines_layer_information_is_in_their_record(tiny_engines, tmp_path):
    engines = shutil.copytree(tiny_engines, tmp_path / "eng")
    layers = next(engines.glob("*.layers.txt"))
    layers.write_text(layers.read_text() + "edited\n")
    assert_refused(cli("verify", engines), layers.name)


# -- verify runs every check a consumer runs --------------------------------------------------------------------------


def _edited_input_shape(artifacts: Path, _: Path, __: Path) -> Path:
    manifest = json.loads((artifacts / "manifest.json").read_text())
    spec = next(s for s in manifest["graphs"]["backbone"]["inputs"] if s["name"] == "self_cond")
    spec["shape"][-1] += 1
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    return artifacts


def _engines_of_another_config(_: Path, engines: Path, variant_artifacts: Path) -> Path:
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["artifacts"] = str(variant_artifacts)
    (engines / "manifest.json").write_text(json.dumps(manifest))
    return engines


def _edited_engine_outputs(_: Path, engines: Path, __: Path) -> Path:
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["engines"]["backbone"]["outputs"].pop()
    (engines / "manifest.json").write_text(json.dumps(manifest))
    return engines


@pytest.mark.parametrize("corrupt", [_edited_input_shape, _engines_of_another_config, _edited_engine_outputs])
@pytest.mark.slow
def test_verify_refuses_what_any_command_refuses(corrupt, tiny_artifacts, tiny_engines, variant_artifacts, tmp_path):
    """A directory that some command refuses is one `verify` refuses: verify passing means every command accepts it."""
    target = corrupt(
        shutil.copytree(tiny_artifacts, tmp_path / "art"),
        shutil.copytree(tiny_engines, tmp_path / "eng"),
        variant_artifacts,
    )
    consumers = [["triton", target, "-o", tmp_path / "repo"]]
    if (target / "backbone.onnx").is_file():
        consumers.append(["generate", target, "--prompt-ids", "5"])
    assert any(cli(*args).exit_code == 2 for args in consumers)
    result = cli("verify", target)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
