"""scripts/working_memory.py on the tiny export: the liveness walk itself on a hand-built graph, and what a denoising
step of the exported graph holds: no [rows, canvas, vocabulary] tensor, and the dense experts' activations of one
run of tokens only (one canvas at up to DENSE_PIECES rows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from canvasrt.core.manifest import ArtifactManifest
from canvasrt.model.modeling import DENSE_PIECES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "working_memory.py"
sys.path.insert(0, str(SCRIPT.parent))

from working_memory import liveness  # noqa: E402


def test_liveness_frees_after_the_last_consumer_and_views_share_their_buffer(tmp_path):
    """x -> a = Relu(x) -> b = Reshape(a) (a view) -> c = Relu(b) -> d = Add(c, a): at Add, a (through b), c and d
    are alive, 3 x 4 x 8 floats; a Relu of x alone afterwards is not counted on top, since c and a are freed."""
    floats = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [4, 8])  # noqa: E731
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [8, 4])
    back = helper.make_tensor("back", TensorProto.INT64, [2], [4, 8])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["b"]),
        helper.make_node("Reshape", ["b", "back"], ["b2"]),
        helper.make_node("Relu", ["b2"], ["c"]),
        helper.make_node("Add", ["c", "a"], ["d"]),
        helper.make_node("Relu", ["d"], ["e"]),
    ]
    graph = helper.make_graph(nodes, "g", [floats("x")], [floats("e")], [shape, back])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    result = liveness(path, 1, 1, {})
    assert result["peak_bytes"] == 3 * 4 * 8 * 4
    assert sorted(result["alive_at_peak"]) == ["a", "c", "d"]


def test_a_denoising_step_holds_no_vocabulary_sized_tensor_and_one_run_of_expert_tokens(tiny_artifacts):
    manifest = ArtifactManifest.load(tiny_artifacts)
    config, canvas = manifest.model, manifest.capacity.canvas
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tiny_artifacts), "--rows", "1", "--rows", "4", "--top", "1000", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert 0 < result["peak_bytes"]["1"] < result["peak_bytes"]["4"]
    shapes = [entry["shape"] for entry in result["largest"]]
    assert shapes and all(config.vocab_size not in shape for shape in shapes)
    assert [4, canvas, manifest.vocab_chunk] in shapes
    experts = {
        tuple(e["shape"]) for e in result["largest"] if ".experts" in e["tensor"] and e["tensor"].endswith("Gemm")
    }
    run = max(canvas, -(-4 * canvas // DENSE_PIECES))  # a canvas, or a DENSE_PIECES-th of the tokens
    assert experts == {(run, config.num_experts * 2 * config.moe_intermediate_size), (run, config.hidden_size)}
