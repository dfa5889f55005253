"""Loading checkpoints: both config serialisations, sharded weights, and one-line errors for bad directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from canvasrt.core.errors import CheckpointError
from canvasrt.model.checkpoint import Checkpoint
from canvasrt.model.random_checkpoint import PRESETS


def test_old_and_new_config_serialisations_agree(write_checkpoint, tmp_path):
    new = write_checkpoint(tmp_path / "new", PRESETS["tiny"]["text"])
    old = write_checkpoint(tmp_path / "old", PRESETS["tiny"]["text"], old_format=True)
    assert "per_layer_config" not in json.loads((old / "config.json").read_text())["text_config"]
    assert Checkpoint.open(old).config == Checkpoint.open(new).config


def test_sharded_checkpoint_loads_every_tensor(variant_checkpoint):
    assert (variant_checkpoint / "model.safetensors.index.json").is_file()
    checkpoint = Checkpoint.open(variant_checkpoint)
    assert len(set(checkpoint.tensor_files.values())) > 1
    model = checkpoint.load_text_model()
    assert all(p.device.type == "cpu" for p in model.parameters())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path):
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path / "x")


def test_wrong_model_type(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "gemma3"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'gemma3'"):
        Checkpoint.open(ckpt)


def test_missing_tensor(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.decoder.layers.1.router.proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor model.decoder.layers.1.router.proj.weight"):
        Checkpoint.open(ckpt).load_text_model()


def test_misshaped_tensor(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.decoder.norm.weight"] = torch.ones(7)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.decoder.norm.weight has shape \[7\]"):
        Checkpoint.open(ckpt).load_text_model()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_streamed_expert_weights_are_the_dense_formulations_parameters(tiny_checkpoint, tmp_path, monkeypatch, dtype):
    """The dense experts' 2-D weights as the exporter streams them (the stored down-projection's axes reordered
    block by block, here in blocks of a few rows) are byte for byte the parameters the loader builds, and differ
    from the stored order; a file that ends inside such a tensor is refused."""
    import io

    from canvasrt.model import checkpoint as module
    from canvasrt.model.modeling import stored_layout

    checkpoint = Checkpoint.open(tiny_checkpoint)
    model = checkpoint.load_text_model(moe="dense", dtype=dtype)
    monkeypatch.setattr(module, "COPY_BLOCK", 3 * 4 * 32 * 4)  # 3 hidden rows of fp32 down, 4 experts x 32 features
    for name in ("layers.1.experts.down_proj", "layers.1.experts.gate_up_proj"):
        layout = stored_layout(model, name)
        out = io.BytesIO()
        checkpoint.write_tensor(f"model.decoder.{name}", dtype, out, layout.row_axis)
        parameter = model.get_parameter(name)
        assert out.getvalue() == parameter.contiguous().view(torch.uint8).numpy().tobytes(), name
        stored = checkpoint.converted(f"model.decoder.{name}", dtype)
        assert layout.shape == tuple(stored.shape) and torch.equal(stored.reshape(parameter.shape), parameter) == (
            layout.row_axis == 0
        )
    broken = Checkpoint.open(_copy(tiny_checkpoint, tmp_path / "c"))
    down = "model.decoder.layers.3.experts.down_proj"
    stored = broken.stored(down)  # the header is read (and kept) before the file is cut
    with open(stored.file, "r+b") as f:
        f.truncate(stored.offset + stored.length - 8)
    with pytest.raises(CheckpointError, match=f"ends inside tensor {down}"):
        broken.write_tensor(down, "fp32", io.BytesIO(), 1)
