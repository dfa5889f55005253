"""`canvasrt parity`: every level checked against transformers' DiffusionGemmaForBlockDiffusion.

step: the reference and the exported graphs (ONNX Runtime) get identical inputs at five points: a prefill, a first
  step without self-conditioning, a later step with it, a commit, and a step once the context has grown past the
  sliding window. Per output: max absolute error, relative error (max |a - r| / max |r|), cosine similarity, and
  agreement for discrete outputs (argmax, samples, acceptance).
loop: the torch backend with --rng hf against transformers' generate() (identical sequences and tokens per
  forward), and the artifacts' backend against the torch backend in counter mode (committed-token agreement and
  steps per block).

The result is a report that CI can gate on: exit 0 within tolerance, 1 outside; JSON and JUnit XML on request.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exporter.checkpoint import Checkpoint
from ..exporter.errors import ArtifactError
from ..exporter.manifest import digest_json, read_manifest
from ..exporter.model import categorical_entropy, entropy_bound_accept, sample_inverse_cdf
from .backends.onnxruntime import OnnxRuntimeBackend
from .backends.torch import TorchBackend
from .loop import generate, left_pad
from .reference import Reference
from .rng import make_draws
from .settings import resolve_settings
from .step import Draws

# Tolerances per artifact dtype.
# rel_p99: per position (a token's logits row, a token's K or V head vectors, a single entropy), max |a - r| over
#   that position divided by max |r| over the tensor; the 99th percentile over positions must stay under the limit.
#   The plain maximum is reported too but not gated: MoE top-k routing is discontinuous, so a token whose two best
#   experts are tied to within rounding can pick another expert under any other kernel's summation order and move
#   its own logits a lot while every other position agrees to 1e-6 (seen on the bench preset).
# nrmse: ||a - r|| / ||r||; cos: cosine similarity. fp16/bf16 gate on these, since one ill-conditioned element (an
#   RMS-normalised near-zero vector) dominates half-precision maxima in random-weight models.
# argmax: minimum agreement of the argmax canvas; agree: of acceptance and next canvas (where routing is decided).
# A stage whose reference routing has a near-tie (relative gap between the k-th and (k+1)-th router probability
# below ROUTING_TIE for some token) may legitimately route that token differently; the canvas attends
# bidirectionally, so the change spreads to every position a little. Such stages are reported with the tie count
# and judged by TIE_LIMITS instead (still tight enough to catch a wrong mask, weight or formula).
ROUTING_TIE = 1e-6
TIE_LIMITS = {"nrmse": 0.05, "cos": 0.998}

TOLERANCES = {
    "fp32": {"rel_p99": 1e-4, "cos": 0.999, "argmax": 1.0, "agree": 0.99},
    "fp16": {"nrmse": 0.1, "cos": 0.995, "argmax": 0.9, "agree": 0.9},
    "bf16": {"nrmse": 0.15, "cos": 0.99, "argmax": 0.8, "agree": 0.8},
    # FP8 Q/DQ artifacts against the fp32 reference: a quantization error budget, not an implementation check.
    # Entropies are judged in nats there: a confident model's entropies are ~0.01, so relative errors say nothing.
    "fp8": {"nrmse": 0.25, "cos": 0.97, "argmax": 0.7, "agree": 0.7, "entropy_nats": 0.25},
}


@dataclass
class Check:
    stage: str
    output: str
    metrics: dict[str, float]
    limits: dict[str, float]
    passed: bool
    note: str = ""


@dataclass
class Report:
    level: str
    checkpoint: str
    artifacts: str
    dtype: str
    checks: list[Check] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def write_junit(self, path: str | Path) -> None:
        suite = ET.Element(
            "testsuite",
            name=f"canvasrt.parity.{self.level}",
            tests=str(len(self.checks)),
            failures=str(sum(not c.passed for c in self.checks)),
        )
        for check in self.checks:
            case = ET.SubElement(suite, "testcase", classname=f"parity.{self.level}.{check.stage}", name=check.output)
            details = json.dumps({"metrics": check.metrics, "limits": check.limits, "note": check.note})
            if not check.passed:
                ET.SubElement(case, "failure", message=f"{check.stage}/{check.output} outside tolerance").text = details
            else:
                ET.SubElement(case, "system-out").text = details
        ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


# -- metrics ------------------------------------------------------------------------------------------------------


def continuous(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if not a.size:
        return {"max_abs": 0.0, "rel": 0.0, "rel_p99": 0.0, "nrmse": 0.0, "cos": 1.0}
    diff = np.abs(a - r)
    per_position = diff.reshape(-1, a.shape[-1]).max(axis=1) if a.ndim >= 3 else diff.ravel()
    scale, norm = float(np.max(np.abs(r))), float(np.linalg.norm(r))
    scale = scale if scale > 0 else 1.0
    denom = float(np.linalg.norm(a) * norm)
    return {
        "max_abs": float(diff.max()),
        "rel": float(diff.max()) / scale,
        "rel_p99": float(np.percentile(per_position, 99)) / scale,
        "nrmse": float(np.linalg.norm(a - r)) / norm if norm > 0 else float(diff.max()),
        "cos": float((a.ravel() @ r.ravel()) / denom) if denom > 0 else 1.0,
    }


def _judge_continuous(stage: str, name: str, actual: np.ndarray, reference: np.ndarray, tol: dict) -> Check:
    m = continuous(actual, reference)
    if "entropy" in name and "entropy_nats" in tol:
        limits = {"max_abs": tol["entropy_nats"]}
    else:
        limits = {k: tol[k] for k in ("rel_p99", "nrmse", "cos") if k in tol}
    ok = all(m[k] >= v if k == "cos" else m[k] <= v for k, v in limits.items())
    return Check(stage, name, m, limits, ok)


def _judge_agreement(stage: str, name: str, actual: np.ndarray, reference: np.ndarray, minimum: float) -> Check:
    agree = float(np.mean(np.asarray(actual) == np.asarray(reference)))
    return Check(stage, name, {"agreement": agree}, {"agreement": minimum}, agree >= minimum)


# -- step level ---------------------------------------------------------------------------------------------------


def _check_artifacts_match(checkpoint: Checkpoint, manifest: dict[str, Any], artifacts: Path) -> None:
    if manifest["config_digest"] != digest_json(checkpoint.config.to_dict()):
        raise ArtifactError(f"{artifacts} was exported from a checkpoint with another config than {checkpoint.path}")


def _step_reference(ref_logits: torch.Tensor, temperature: float, bound: float, draws: Draws, model: Any) -> dict:
    """The sampler math on the reference logits, with the same draws the graph gets."""
    z = ref_logits / temperature
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
    sampled = sample_inverse_cdf(probs, torch.from_numpy(draws.uniforms))
    entropy = categorical_entropy(z)
    accepted = entropy_bound_accept(entropy, torch.full((z.shape[0],), bound))
    emb = model.embedding
    soft = torch.softmax(z.to(emb.dtype), dim=-1, dtype=torch.float32).to(emb.dtype) @ emb
    soft = soft * torch.tensor(math.sqrt(emb.shape[1]), dtype=emb.dtype)
    return {
        "logits": ref_logits.numpy(),
        "z": z,
        "argmax": torch.argmax(z, dim=-1).numpy(),
        "sampled": sampled.numpy(),
        "entropy": entropy.numpy(),
        "mean_entropy": entropy.mean(-1).numpy(),
        "accepted": accepted.numpy(),
        "next_canvas": torch.where(accepted, sampled, torch.from_numpy(draws.renoise_ids)).numpy(),
        "next_self_cond": soft.numpy(),
    }


@torch.inference_mode()
def step_parity(checkpoint_dir: str | Path, artifacts: str | Path, seed: int = 0, threads: int | None = None) -> Report:
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    checkpoint = Checkpoint.open(checkpoint_dir)
    _check_artifacts_match(checkpoint, manifest, artifacts)
    dtype = "fp8" if manifest.get("quantization") else manifest["dtype"]
    tol = TOLERANCES[dtype]
    report = Report("step", str(checkpoint_dir), str(artifacts), dtype)
    backend = OnnxRuntimeBackend(artifacts, threads=threads)
    backend.activate()
    reference = Reference(checkpoint_dir)
    cap = manifest["capacity"]
    model = manifest["model"]
    canvas, vocab, window = cap["canvas"], model["vocab_size"], model["sliding_window"]
    settings = resolve_settings(manifest.get("generation") or {})
    rng = np.random.default_rng(seed)

    # A prompt past the sliding window where capacity allows, a second row left-padded by 3 when batch allows.
    prompt_len = max(4, min(cap["max_prefill"], cap["max_context"] - canvas, window + 4))
    batch = min(2, cap["max_batch"])
    ids = rng.integers(3, vocab, size=(batch, prompt_len)).astype(np.int64)
    padding = np.ones((batch, prompt_len), dtype=bool)
    if batch > 1:
        padding[1, :3] = False
        ids[1, :3] = settings.pad_token_id or 0
    report.info = {"batch": batch, "prompt_length": prompt_len, "canvas": canvas, "sliding_window": window, "seed": seed}

    backend.start(padding)
    context = np.zeros(batch, dtype=np.int64)
    backend.encode(ids, np.arange(prompt_len), context)
    state = reference.encode(None, ids, padding)
    context = context + prompt_len
    report.checks += _kv_checks("prefill", backend, reference, state, padding, tol)

    def step(stage: str, canvas_ids: np.ndarray, remaining: int, self_cond_logits: torch.Tensor | None) -> dict:
        temperature = settings.temperature(remaining)
        draws = Draws(
            renoise_ids=rng.integers(0, vocab, size=(batch, canvas)).astype(np.int64),
            uniforms=rng.random((batch, canvas), dtype=np.float32),
        )
        ref = _step_reference(
            reference.logits(state, canvas_ids, self_cond_logits), temperature, settings.entropy_bound, draws, reference
        )
        ties = int((reference.routing_margin < ROUTING_TIE).sum())
        if ties:
            report.info.setdefault("routing_ties", {})[stage] = ties
        stage_tol = tol
        if ties and dtype == "fp32":
            stage_tol = {**{k: v for k, v in tol.items() if k != "rel_p99"}, **TIE_LIMITS}
        untied = reference.routing_margin >= ROUTING_TIE  # discrete outputs are compared where routing is decided
        first = self_cond_logits is None
        if not first:
            backend.self_cond = ref_soft_input(self_cond_logits, reference, backend.dtype)
        out = backend.denoise(
            canvas_ids,
            context,
            np.full(batch, temperature, np.float32),
            np.full(batch, settings.entropy_bound, np.float32),
            draws,
            first,
            np.zeros(batch, dtype=bool),
        )
        if "logits" in out.extras:
            report.checks.append(_judge_continuous(stage, "logits", out.extras["logits"], ref["logits"], stage_tol))
            argmax_logits = np.argmax(out.extras["logits"], axis=-1)
            report.checks.append(
                _judge_agreement(stage, "logits_argmax", argmax_logits, np.argmax(ref["logits"], -1), tol["argmax"])
            )
        report.checks.append(_judge_agreement(stage, "argmax", out.argmax[untied], ref["argmax"][untied], tol["argmax"]))
        report.checks.append(_judge_continuous(stage, "entropy", out.entropy, ref["entropy"], stage_tol))
        report.checks.append(_judge_continuous(stage, "mean_entropy", out.mean_entropy, ref["mean_entropy"], stage_tol))
        report.checks.append(_judge_continuous(stage, "next_self_cond", backend.self_cond, ref["next_self_cond"], stage_tol))
        accepted = ref["accepted"] & untied
        if "sampled" in out.extras and accepted.any():
            # Reported, not gated: a sample is a discontinuous function of the logits (the always-accepted
            # lowest-entropy token of a flat random model sits on a near-uniform CDF); next_canvas carries what matters.
            check = _judge_agreement(stage, "sampled_accepted", out.extras["sampled"][accepted], ref["sampled"][accepted], 0.0)
            check.note = f"{int(accepted.sum())} accepted positions"
            report.checks.append(check)
        for name, actual in (("accepted", out.accepted), ("next_canvas", out.next_canvas)):
            report.checks.append(_judge_agreement(stage, name, actual[untied], ref[name][untied], tol["agree"]))
        return ref

    n = settings.max_denoising_steps
    first_canvas = rng.integers(0, vocab, size=(batch, canvas)).astype(np.int64)
    ref1 = step("step_first", first_canvas, n, None)
    ref2 = step("step_self_conditioned", ref1["next_canvas"], max(n - 1, 1), ref1["z"].to(reference.embedding.dtype))

    commit_ids = np.ascontiguousarray(ref2["argmax"])
    commit_pos = np.arange(prompt_len, prompt_len + canvas)
    backend.encode(commit_ids, commit_pos, context)
    state = reference.encode(state, commit_ids, np.ones((batch, canvas), dtype=bool))
    context = context + canvas
    report.checks += _kv_checks("commit", backend, reference, state, np.concatenate([padding, np.ones((batch, canvas), bool)], 1), tol)
    report.info["context_after_commit"] = int(context[0])
    report.info["past_sliding_window"] = bool(context[0] > window - 1)
    step("step_after_commit", rng.integers(0, vocab, size=(batch, canvas)).astype(np.int64), n, None)
    backend.deactivate()
    return report


def ref_soft_input(self_cond_logits: torch.Tensor, reference: Reference, dtype: Any) -> np.ndarray:
    """The soft embedding transformers computes from the self-conditioning logits it is given."""
    emb = reference.embedding
    probs = torch.softmax(self_cond_logits, dim=-1, dtype=torch.float32).to(emb.dtype)
    soft = (probs @ emb) * torch.tensor(math.sqrt(emb.shape[1]), dtype=emb.dtype)
    return soft.numpy().astype(dtype)


def _kv_checks(stage: str, backend: OnnxRuntimeBackend, reference: Reference, state: Any, valid: np.ndarray, tol: dict) -> list[Check]:
    """Compares each layer's buffered K/V with the reference cache at the positions both hold and that are real."""
    worst: dict[str, tuple[float, Check]] = {}
    for i, layer in enumerate(backend.buffers.layout):
        ref_k, ref_v, positions = reference.cached_kv(state, i)
        slots = positions % layer.slots if layer.ring else positions
        real = valid[:, positions]  # [B, n]
        for part, ours, theirs in (("key", backend.buffers.keys[i], ref_k), ("value", backend.buffers.values[i], ref_v)):
            a = ours[:, :, slots].transpose(0, 2, 1, 3)[real]
            r = theirs.numpy().transpose(0, 2, 1, 3)[real]
            check = _judge_continuous(stage, part, a, r, tol)
            check.note = f"worst layer {i}"
            if part not in worst or check.metrics["rel"] > worst[part][0]:
                worst[part] = (check.metrics["rel"], check)
            if not check.passed:
                worst[part] = (math.inf, check)
    return [entry[1] for entry in worst.values()]


# -- loop level ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def loop_parity(
    checkpoint_dir: str | Path, artifacts: str | Path, seed: int = 0, threads: int | None = None, max_new_tokens: int | None = None
) -> Report:
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    checkpoint = Checkpoint.open(checkpoint_dir)
    _check_artifacts_match(checkpoint, manifest, artifacts)
    cap, model = manifest["capacity"], manifest["model"]
    canvas, vocab = cap["canvas"], model["vocab_size"]
    dtype = "fp8" if manifest.get("quantization") else manifest["dtype"]
    report = Report("loop", str(checkpoint_dir), str(artifacts), dtype)
    rng = np.random.default_rng(seed)
    prompt_len = max(4, min(cap["max_context"] - 2 * canvas, model["sliding_window"] + 4, 24))
    blocks = 2 if prompt_len + canvas <= cap["max_context"] else 1
    settings = resolve_settings(manifest.get("generation") or {}, {"max_new_tokens": max_new_tokens or blocks * canvas})
    rows = [rng.integers(3, vocab, size=prompt_len).tolist(), rng.integers(3, vocab, size=max(1, prompt_len - 3)).tolist()]
    rows = rows[: min(2, cap["max_batch"])]
    report.info = {"prompt_lengths": [len(r) for r in rows], "settings": settings.to_dict(), "seed": seed}

    torch_backend = TorchBackend(checkpoint_dir, moe=manifest["moe"], max_batch=len(rows), max_context=cap["max_context"],
                                 threads=threads)
    torch_backend.activate()
    hf_kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "max_denoising_steps": settings.max_denoising_steps,
        "t_min": settings.t_min,
        "t_max": settings.t_max,
        "stability_threshold": settings.stability_threshold,
        "confidence_threshold": settings.confidence_threshold,
    }
    for batch in range(1, len(rows) + 1):
        ids, padding = left_pad(rows[:batch], settings.pad_token_id or 0)
        # Eager attention, except where transformers' generate() cannot run it (left padding, see reference.py).
        reference = Reference(checkpoint_dir, attention="eager" if padding.all() else "sdpa")
        expected = reference.generate(ids, padding, seed, **hf_kwargs)
        ours = generate(torch_backend, ids, padding, settings, make_draws("hf", seed, batch, vocab, canvas))
        same = np.array_equal(ours.sequences, expected.sequences.numpy())
        tpf = float(np.max(np.abs(ours.tokens_per_forward - expected.tokens_per_forward.numpy())))
        report.checks.append(
            Check(f"torch_hf_batch{batch}", "sequences", {"identical": float(same)}, {"identical": 1.0}, same)
        )
        report.checks.append(
            Check(f"torch_hf_batch{batch}", "tokens_per_forward", {"max_abs": tpf}, {"max_abs": 0.0}, tpf == 0.0)
        )

    ids, padding = left_pad(rows, settings.pad_token_id or 0)
    artifact_backend = OnnxRuntimeBackend(artifacts, threads=threads)
    artifact_backend.activate()
    if manifest.get("quantization"):
        # FP8 artifacts are compared with the torch backend simulating the same FP8 scales: this is where their
        # Q/DQ placement and scales are checked token for token; the accuracy cost is what `canvasrt eval` measures.
        calibration = json.loads((artifacts / manifest["quantization"]["calibration"]).read_text())
        torch_backend = TorchBackend(checkpoint_dir, moe=manifest["moe"], max_batch=len(rows),
                                     max_context=cap["max_context"], threads=threads, calibration=calibration)
        torch_backend.activate()
        report.info["torch_backend"] = "fake-quantized with the artifacts' calibration"
    results = {}
    for backend in (torch_backend, artifact_backend):
        results[backend.name] = generate(backend, ids, padding, settings, make_draws("counter", seed, len(rows), vocab, canvas))
    a, t = results["onnxruntime"], results["torch"]
    minimum = 1.0 if dtype in ("fp32", "fp8") else TOLERANCES[dtype]["agree"]
    width = min(a.new_tokens.shape[1], t.new_tokens.shape[1])
    for block in range(math.ceil(width / canvas)):
        sl = slice(block * canvas, (block + 1) * canvas)
        report.checks.append(
            _judge_agreement(f"onnxruntime_vs_torch_block{block}", "committed_tokens", a.new_tokens[:, sl], t.new_tokens[:, sl], minimum)
        )
    same_steps = a.steps_per_block == t.steps_per_block
    report.checks.append(
        Check("onnxruntime_vs_torch", "steps_per_block", {"onnxruntime": a.steps_per_block, "torch": t.steps_per_block},
              {}, same_steps or dtype not in ("fp32", "fp8"))
    )
    report.checks.append(
        Check("onnxruntime_vs_torch", "sequence_length", {"onnxruntime": a.sequences.shape[1], "torch": t.sequences.shape[1]},
              {}, a.sequences.shape == t.sequences.shape or dtype not in ("fp32", "fp8"))
    )
    return report
