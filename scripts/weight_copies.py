"""How many copies of the weights an export, an ONNX Runtime session and an engine hold (the one-copy issue).

    .venv/bin/python scripts/weight_copies.py CKPT ART [--engines ENG] [--json]

- checkpoint: the text stack's weight bytes in the artifacts' dtype (every parameter of the model canvasrt exports,
  the tied embedding once), from the checkpoint's tensor shapes alone;
- artifacts: the bytes of the graph's initializers (what the graph files carry as weights), and the ratio;
- ONNX Runtime: resident memory of a fresh process after it activated the backend and after it ran one prefill,
  one commit and one denoising step (so every weight was read), against the weight bytes; measured in a child
  process so that nothing else this script loaded counts;
- engines (optional): the engine file's bytes against the weight bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WIDTH = {"fp32": 4, "fp16": 2, "bf16": 2}


def checkpoint_weight_bytes(checkpoint: Path, dtype: str) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from canvasrt.model.checkpoint import Checkpoint

    model = Checkpoint.open(checkpoint).load_text_model(
        dtype=dtype, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)
    )
    return sum(p.numel() for p in model.parameters()) * WIDTH[dtype]


def graph_weight_bytes(path: Path) -> int:
    """Initializer bytes of an ONNX graph, read from the proto without loading external data."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(ExternalDataInfo(tensor).length)
        else:
            total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


def _memory() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def session_memory(artifacts: Path) -> dict[str, dict[str, int]]:
    """Runs in the child: memory before, after activation and after one call of each phase."""
    import numpy as np

    from canvasrt.core.manifest import ArtifactManifest
    from canvasrt.runtime.backends.onnxruntime import OnnxRuntimeExecutor
    from canvasrt.runtime.step import Draws, StepBackend, StepInputs

    manifest = ArtifactManifest.load(artifacts)
    before = _memory()
    backend = StepBackend(OnnxRuntimeExecutor(manifest))
    with backend:
        loaded = _memory()
        canvas = manifest.capacity.canvas
        backend.start(np.ones((1, 8), bool))
        backend.encode(np.arange(3, 11)[None], np.arange(8), np.zeros(1, np.int64))
        backend.encode(np.full((1, canvas), 5), np.arange(8, 8 + canvas), np.full(1, 8))
        draws = Draws(renoise_ids=np.zeros((1, canvas), np.int64), uniforms=np.full((1, canvas), 0.5, np.float32))
        backend.denoise(StepInputs.uniform(np.full((1, canvas), 5), np.full(1, 8 + canvas), 1.0, 0.0, draws, True))
        ran = _memory()
    return {"before": before, "loaded": loaded, "after_each_phase": ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--engines", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(session_memory(args.artifacts)))
        return

    from canvasrt.core.manifest import ArtifactManifest, EngineManifest

    manifest = ArtifactManifest.load(args.artifacts)
    weights = checkpoint_weight_bytes(args.checkpoint, manifest.dtype)
    graphs = {name: graph_weight_bytes(manifest.graph_path(name)) for name in manifest.graphs}
    child = subprocess.run(
        [sys.executable, __file__, str(args.checkpoint), str(args.artifacts), "--child"],
        check=True,
        capture_output=True,
        text=True,
    )
    memory = json.loads(child.stdout.strip().splitlines()[-1])
    report = {
        "dtype": manifest.dtype,
        "checkpoint_weight_bytes": weights,
        "graph_weight_bytes": graphs,
        "artifact_ratio": sum(graphs.values()) / weights,
        "onnxruntime": memory,
        "onnxruntime_rss_ratio_loaded": (memory["loaded"]["VmRSS"] - memory["before"]["VmRSS"]) / weights,
        "onnxruntime_rss_ratio_after_each_phase": (memory["after_each_phase"]["VmRSS"] - memory["before"]["VmRSS"])
        / weights,
        "onnxruntime_rss_total_ratio_after_each_phase": memory["after_each_phase"]["VmRSS"] / weights,
    }
    if args.engines is not None:
        engines = EngineManifest.load(args.engines)
        report["engine_bytes"] = {name: entry.bytes for name, entry in engines.engines.items()}
        report["engine_ratio"] = sum(report["engine_bytes"].values()) / weights
    if args.json:
        print(json.dumps(report, indent=2))
        return
    gib = 1 << 30
    print(f"checkpoint text weights ({manifest.dtype}): {weights / gib:.3f} GiB")
    print(
        f"artifact weights: {sum(graphs.values()) / gib:.3f} GiB ({', '.join(graphs)}), "
        f"ratio {report['artifact_ratio']:.4f}"
    )
    for stage in ("loaded", "after_each_phase"):
        m = memory[stage]
        grown = (m["VmRSS"] - memory["before"]["VmRSS"]) / weights
        print(
            f"onnxruntime {stage}: RSS {m['VmRSS'] / gib:.3f} GiB (anonymous {m['RssAnon'] / gib:.3f}, file "
            f"{m['RssFile'] / gib:.3f}); growth over the process before loading / weights = {grown:.3f}, "
            f"total RSS / weights = {m['VmRSS'] / weights:.3f}"
        )
    if args.engines is not None:
        print(f"engine: {sum(report['engine_bytes'].values()) / gib:.3f} GiB, ratio {report['engine_ratio']:.4f}")


if __name__ == "__main__":
    main()
