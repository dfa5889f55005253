"""Few-layer checkpoints: `canvasrt slice` keeps the chosen layers bit for bit in a checkpoint transformers loads
and generates from; `random-checkpoint --preset released --layers N` has the released model's exact layer shapes
(checked on the config and a meta-device model, not by writing 4.8 GB)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from canvasrt.core.config import FULL, SLIDING
from canvasrt.model.checkpoint import Checkpoint, load_model_config, model_config_from_hf
from canvasrt.model.modeling import MOE_FORMULATIONS, DiffusionGemmaText, stored_layout
from canvasrt.model.random_checkpoint import PRESETS, preset_config, preset_text
from support import cli


def tensors(path):
    checkpoint = Checkpoint.open(path)
    return {name: checkpoint.tensor(name) for name in checkpoint.tensor_files}


@pytest.mark.parametrize(
    "fixture, layers", [("tiny_checkpoint", [2, 3]), ("variant_checkpoint", [1, 2]), ("variant_checkpoint", [2, 0])]
)
def test_slice_keeps_the_layers_bit_exact_in_a_loadable_checkpoint(fixture, layers, request, tmp_path):
    """tiny: the per_layer_config form; variant: sharded, the older global_head_dim form, and a reordering."""
    source = request.getfixturevalue(fixture)
    out = tmp_path / "sliced"
    result = cli("slice", source, "--layers", ",".join(map(str, layers)), "-o", out)
    assert result.exit_code == 0, result.output

    original, sliced = tensors(source), tensors(out)
    expected = {}
    for name, value in original.items():
        parts = name.split(".")
        if ".layers." in name and "vision_tower" not in name:
            index = parts.index("layers") + 1
            if int(parts[index]) not in layers:
                continue
            parts[index] = str(layers.index(int(parts[index])))
        expected[".".join(parts)] = value
    assert set(sliced) == set(expected)
    assert all(
        torch.equal(sliced[name], expected[name]) and sliced[name].dtype == expected[name].dtype for name in expected
    )

    source_config, config = load_model_config(source), load_model_config(out)
    assert config.layers == tuple(source_config.layers[i] for i in layers)
    assert config.hidden_size == source_config.hidden_size and config.vocab_size == source_config.vocab_size
    for name in ("generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()

    from transformers import DiffusionGemmaForBlockDiffusion

    model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.manual_seed(0)
    generated = model.eval().generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=16, max_denoising_steps=2)
    assert generated.sequences.shape[1] > 4


def test_slice_of_a_slice_equals_the_direct_slice(tiny_checkpoint, tmp_path):
    assert cli("slice", tiny_checkpoint, "--layers", "0,1,2,3", "-o", tmp_path / "all").exit_code == 0
    assert cli("slice", tmp_path / "all", "--layers", "2,3", "-o", tmp_path / "two").exit_code == 0
    assert cli("slice", tiny_checkpoint, "--layers", "2,3", "-o", tmp_path / "direct").exit_code == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


@pytest.mark.parametrize(
    "layers, message",
    [
        ("0,7", "has no layer 7: it has 4 layers (0-3)"),
        ("-1,1", "has no layer -1"),
        ("1,1", "lists a layer more than once"),
        ("1,2", "layer 2 is a sliding-window layer, but a checkpoint's last layer must be full attention"),
        ("0,a", "is not a comma-separated list of layer indices"),
    ],
)
def test_slice_bad_layers_one_line_exit_2_nothing_written(tiny_checkpoint, tmp_path, layers, message):
    source = shutil.copytree(tiny_checkpoint, tmp_path / "source")
    out = tmp_path / "sliced"
    result = cli("slice", source, "--layers", layers, "-o", out)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and message in lines[-1] and "Traceback" not in result.output
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_slice_of_a_checkpoint_missing_a_kept_tensor_fails_cleanly(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    source = shutil.copytree(tiny_checkpoint, tmp_path / "source")
    weights = load_file(str(source / "model.safetensors"))
    del weights["model.decoder.layers.3.self_attn.q_proj.weight"]
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = cli("slice", source, "--layers", "2,3", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "missing tensor model.decoder.layers.3.self_attn.q_proj.weight" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "layers, kinds",
    [
        (2, [SLIDING, FULL]),
        (4, [SLIDING] * 3 + [FULL]),
        (None, ([SLIDING] * 5 + [FULL]) * 5),
    ],
)
def test_released_preset_has_the_released_layer_shapes(layers, kinds):
    text = preset_text("released", layers)
    hf = preset_config(text, PRESETS["released"]["canvas_length"])
    config = model_config_from_hf(hf)
    assert [spec.kind for spec in config.layers] == kinds
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_heads) == (
        262144,
        2816,
        2112,
        16,
    )
    assert (config.num_experts, config.top_k_experts, config.moe_intermediate_size) == (128, 8, 704)
    assert (config.sliding_window, config.canvas_length, config.max_position_embeddings) == (1024, 256, 262144)
    for spec in config.layers:
        sliding = spec.kind == SLIDING
        assert (spec.head_dim, spec.num_kv_heads) == ((256, 8) if sliding else (512, 2))
        assert spec.value_from_key == (not sliding)
        assert (spec.rope_theta, spec.rotary_pairs) == ((1e4, 128) if sliding else (1e6, 64))
    assert PRESETS["released"]["dtype"] == torch.bfloat16

    # transformers' own modules at this config, on the meta device: the tensor shapes of the released checkpoint
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(hf)
    shapes = {name: tuple(t.shape) for name, t in model.model.decoder.state_dict().items()}
    full = kinds.index(FULL)
    assert shapes["embed_tokens.weight"] == (262144, 2816)
    assert shapes["layers.0.self_attn.q_proj.weight"] == (4096, 2816)
    assert shapes["layers.0.self_attn.k_proj.weight"] == shapes["layers.0.self_attn.v_proj.weight"] == (2048, 2816)
    assert shapes[f"layers.{full}.self_attn.q_proj.weight"] == (8192, 2816)
    assert shapes[f"layers.{full}.self_attn.k_proj.weight"] == (1024, 2816)
    assert f"layers.{full}.self_attn.v_proj.weight" not in shapes
    assert shapes["layers.0.experts.gate_up_proj"] == (128, 1408, 2816)
    assert shapes["layers.0.experts.down_proj"] == (128, 2816, 704)
    assert shapes["layers.0.mlp.gate_proj.weight"] == (2112, 2816)
    for moe in MOE_FORMULATIONS:
        text = DiffusionGemmaText(config, moe)
        ours = {
            name: stored_layout(text, name).shape
            for name, _ in text.named_parameters()
            if not name.endswith("encoder_layer_scalar")
        }
        assert ours == shapes, moe  # canvasrt's model reads exactly these tensors
    if layers == 2:  # the 2-layer model: 2.4B parameters, 4.8 GB in bf16
        assert 2.3e9 < sum(p.numel() for p in model.model.decoder.parameters()) < 2.5e9


def test_layers_for_other_presets_repeat_their_pattern_and_end_full():
    assert preset_text("tiny", 3)["layer_types"] == [SLIDING, FULL, FULL]
    assert preset_text("bench", 6)["layer_types"] == [SLIDING] * 3 + [FULL, SLIDING, FULL]
    assert preset_text("tiny")["num_hidden_layers"] == 4


def test_random_checkpoint_layers_writes_that_many(tmp_path):
    result = cli("random-checkpoint", tmp_path / "ckpt", "--layers", 2)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["text_config"]
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == [SLIDING, FULL]
    assert load_model_config(tmp_path / "ckpt").num_layers == 2


def test_random_checkpoint_bad_layers_one_line_exit_2(tmp_path):
    result = cli("random-checkpoint", tmp_path / "ckpt", "--layers", "0")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--layers must be at least 1 (got 0)" in result.output and not (tmp_path / "ckpt").exists()
