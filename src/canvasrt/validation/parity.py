"""`canvasrt parity`: every level checked against transformers' DiffusionGemmaForBlockDiffusion.

Any `StepBackend` can be checked, through the step interface alone: the ONNX graphs on ONNX Runtime, FP8 artifacts
simulated by the torch backend, TensorRT engines.

step: the reference and the backend get identical inputs at five points: a prefill, a first step without
  self-conditioning, a later step with it, a commit, and a step once the context has grown past the sliding window.
  Per output: max absolute error, relative error (max |a - r| / max |r|), cosine similarity, and agreement for
  discrete outputs (argmax, samples, acceptance). The reference runs all five first and keeps only what is compared;
  it is freed before the backend is activated, so the two are never resident together.
loop: the torch backend with --rng hf against transformers' generate() (identical sequences and tokens per
  forward), and the backend against the torch backend in counter mode (committed-token agreement and steps per
  block); FP8 backends against the torch backend simulating the same scales.

The result is a report that CI can gate on: exit 0 within tolerance, 1 outside; JSON and JUnit XML on request.
"""

from __future__ import annotations

import json
import math
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.config import ModelConfig, VisionConfig
from ..core.errors import ArtifactError
from ..core.manifest import ArtifactManifest, EngineManifest, StepSpec
from ..core.target import CheckpointDir, open_target
from ..model.checkpoint import Checkpoint
from ..model.modeling import categorical_entropy, entropy_bound_accept, sample_inverse_cdf, soft_embedding
from ..runtime.backends import open_backend
from ..runtime.backends.torch import TorchExecutor
from ..runtime.images import ImageBatch, ImageProcessor, PromptImages, expand_ids, soft_tokens
from ..runtime.loop import generate, left_pad
from ..runtime.rng import make_draws
from ..runtime.settings import GenerationSettings, resolve_settings
from ..runtime.step import Draws, StepBackend, StepInputs
from .reference import Reference

# Tolerances per artifact dtype.
# rel_p99: per position (a token's logits row, a token's K or V head vectors, a single entropy), max |a - r| over
#   that position divided by max |r| over the tensor; the 99th percentile over positions must stay under the limit.
#   The plain maximum is reported too but not gated: MoE top-k routing is discontinuous, so a token whose two best
#   experts are tied to within rounding can pick another expert under any other kernel's summation order and move
#   its own logits a lot while every other position agrees to 1e-6 (seen on the bench preset).
#   In fp32 it is the budget of the backbone's outputs (K/V, logits): their rounding accumulates through every
#   layer's GEMMs and norms, which no closed form bounds. What the sampler derives from the logits (entropy, mean
#   entropy, the next self-conditioning state) is gated in fp32 by `sampler_bounds` instead: the difference that
#   logits within this budget and fp32 rounding can make to each quantity, per position.
# nrmse: ||a - r|| / ||r||; cos: cosine similarity. fp16/bf16 gate on these, since one ill-conditioned element (an
#   RMS-normalised near-zero vector) dominates half-precision maxima in random-weight models.
# argmax: minimum agreement of the argmax canvas; agree: of acceptance and next canvas (where routing is decided).
# A stage whose reference routing has a near-tie (relative gap between the k-th and (k+1)-th router probability
# below ROUTING_TIE for some token) may legitimately route that token differently; the canvas attends
# bidirectionally, so the change spreads to every position a little. Such stages are reported with the tie count
# and judged by TIE_LIMITS instead (still tight enough to catch a wrong mask, weight or formula).
ROUTING_TIE = 1e-6
TIE_LIMITS = {"nrmse": 0.05, "cos": 0.998}
# Bounds on what parity holds at once at the released vocabulary (262144): positions of the sampler math per block,
# float64 elements per block of a comparison, and the size from which a kept reference output goes to disk.
SAMPLER_BLOCK = 64
METRIC_BLOCK = 1 << 22
SPILL_ABOVE = 1 << 20
# fp32's unit roundoff (the largest relative error of one rounding), and the constant of the probabilistic bound
# on a sum of n terms, SUM_GROWTH * sqrt(n) * unit roundoff of its magnitude (see `sampler_bounds`).
UNIT_ROUNDOFF = 2.0**-24
SUM_GROWTH = 4.0
# The sampler outputs gated by `sampler_bounds` in fp32, and the p99 over positions of |a - r| / bound they keep.
BOUNDED = ("entropy", "mean_entropy", "next_self_cond")
BOUND_P99 = 1.0

TOLERANCES = {
    "fp32": {"rel_p99": 1e-4, "cos": 0.999, "argmax": 1.0, "agree": 0.99, "bound_p99": BOUND_P99},
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
    backend: str
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
    """The metrics of `actual` against `reference`, accumulated in float64 over blocks of METRIC_BLOCK elements:
    at the released width one step's logits are [B, 256, 262144], and float64 copies of both and of their
    difference whole would be 3 GB per batch row."""
    a_all, r_all = np.asarray(actual), np.asarray(reference)
    if not a_all.size:
        return {"max_abs": 0.0, "rel": 0.0, "rel_p99": 0.0, "nrmse": 0.0, "cos": 1.0}
    width = a_all.shape[-1] if a_all.ndim >= 3 else 1  # a position: a row of the last axis, else one element
    a_rows, r_rows = a_all.reshape(-1, width), r_all.reshape(-1, width)
    per_position = np.empty(len(a_rows))
    scale = ref_sq = act_sq = diff_sq = dot = 0.0
    step = max(1, METRIC_BLOCK // width)
    for begin in range(0, len(a_rows), step):
        a = a_rows[begin : begin + step].astype(np.float64)
        r = r_rows[begin : begin + step].astype(np.float64)
        diff = a - r
        per_position[begin : begin + step] = np.abs(diff).max(axis=1)
        scale = max(scale, float(np.abs(r).max()))
        ref_sq, act_sq = ref_sq + float(np.sum(r * r)), act_sq + float(np.sum(a * a))
        diff_sq, dot = diff_sq + float(np.sum(diff * diff)), dot + float(np.sum(a * r))
    max_abs, norm = float(per_position.max()), math.sqrt(ref_sq)
    scale = scale if scale > 0 else 1.0
    denom = math.sqrt(act_sq) * norm
    return {
        "max_abs": max_abs,
        "rel": max_abs / scale,
        "rel_p99": float(np.percentile(per_position, 99)) / scale,
        "nrmse": math.sqrt(diff_sq) / norm if norm > 0 else max_abs,
        "cos": dot / denom if denom > 0 else 1.0,
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


@torch.inference_mode()
def sampler_bounds(
    z: torch.Tensor, state: torch.Tensor, embedding: torch.Tensor, logit_error: float, chunk: int = 16384
) -> dict[str, torch.Tensor]:
    """How far two fp32 evaluations of the sampler's quantities may lie apart per position, given the
    temperature-scaled logits z [n, V] (fp32) and the state computed from them, sqrt(D) * softmax(z) @ embedding
    [n, D], when the logits fed to the two differ by at most `logit_error` (absolute, on z).

    With u = 2^-24, V the vocabulary, D the hidden size, p = softmax(z), H its entropy and E the embedding; a sum of
    n terms is taken as off by SUM_GROWTH * sqrt(n) * u of its magnitude (Higham and Mary's probabilistic bound;
    torch's fp32 softmax over 262,144 logits measured up to 2.8 sqrt(n) u):
    - rounding of one fp32 evaluation: logsumexp(z) is off by e = u * (|logsumexp(z)| + ln V + log2 V) (its final
      addition and its log; the normaliser's sum, dominated by the largest term, adds about u * log2 V, measured
      within 26 u in all at |logsumexp| ~ 20) and each log-probability z_i - logsumexp(z) by e + u * |log p_i|;
      normalising p and summing -p log p are sums over V. So the entropy is off by
      e * (1 + H) + u * (H + E_p[log^2 p]) + SUM_GROWTH * sqrt(V) * u * H, and each element of the state, a GEMM
      over V, by sqrt(D) * u * (|logsumexp(z)| + ln V + log2 V + SUM_GROWTH * sqrt(V) + sqrt(E_p[log^2 p]))
      * sqrt(E_p[E_j^2]) (E_p|E_j| and E_p[|log p| |E_j|] bounded by Cauchy-Schwarz).
    - logits off by delta_i, |delta_i| <= d: to first order dp_i = p_i (delta_i - E_p[delta]), so
      dH = -sum_i p_i (delta_i - E_p[delta]) (log p_i + H), |dH| <= 2d * E_p|log p + H|, and
      |ds_j| <= 2d * sqrt(D) * E_p|E_j - E_p[E_j]| <= 2d * sqrt(D) * sqrt(Var_p(E_j)).
    Each bound is the logits' term plus the rounding of two evaluations (the reference's and the backend's). On
    peaked distributions over a large vocabulary the rounding term dominates: with logits near 30, logsumexp's
    ulp is ~2e-6, as large as the entropy of a confident position. Also returned: the entropy in float64, against
    which each fp32 entropy's own error shows."""
    u, (vocab, width) = UNIT_ROUNDOFF, embedding.shape
    z64 = z.double()
    lse = torch.logsumexp(z64, dim=-1, keepdim=True)
    log_p = z64 - lse
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=-1)
    spread = (p * (log_p + entropy[:, None]).abs()).sum(dim=-1)
    log_square = (p * log_p * log_p).sum(dim=-1)
    e = u * (lse[:, 0].abs() + math.log(vocab) + math.log2(vocab))
    del z64, log_p, lse
    p = p.float()
    square = torch.zeros(len(z), width, dtype=torch.float32)
    for start in range(0, vocab, chunk):
        rows = embedding[start : start + chunk]
        square += p[:, start : start + chunk] @ (rows * rows)
    scale, mean, square = math.sqrt(width), state.double() / math.sqrt(width), square.double()
    # E_p[E^2] - E_p[E]^2 from fp32 GEMMs carries their rounding, growth * E_p[E^2] each
    growth = SUM_GROWTH * math.sqrt(vocab) * u
    variance = (square - mean * mean).clamp_min(0) + 2 * growth * square
    entropy_rounding = e * (1 + entropy) + u * (entropy + log_square) + growth * entropy
    state_rounding = (e + growth + u * log_square.sqrt())[:, None] * square.sqrt()
    return {
        "entropy_fp64": entropy,
        "entropy": 2 * logit_error * spread + 2 * entropy_rounding,
        "next_self_cond": scale * (2 * logit_error * variance.sqrt() + 2 * state_rounding),
    }


def _judge_bounded(stage: str, name: str, actual: np.ndarray, reference: np.ndarray, bound: np.ndarray) -> Check:
    """|a - r| against a bound per element; per position (a row of the last axis for 3-D outputs, else an element)
    the largest ratio, whose 99th percentile over positions must stay within BOUND_P99 (see `rel_p99` for why not
    the maximum, which is reported)."""
    m = continuous(actual, reference)
    a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    width = a.shape[-1] if a.ndim >= 3 else 1
    ratio = (np.abs(a - r) / np.asarray(bound, np.float64)).reshape(-1, width).max(axis=1)
    m["bound_p99"] = float(np.percentile(ratio, 99)) if ratio.size else 0.0
    m["bound_max"] = float(ratio.max()) if ratio.size else 0.0
    return Check(stage, name, m, {"bound_p99": BOUND_P99}, m["bound_p99"] <= BOUND_P99)


# -- step level ---------------------------------------------------------------------------------------------------


def _step_reference(
    ref_logits: torch.Tensor, temperature: float, bound: float, draws: Draws, embedding: torch.Tensor, spill: _Spill
) -> dict[str, Any]:
    """The sampler math on the reference logits, with the same draws the backend gets. Every per-position quantity
    is computed on SAMPLER_BLOCK positions at a time (each temporary of the whole canvas is [B, C, V] in fp32: 0.5 GB
    per batch row at the released vocabulary); the logits themselves are kept through `spill`."""
    batch, canvas, vocab = ref_logits.shape
    flat, uniforms = ref_logits.reshape(-1, vocab), torch.from_numpy(draws.uniforms).reshape(-1)
    argmax = torch.empty(batch * canvas, dtype=torch.int64)
    sampled = torch.empty(batch * canvas, dtype=torch.int64)
    entropy = torch.empty(batch * canvas, dtype=torch.float32)
    self_cond = torch.empty(batch * canvas, embedding.shape[1], dtype=torch.float32)
    # the sampler's fp32 bounds, for logits within the backbone's budget of the tensor's largest magnitude
    logit_error = TOLERANCES["fp32"]["rel_p99"] * float(flat.abs().max()) / temperature
    bounds: dict[str, list[torch.Tensor]] = {"entropy_fp64": [], "entropy": [], "next_self_cond": []}
    for begin in range(0, batch * canvas, SAMPLER_BLOCK):
        rows = slice(begin, begin + SAMPLER_BLOCK)
        z = flat[rows] / temperature
        argmax[rows] = torch.argmax(z, dim=-1)
        sampled[rows] = sample_inverse_cdf(torch.softmax(z, dim=-1, dtype=torch.float32), uniforms[rows])
        entropy[rows] = categorical_entropy(z)
        # what transformers computes from these logits when they self-condition the next step
        self_cond[rows] = soft_embedding(z, embedding)
        for key, value in sampler_bounds(z, self_cond[rows], embedding.float(), logit_error).items():
            bounds[key].append(value)
    entropy = entropy.reshape(batch, canvas)
    sampled = sampled.reshape(batch, canvas)
    accepted = entropy_bound_accept(entropy, torch.full((batch,), bound))
    entropy_bound = torch.cat(bounds["entropy"]).reshape(batch, canvas)
    entropy_fp64 = torch.cat(bounds["entropy_fp64"]).reshape(batch, canvas)
    return {
        "entropy_fp64": entropy_fp64.numpy(),
        "entropy_bound": entropy_bound.numpy(),
        # the mean's own sum over the canvas adds SUM_GROWTH * sqrt(C) * u * mean(H) per evaluation
        "mean_entropy_bound": (
            entropy_bound.mean(-1) + 2 * SUM_GROWTH * math.sqrt(canvas) * UNIT_ROUNDOFF * entropy_fp64.abs().mean(-1)
        ).numpy(),
        "next_self_cond_bound": spill.keep(torch.cat(bounds["next_self_cond"]).reshape(batch, canvas, -1).numpy()),
        "logits": spill.keep(ref_logits.numpy()),
        "argmax": argmax.reshape(batch, canvas).numpy(),
        "sampled": sampled.numpy(),
        "entropy": entropy.numpy(),
        "mean_entropy": entropy.mean(-1).numpy(),
        "accepted": accepted.numpy(),
        "next_canvas": torch.where(accepted, sampled, torch.from_numpy(draws.renoise_ids)).numpy(),
        "next_self_cond": self_cond.reshape(batch, canvas, -1).numpy(),
    }


class _Spill:
    """Keeps the reference's large outputs (logits, K/V) in .npy files of a temporary directory, read back
    memory-mapped: the plan then holds about nothing in anonymous memory while the backend runs (three steps'
    logits alone are 1.6 GB at the released width)."""

    def __init__(self, directory: Path):
        self.directory, self.count = directory, 0

    def keep(self, array: np.ndarray) -> np.ndarray:
        if array.nbytes < SPILL_ABOVE:
            return array.copy()
        self.count += 1
        path = self.directory / f"{self.count}.npy"
        np.save(path, array)
        return np.load(path, mmap_mode="r")


@dataclass
class StepStage:
    """One denoising step of the plan: its inputs and what the reference produced from them."""

    name: str
    canvas: np.ndarray
    temperature: float
    draws: Draws
    self_cond: np.ndarray | None  # None: the first step of a canvas (zero state)
    reference: dict[str, Any]
    routing_margin: np.ndarray


@dataclass
class EncodeStage:
    name: str
    ids: np.ndarray
    positions: np.ndarray
    valid: np.ndarray  # [B, context] bool: the real (non-padding) positions encoded so far
    reference_kv: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per layer: K, V [B, nkv, n, d], positions [n]
    images: ImageBatch | None = None  # the images whose soft tokens the chunk holds (every row's, in row order)


def image_rows(rows: list[list[int]], images: ImageBatch, vision: VisionConfig) -> list[list[int]]:
    """Prompts built around the images: each row's text with the images' markers after its fourth token (beyond the
    left padding of a shorter row), expanded as the Gemma 4 processor expands them."""
    marked = [row[:4] + [vision.image_token_id] * images.count + row[4:] for row in rows]
    return [expand_ids(row, images.soft_tokens, vision) for row in marked]


def repeated(images: ImageBatch, rows: int) -> ImageBatch:
    """The images of every row, row after row (each row of a parity prompt holds the same images)."""
    return ImageBatch(
        np.concatenate([images.pixel_values] * rows),
        np.concatenate([images.positions] * rows),
        images.soft_tokens * rows,
    )


@torch.inference_mode()
def _reference_plan(
    checkpoint_dir: Path,
    spec: StepSpec,
    settings: GenerationSettings,
    seed: int,
    threads: int | None,
    device: str,
    dtype: str,
    spill: _Spill,
    images: ImageBatch | None = None,
    vision: VisionConfig | None = None,
) -> tuple[list[StepStage | EncodeStage], dict[str, Any], np.ndarray | None]:
    """Runs the reference over the whole plan: prefill, two steps, commit, a step past the window. The reference
    is freed on return; what the plan keeps of its outputs is small or spilled. With images, the prompts are built
    around them and the reference's soft tokens of the images come back too."""
    if threads:
        torch.set_num_threads(threads)
    cap, model = spec.capacity, spec.model
    canvas, vocab, window = cap.canvas, model.vocab_size, model.sliding_window
    rng = np.random.default_rng(seed)
    ids, padding = _plan_prompt(spec, settings, rng, images, vision)
    batch, prompt_len = ids.shape
    info: dict[str, Any] = {
        "batch": batch,
        "prompt_length": prompt_len,
        "canvas": canvas,
        "sliding_window": window,
        "seed": seed,
    }
    reference = Reference(checkpoint_dir, device=device, dtype=dtype)
    steps = _ReferenceSteps(reference, settings, spill, rng, model)
    plan: list[StepStage | EncodeStage] = []
    row_images = None if images is None else repeated(images, batch)
    features = None if images is None else reference.image_features(images)
    state = reference.encode(None, ids, padding, row_images)
    plan.append(EncodeStage("prefill", ids, np.arange(prompt_len), padding, steps.kv(state), row_images))
    n = settings.max_denoising_steps
    first = steps.step("step_first", state, rng.integers(0, vocab, size=(batch, canvas)).astype(np.int64), n, None)
    second = steps.step("step_self_conditioned", state, first.reference["next_canvas"], max(n - 1, 1), first)
    plan += [first, second]
    commit_ids = np.ascontiguousarray(second.reference["argmax"])
    state = reference.encode(state, commit_ids, np.ones((batch, canvas), dtype=bool))
    valid = np.concatenate([padding, np.ones((batch, canvas), bool)], 1)
    plan.append(EncodeStage("commit", commit_ids, np.arange(prompt_len, prompt_len + canvas), valid, steps.kv(state)))
    info["context_after_commit"] = prompt_len + canvas
    info["past_sliding_window"] = bool(prompt_len + canvas > window - 1)
    after = rng.integers(0, vocab, size=(batch, canvas)).astype(np.int64)
    plan.append(steps.step("step_after_commit", state, after, n, None))
    return plan, info, features


def _plan_prompt(
    spec: StepSpec,
    settings: GenerationSettings,
    rng: np.random.Generator,
    images: ImageBatch | None,
    vision: VisionConfig | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The plan's prompt ids and real-token mask [B, P]: a prompt past the sliding window where capacity allows (built
    around the images, if any), and a second row left-padded by 3 when the batch allows."""
    cap, model = spec.capacity, spec.model
    vocab, window = model.vocab_size, model.sliding_window
    room = min(cap.max_prefill, cap.max_context - cap.canvas)
    prompt_len = max(4, min(room, window + 4))
    batch = min(2, cap.max_batch)
    ids = rng.integers(3, vocab, size=(batch, prompt_len)).astype(np.int64)
    if images is not None and vision is not None:
        image_len = sum(images.soft_tokens) + 2 * images.count
        if image_len + 6 > room:
            raise ArtifactError(
                f"the images' {sum(images.soft_tokens)} soft tokens and a short text do not fit one prefill of "
                f"{room} tokens; re-export with a larger --max-context or --max-prefill, or pass a smaller image"
            )
        text_len = max(6, min(room, window + 4) - image_len)
        rows = rng.integers(3, vocab, size=(batch, text_len)).astype(np.int64)
        ids = np.array(image_rows(rows.tolist(), images, vision), dtype=np.int64)
        prompt_len = ids.shape[1]
    padding = np.ones((batch, prompt_len), dtype=bool)
    if batch > 1:
        padding[1, :3] = False
        ids[1, :3] = settings.pad_token_id or 0
    return ids, padding


class _ReferenceSteps:
    """The reference's outputs as the plan keeps them: each layer's K/V after an encoder pass, and denoising steps
    with fresh draws from the plan's generator, large outputs spilled."""

    def __init__(
        self,
        reference: Reference,
        settings: GenerationSettings,
        spill: _Spill,
        rng: np.random.Generator,
        model: ModelConfig,
    ):
        self.reference, self.settings, self.spill, self.rng, self.model = reference, settings, spill, rng, model

    def kv(self, state: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per layer the reference's cached K and V (spilled when large) and the positions they hold."""
        return [
            (self.spill.keep(k.numpy()), self.spill.keep(v.numpy()), p)
            for k, v, p in (self.reference.cached_kv(state, i) for i in range(self.model.num_layers))
        ]

    def step(
        self, name: str, state: Any, canvas_ids: np.ndarray, remaining: int, previous: StepStage | None
    ) -> StepStage:
        """The step on `canvas_ids` with `remaining` steps left in the canvas, self-conditioned on `previous` (None:
        the first step of a canvas)."""
        temperature = self.settings.temperature(remaining)
        batch, canvas = canvas_ids.shape
        vocab = self.model.vocab_size
        draws = Draws(
            renoise_ids=self.rng.integers(0, vocab, size=(batch, canvas)).astype(np.int64),
            uniforms=self.rng.random((batch, canvas), dtype=np.float32),
        )
        self_cond_logits = None
        if previous is not None:  # the previous step's temperature-scaled logits, as transformers passes them
            self_cond_logits = torch.from_numpy(np.array(previous.reference["logits"])).div_(previous.temperature)
        logits = self.reference.logits(state, canvas_ids, self_cond_logits)
        del self_cond_logits
        ref = _step_reference(
            logits, temperature, self.settings.entropy_bound, draws, self.reference.embedding, self.spill
        )
        del logits
        return StepStage(
            name,
            canvas_ids,
            temperature,
            draws,
            None if previous is None else previous.reference["next_self_cond"],
            ref,
            self.reference.routing_margin,
        )


def step_parity(
    checkpoint_dir: str | Path,
    backend: StepBackend,
    seed: int = 0,
    threads: int | None = None,
    target: str | Path = "",
    device: str = "cpu",
    reference_dtype: str = "fp32",
    images: ImageBatch | None = None,
) -> Report:
    """Step-level parity of an inactive backend against the reference (on `device`, in `reference_dtype`); the
    backend is activated here, after the reference has been freed. With images: the prompt is built around them,
    the backend's vision graph output is checked against transformers' soft tokens, and its prefill places its
    own soft tokens."""
    return step_parity_of(checkpoint_dir, [backend], seed, threads, target, device, reference_dtype, images)[0]


def step_parity_of(
    checkpoint_dir: str | Path,
    backends: list[StepBackend],
    seed: int = 0,
    threads: int | None = None,
    target: str | Path = "",
    device: str = "cpu",
    reference_dtype: str = "fp32",
    images: ImageBatch | None = None,
) -> list[Report]:
    """`step_parity` of several inactive backends of one spec against one run of the reference: each is activated
    in turn, after the reference has been freed."""
    checkpoint = Checkpoint.open(checkpoint_dir)
    spec = backends[0].spec
    checkpoint.check_source_of(spec, target)
    dtype = spec.precision
    tol = TOLERANCES[dtype]
    reports = [Report("step", str(checkpoint_dir), str(target), dtype, backend.name) for backend in backends]
    for backend in backends:
        if (backend.spec.model, backend.spec.capacity, backend.spec.precision) != (spec.model, spec.capacity, dtype):
            raise ArtifactError(f"{backend.name} runs another model, capacity or dtype than {backends[0].name}")
        backend.preflight()  # fail before the reference runs, not after, when the backend cannot run here
    settings = resolve_settings(spec.generation)
    vision = _image_vision(checkpoint, backends[0], images)
    with tempfile.TemporaryDirectory(prefix="canvasrt-parity-") as spilled:
        plan, info, features = _reference_plan(
            Path(checkpoint_dir),
            spec,
            settings,
            seed,
            threads,
            device,
            reference_dtype,
            _Spill(Path(spilled)),
            images,
            vision,
        )
        info["reference"] = {"device": device, "dtype": reference_dtype}
        if images is not None:
            info["images"] = {"soft_tokens": images.soft_tokens}
        for backend, report in zip(backends, reports):
            report.info = dict(info)
            with backend:
                _run_plan(plan, backend, report, spec, settings, tol, images, vision, features)
        del plan  # the memory maps, before their files go
    return reports


def _run_plan(
    plan: list[StepStage | EncodeStage],
    backend: StepBackend,
    report: Report,
    spec: Any,
    settings: GenerationSettings,
    tol: dict[str, float],
    images: ImageBatch | None,
    vision: VisionConfig | None,
    features: np.ndarray | None,
) -> None:
    """Runs the plan's stages on an active backend in order, adding each stage's checks to `report`: K/V after an
    encoder pass (and, with images, the backend's soft tokens against the reference's `features`), the step's
    outputs after a denoising step."""
    context = np.zeros(plan[0].ids.shape[0], dtype=np.int64)
    backend.start(plan[0].valid)
    for stage in plan:
        if isinstance(stage, EncodeStage):
            placed = None
            if stage.images is not None and vision is not None and images is not None:
                ours = soft_tokens(backend.executor.vision_encoder(), stage.images)
                mine = ours[: sum(images.soft_tokens)]
                report.checks.append(
                    _judge_continuous("vision", "soft_tokens", mine, features, _vision_tolerance(spec))
                )
                placed = PromptImages.place(ours, stage.ids, vision).chunk(0, stage.ids.shape[1])
            backend.encode(stage.ids, stage.positions, context, placed)
            context = context + stage.ids.shape[1]
            report.checks += _kv_checks(stage, backend, tol)
        else:
            report.checks += _step_checks(stage, backend, context, settings, tol, spec.precision, report)


def _step_checks(
    stage: StepStage,
    backend: StepBackend,
    context: np.ndarray,
    settings: GenerationSettings,
    tol: dict[str, float],
    dtype: str,
    report: Report,
) -> list[Check]:
    ref = stage.reference
    ties = int((stage.routing_margin < ROUTING_TIE).sum())
    if ties:
        report.info.setdefault("routing_ties", {})[stage.name] = ties
    stage_tol = tol
    if ties and dtype == "fp32":
        stage_tol = {**{k: v for k, v in tol.items() if k not in ("rel_p99", "bound_p99")}, **TIE_LIMITS}
    untied = stage.routing_margin >= ROUTING_TIE  # discrete outputs are compared where routing is decided
    if stage.self_cond is not None:
        backend.set_self_conditioning(stage.self_cond)
    out = backend.denoise(
        StepInputs.uniform(
            stage.canvas, context, stage.temperature, settings.entropy_bound, stage.draws, stage.self_cond is None
        )
    )
    name = stage.name
    checks = []
    if "logits" in out.extras:
        checks.append(_judge_continuous(name, "logits", out.extras["logits"], ref["logits"], stage_tol))
        argmax_logits = np.argmax(out.extras["logits"], axis=-1)
        checks.append(
            _judge_agreement(name, "logits_argmax", argmax_logits, np.argmax(ref["logits"], -1), tol["argmax"])
        )
    checks.append(_judge_agreement(name, "argmax", out.argmax[untied], ref["argmax"][untied], tol["argmax"]))
    report.info.setdefault("entropy_vs_fp64", {})[name] = {
        "reference_fp32": float(np.abs(ref["entropy"] - ref["entropy_fp64"]).max()),
        "backend": float(np.abs(out.entropy - ref["entropy_fp64"]).max()),
        "bound_max": float(ref["entropy_bound"].max()),
    }
    actual = {"entropy": out.entropy, "mean_entropy": out.mean_entropy, "next_self_cond": backend.self_conditioning()}
    for output in BOUNDED:
        if "bound_p99" in stage_tol:
            checks.append(_judge_bounded(name, output, actual[output], ref[output], ref[f"{output}_bound"]))
        else:
            checks.append(_judge_continuous(name, output, actual[output], ref[output], stage_tol))
    accepted = ref["accepted"] & untied
    if "sampled" in out.extras and accepted.any():
        # Reported, not gated: a sample is a discontinuous function of the logits (the always-accepted
        # lowest-entropy token of a flat random model sits on a near-uniform CDF); next_canvas carries what matters.
        check = _judge_agreement(
            name, "sampled_accepted", out.extras["sampled"][accepted], ref["sampled"][accepted], 0.0
        )
        check.note = f"{int(accepted.sum())} accepted positions"
        checks.append(check)
    for output, actual in (("accepted", out.accepted), ("next_canvas", out.next_canvas)):
        checks.append(_judge_agreement(name, output, actual[untied], ref[output][untied], tol["agree"]))
    return checks


def _kv_checks(stage: EncodeStage, backend: StepBackend, tol: dict[str, float]) -> list[Check]:
    """Compares each layer's buffered K/V with the reference cache at the positions both hold and that are real."""
    keys, values = backend.kv_cache()
    worst: dict[str, tuple[float, Check]] = {}
    for i, layer in enumerate(backend.spec.kv_layout):
        ref_k, ref_v, positions = stage.reference_kv[i]
        slots = positions % layer.slots if layer.ring else positions
        real = stage.valid[:, positions]  # [B, n]
        for part, ours, theirs in (("key", keys[i], ref_k), ("value", values[i], ref_v)):
            a = ours[:, :, slots].transpose(0, 2, 1, 3)[real]
            r = theirs.transpose(0, 2, 1, 3)[real]
            check = _judge_continuous(stage.name, part, a, r, tol)
            check.note = f"worst layer {i}"
            if part not in worst or check.metrics["rel"] > worst[part][0]:
                worst[part] = (check.metrics["rel"], check)
            if not check.passed:
                worst[part] = (math.inf, check)
    return [entry[1] for entry in worst.values()]


def _vision_tolerance(spec: Any) -> dict[str, float]:
    """The vision graph's budget: FP8's where `calibrate --quantize-vision` quantized it, else its export dtype's
    (FP8 artifacts keep the vision graph unquantized by default)."""
    quantized = spec.quantization is not None and spec.quantization.vision
    return TOLERANCES["fp8" if quantized else spec.dtype]


def _image_vision(checkpoint: Checkpoint, backend: StepBackend, images: ImageBatch | None) -> VisionConfig | None:
    """The vision config an image parity runs with; refused before the reference runs where the backend's model
    takes no images."""
    if images is None:
        return None
    if not backend.takes_images:
        backend.executor.vision_encoder()  # raises its one-line refusal
    return checkpoint.require_vision()


# -- loop level ---------------------------------------------------------------------------------------------------


def loop_parity(
    checkpoint_dir: str | Path,
    backend: StepBackend,
    simulated: StepBackend,
    seed: int = 0,
    threads: int | None = None,
    max_new_tokens: int | None = None,
    target: str | Path = "",
    images: ImageBatch | None = None,
) -> Report:
    """Loop-level parity of an inactive backend. `simulated`: an inactive torch backend that computes what the
    backend should (fp32, or the same FP8 scales); one backend is active at a time. With images, the prompts are
    built around them and every runner encodes them with its own vision graph or model."""
    checkpoint = Checkpoint.open(checkpoint_dir)
    spec = backend.spec
    checkpoint.check_source_of(spec, target)
    cap, model = spec.capacity, spec.model
    canvas, vocab = cap.canvas, model.vocab_size
    dtype = spec.precision
    report = Report("loop", str(checkpoint_dir), str(target), dtype, backend.name)
    backend.preflight()
    rng = np.random.default_rng(seed)
    prompt_len = max(4, min(cap.max_context - 2 * canvas, model.sliding_window + 4, 24))
    blocks = 2 if prompt_len + canvas <= cap.max_context else 1
    settings = resolve_settings(spec.generation, {"max_new_tokens": max_new_tokens or blocks * canvas})
    rows = [
        rng.integers(3, vocab, size=prompt_len).tolist(),
        rng.integers(3, vocab, size=max(1, prompt_len - 3)).tolist(),
    ]
    rows = rows[: min(2, cap.max_batch)]
    vision = _image_vision(checkpoint, backend, images)
    if images is not None and vision is not None:
        rows = image_rows(rows, images, vision)
        if max(len(r) for r in rows) + (blocks - 1) * canvas > cap.max_context:
            raise ArtifactError(
                f"prompts around the images' {sum(images.soft_tokens)} soft tokens and {blocks} canvas(es) exceed "
                f"the maximum context of {cap.max_context}; re-export with a larger --max-context or pass a smaller "
                "image"
            )
    report.info = {"prompt_lengths": [len(r) for r in rows], "settings": settings.to_dict(), "seed": seed}
    report.checks += generate_parity(
        checkpoint_dir, rows, settings, seed, threads, cap.max_context, simulated.executor, images
    )

    if simulated.spec.quantization:
        # FP8 is compared with the torch backend simulating the same FP8 scales: this is where the Q/DQ placement
        # and scales are checked token for token; the accuracy cost is what `canvasrt eval` measures.
        report.info["torch_backend"] = "fake-quantized with the artifacts' calibration"
    report.checks += loop_agreement(backend, simulated, rows, settings, seed, images)
    return report


def _placed(runner: StepBackend, ids: np.ndarray, images: ImageBatch | None) -> PromptImages | None:
    """The soft tokens of every row's images by the runner's own vision encoder, placed in `ids`."""
    if images is None or runner.executor.vision is None:
        return None
    tokens = soft_tokens(runner.executor.vision_encoder(), repeated(images, ids.shape[0]))
    return PromptImages.place(tokens, ids, runner.executor.vision)


def loop_agreement(
    backend: StepBackend,
    simulated: StepBackend,
    rows: list[list[int]],
    settings: GenerationSettings,
    seed: int,
    images: ImageBatch | None = None,
) -> list[Check]:
    """The loop over two inactive backends, one after the other, on the same prompts and counter draws: committed
    tokens per canvas (all of them for fp32 and FP8), steps per block and sequence length."""
    spec = backend.spec
    canvas, vocab, dtype = spec.capacity.canvas, spec.model.vocab_size, spec.precision
    ids, padding = left_pad(rows, settings.pad_token_id or 0)
    checks = []
    results = {}
    for runner in (simulated, backend):
        with runner:
            draws = make_draws("counter", seed, len(rows), vocab, canvas)
            results[runner.name] = generate(runner, ids, padding, settings, draws, _placed(runner, ids, images))
    a, t = results[backend.name], results[simulated.name]
    minimum = 1.0 if dtype in ("fp32", "fp8") else TOLERANCES[dtype]["agree"]
    width = min(a.new_tokens.shape[1], t.new_tokens.shape[1])
    stage = f"{backend.name}_vs_torch"
    for block in range(math.ceil(width / canvas)):
        sl = slice(block * canvas, (block + 1) * canvas)
        checks.append(
            _judge_agreement(
                f"{stage}_block{block}", "committed_tokens", a.new_tokens[:, sl], t.new_tokens[:, sl], minimum
            )
        )
    exact = dtype in ("fp32", "fp8")
    checks.append(
        Check(
            stage,
            "steps_per_block",
            {backend.name: a.steps_per_block, "torch": t.steps_per_block},
            {},
            a.steps_per_block == t.steps_per_block or not exact,
        )
    )
    checks.append(
        Check(
            stage,
            "sequence_length",
            {backend.name: a.sequences.shape[1], "torch": t.sequences.shape[1]},
            {},
            a.sequences.shape == t.sequences.shape or not exact,
        )
    )
    return checks


@torch.inference_mode()
def generate_parity(
    checkpoint_dir: str | Path,
    rows: list[list[int]],
    settings: GenerationSettings,
    seed: int,
    threads: int | None,
    max_context: int,
    like: TorchExecutor,
    images: ImageBatch | None = None,
) -> list[Check]:
    """The torch backend with --rng hf against transformers' generate(), batch of one and of two, both on the
    device, in the dtype and with the MoE formulation of `like`; with images, the same pixel values to both."""
    checks = []
    hf_kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "max_denoising_steps": settings.max_denoising_steps,
        "t_min": settings.t_min,
        "t_max": settings.t_max,
        "stability_threshold": settings.stability_threshold,
        "confidence_threshold": settings.confidence_threshold,
    }
    expected = []
    for batch in range(1, len(rows) + 1):
        ids, padding = left_pad(rows[:batch], settings.pad_token_id or 0)
        # Eager attention, except where transformers' generate() cannot run it (left padding, see reference.py).
        reference = Reference(
            checkpoint_dir, attention="eager" if padding.all() else "sdpa", device=like.device, dtype=like.dtype
        )
        row_images = None if images is None else repeated(images, batch)
        expected.append(reference.generate(ids, padding, seed, row_images, **hf_kwargs))
        del reference
    with StepBackend(
        TorchExecutor(
            checkpoint_dir,
            dtype=like.dtype,
            moe=like.moe,
            max_batch=len(rows),
            max_context=max_context,
            threads=threads,
            device=like.device,
        )
    ) as torch_backend:
        vocab, canvas = torch_backend.spec.model.vocab_size, torch_backend.spec.capacity.canvas
        for batch, hf in enumerate(expected, 1):
            ids, padding = left_pad(rows[:batch], settings.pad_token_id or 0)
            draws = make_draws("hf", seed, batch, vocab, canvas, device=like.device)
            ours = generate(torch_backend, ids, padding, settings, draws, _placed(torch_backend, ids, images))
            same = np.array_equal(ours.sequences, hf.sequences.numpy())
            tpf = float(np.max(np.abs(ours.tokens_per_forward - hf.tokens_per_forward.numpy())))
            checks.append(
                Check(f"torch_hf_batch{batch}", "sequences", {"identical": float(same)}, {"identical": 1.0}, same)
            )
            checks.append(
                Check(f"torch_hf_batch{batch}", "tokens_per_forward", {"max_abs": tpf}, {"max_abs": 0.0}, tpf == 0.0)
            )
    return checks


# -- entry point --------------------------------------------------------------------------------------------------


def parity(
    checkpoint_dir: str | Path,
    target: str | Path,
    level: str = "step",
    backend: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    reference_dtype: str = "fp32",
    images: list[Path] | None = None,
) -> Report:
    """Parity of TARGET (artifacts or engines) on `backend` (default: by target kind) against the checkpoint.
    device and reference_dtype: where and in what the torch paths (the reference, the torch backends) run.
    images: image files the prompts are built around, preprocessed once with the checkpoint's image processor, so
    that the reference and the target see the same pixel values."""
    opened = open_target(target)
    if isinstance(opened, CheckpointDir):
        raise ArtifactError(
            f"{target} is a checkpoint; parity checks exported artifacts or engines against it "
            "(run `canvasrt export` first)"
        )
    runner = open_backend(opened, backend, threads=threads, max_batch=opened.capacity.max_batch, device=device)
    batch = _parity_images(checkpoint_dir, runner, images) if images else None
    if level == "step":
        return step_parity(
            checkpoint_dir,
            runner,
            seed=seed,
            threads=threads,
            target=target,
            device=device,
            reference_dtype=reference_dtype,
            images=batch,
        )
    simulated = _simulated(checkpoint_dir, opened, reference_dtype, threads, device)
    return loop_parity(
        checkpoint_dir,
        runner,
        simulated,
        seed=seed,
        threads=threads,
        max_new_tokens=max_new_tokens,
        target=target,
        images=batch,
    )


def _parity_images(checkpoint_dir: str | Path, runner: StepBackend, images: list[Path]) -> ImageBatch:
    """The images preprocessed once with the checkpoint's image processor; refused first where the backend takes no
    images or the checkpoint has no vision tower."""
    if not runner.takes_images:
        runner.executor.vision_encoder()  # its one-line refusal, before any image is read
    Checkpoint.open(checkpoint_dir).require_vision()
    return ImageProcessor(Path(checkpoint_dir))(list(images))


def _simulated(
    checkpoint_dir: str | Path,
    opened: ArtifactManifest | EngineManifest,
    reference_dtype: str,
    threads: int | None,
    device: str,
) -> StepBackend:
    """The loop level's torch backend: the checkpoint with the target's MoE formulation and capacity, simulating the
    target's FP8 scales where its artifacts are quantized."""
    artifacts = opened if isinstance(opened, ArtifactManifest) else ArtifactManifest.load(opened.artifacts)
    moe = artifacts.moe
    calibration = artifacts.calibration() if artifacts.quantization else None
    return StepBackend(
        TorchExecutor(
            checkpoint_dir,
            dtype=reference_dtype,
            moe=moe,
            max_batch=opened.capacity.max_batch,
            max_context=opened.capacity.max_context,
            threads=threads,
            calibration=calibration,
            device=device,
        )
    )
