"""scripts/roofline.py on a tiny export: it runs, its GEMM counts match a hand computation, and the scaling to the
released layer pattern and the routed formulation follow from the counted GEMMs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from canvasrt.core.config import FULL, SLIDING
from canvasrt.core.manifest import ArtifactManifest
from canvasrt.model.modeling import DENSE_PIECES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "roofline.py"


def _roofline(artifacts: Path, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(artifacts), "--json", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_roofline_counts_match_a_hand_computation(tiny_artifacts):
    manifest = ArtifactManifest.load(tiny_artifacts)
    config, canvas = manifest.model, manifest.capacity.canvas
    r = _roofline(tiny_artifacts, "--layers", "30", "--batch", "2")
    tokens = 2 * canvas
    by_weight = {g["weight"]: g for g in r["gemms"] if g["weight"]}
    # The experts' gate/up GEMMs of layer 0, dense: every expert on every token, [tokens, H] x [E * 2I, H]^T, over
    # the runs of tokens together.
    gate_up = by_weight["layers.0.experts.gate_up_proj"]
    flops = sum(g["flops"] for g in r["gemms"] if g["weight"] == "layers.0.experts.gate_up_proj")
    assert flops == 2 * config.num_experts * 2 * config.moe_intermediate_size * config.hidden_size * tokens
    assert gate_up["expert"] and gate_up["layer"] == "0"
    assert gate_up["weight_elements"] == config.num_experts * 2 * config.moe_intermediate_size * config.hidden_size
    q = by_weight["layers.1.self_attn.q_proj.weight"]
    assert q["flops"] == 2 * tokens * config.hidden_size * config.num_heads * config.layers[1].head_dim
    # Full-attention scores over every K/V slot plus the canvas: [B, nkv, group, C, d] x [B, nkv, 1, d, slots + C].
    full = next(i for i, spec in enumerate(config.layers) if spec.kind == FULL)
    scores = [g for g in r["gemms"] if g["layer"] == str(full) and g["weight"] is None]
    d = config.layers[full].head_dim
    assert scores[0]["flops"] == 2 * 2 * config.num_heads * canvas * d * (manifest.capacity.max_context + canvas)

    assert r["layer_kinds"] == {SLIDING: 25, FULL: 5}
    dense, routed = r["formulations"]["dense"], r["formulations"]["routed"]
    per_layer = {}
    for g in r["gemms"]:
        per_layer[g["layer"]] = per_layer.get(g["layer"], 0) + g["flops"]
    kinds = [spec.kind for spec in config.layers]
    mean = {
        k: sum(per_layer[str(i)] for i, kind in enumerate(kinds) if kind == k) / kinds.count(k) for k in (SLIDING, FULL)
    }
    assert dense["gflop"] * 1e9 == pytest.approx(per_layer["shared"] + 25 * mean[SLIDING] + 5 * mean[FULL], rel=1e-9)
    share = config.top_k_experts / config.num_experts
    assert routed["expert_gflop"] == pytest.approx(dense["expert_gflop"] * share, rel=1e-9)
    assert dense["gflop"] - routed["gflop"] == pytest.approx(dense["expert_gflop"] * (1 - share), rel=1e-9)
    for row in (dense, routed):
        assert row["step_ms"] == pytest.approx(max(row["compute_ms"], row["memory_ms"]))
        assert row["compute_ms"] == pytest.approx(row["gflop"] / 989)  # GFLOP / (989 TFLOP/s) in ms
        assert row["tokens_per_s"] == pytest.approx(tokens / (48 * row["step_ms"] / 1e3))


def test_roofline_prints_its_table(tiny_artifacts):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tiny_artifacts)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("30 layers (25 sliding, 5 full)")
    assert [line.split()[0] for line in lines[2:4]] == ["dense", "routed"]


def test_roofline_counts_attention_over_the_live_context(tiny_artifacts):
    """--context: the step's K/V inputs are the slots covering that context in whole canvases (20 tokens: 32 of the
    128 full-layer slots), and so are the attention scores' FLOPs and the K/V bytes."""
    manifest = ArtifactManifest.load(tiny_artifacts)
    config, canvas = manifest.model, manifest.capacity.canvas
    full = next(i for i, spec in enumerate(config.layers) if spec.kind == FULL)
    d = config.layers[full].head_dim
    counted = {context: _roofline(tiny_artifacts, "--context", str(context)) for context in (20, 128)}
    for context, span in ((20, 32), (128, 128)):
        scores = [g for g in counted[context]["gemms"] if g["layer"] == str(full) and g["weight"] is None]
        assert scores[0]["flops"] == 2 * config.num_heads * canvas * d * (canvas + span)
        assert counted[context]["context"] == context
    assert counted[20]["formulations"]["dense"]["gbyte"] < counted[128]["formulations"]["dense"]["gbyte"]


def test_roofline_counts_each_vocabulary_chunk_of_the_lm_head_once(tiny_artifacts):
    """The chunked LM head reads the embedding through slices: their bytes add up to the embedding's, once."""
    r = _roofline(tiny_artifacts, "--batch", "1")
    config = ArtifactManifest.load(tiny_artifacts).model
    sliced = {g["weight_tensor"]: g["weight_elements"] for g in r["gemms"] if g["weight"] == "embed_tokens.weight"}
    assert len(sliced) == 3 and sum(sliced.values()) == config.vocab_size * config.hidden_size


def test_roofline_counts_the_dense_experts_weights_once_per_run_of_tokens(tiny_artifacts):
    """The dense experts run a step's tokens in runs of at least a canvas, each run's GEMMs reading the whole expert
    weights: one run at one row, DENSE_PIECES at DENSE_PIECES rows. The routed formulation reads each weight once."""
    one, many = (_roofline(tiny_artifacts, "--batch", str(rows)) for rows in (1, DENSE_PIECES))
    assert many["formulations"]["dense"]["expert_gbyte"] == pytest.approx(
        DENSE_PIECES * one["formulations"]["dense"]["expert_gbyte"], rel=1e-9
    )
    hit = many["experts_hit_share"]
    assert many["formulations"]["routed"]["expert_gbyte"] == pytest.approx(
        hit * one["formulations"]["dense"]["expert_gbyte"], rel=1e-9
    )


def test_capacity_divides_the_free_memory_by_kv_and_working_memory_per_row(tiny_artifacts, tmp_path):
    manifest = ArtifactManifest.load(tiny_artifacts)
    config = manifest.model
    bench = tmp_path / "bench.json"
    memory = {"working_bytes": {"1": 3_000_000, "4": 9_000_000}, "working_bytes_per_row": 2_000_000}
    bench.write_text(json.dumps({"backends": {"onnxruntime": {"memory": memory}}}))
    script = SCRIPT.with_name("capacity.py")
    args = ["--bench", f"b={bench}", "--gpu-gb", "1", "--reserve-gb", "0.5", "--context", "64", "--json"]
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_artifacts), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    spec = {layer.kind: layer for layer in config.layers}
    ring = config.sliding_capacity
    kv = 2 * 2 * (25 * spec[SLIDING].num_kv_heads * spec[SLIDING].head_dim * min(ring, 64))
    kv += 2 * 2 * 5 * spec[FULL].num_kv_heads * spec[FULL].head_dim * 64
    assert r["kv_bytes_per_row"] == kv
    free = 1e9 - r["weights_bytes"] - 0.5e9 - (3_000_000 - 2_000_000)
    assert r["configurations"]["b"]["rows"] == int(free // (kv + 2_000_000))
    assert r["configurations"]["vLLM recipe (--max-num-seqs 4)"]["rows"] == 4
