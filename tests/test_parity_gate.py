"""The fp32 step-parity gate: tolerances derived from fp32 rounding pass a correct backend and fail real defects
(`canvasrt.validation.defects`, put into the torch backend on the artifacts), checked through `step_parity` as
`canvasrt parity --backend torch` runs it."""

from __future__ import annotations

import math

import pytest
import torch

from canvasrt.runtime.backends import open_backend
from canvasrt.validation.defects import DEFECTS, with_defect
from canvasrt.validation.parity import UNIT_ROUNDOFF, sampler_bounds, step_parity


def _defective(artifacts, defect: str | None):
    """The torch backend on `artifacts`, with `defect` put into its model or its inputs."""
    backend = open_backend(artifacts, "torch", max_batch=2)
    return backend if defect is None else with_defect(backend, defect)


def test_a_correct_backend_passes_with_every_sampler_output_within_its_fp32_bound(tiny_checkpoint, tiny_artifacts):
    report = step_parity(tiny_checkpoint, _defective(tiny_artifacts, None), target=tiny_artifacts)
    assert report.passed, [c for c in report.checks if not c.passed]
    bounded = [c for c in report.checks if "bound_p99" in c.limits]
    assert {c.output for c in bounded} == {"entropy", "mean_entropy", "next_self_cond"} and len(bounded) == 9
    for stage, errors in report.info["entropy_vs_fp64"].items():  # both fp32 entropies sit inside the bound
        assert errors["reference_fp32"] <= errors["bound_max"] and errors["backend"] <= errors["bound_max"], stage


@pytest.mark.parametrize("defect", DEFECTS)
def test_the_gate_fails_on_a_real_defect(tiny_checkpoint, tiny_artifacts, defect):
    report = step_parity(tiny_checkpoint, _defective(tiny_artifacts, defect), target=tiny_artifacts)
    failed = {(c.stage, c.output) for c in report.checks if not c.passed}
    assert not report.passed and failed
    if defect == "temperature":  # the backbone is right; what the sampler derives from its logits is not
        assert {output for _, output in failed} <= {"entropy", "mean_entropy", "next_self_cond"}
        assert {stage for stage, _ in failed} >= {"step_first", "step_after_commit"}


def _fp32_entropy(z: torch.Tensor) -> torch.Tensor:
    """transformers' entropy (Categorical(logits=z).entropy()) in fp32, as a float64 tensor."""
    log_p = z - torch.logsumexp(z, -1, keepdim=True)
    return -(log_p * torch.softmax(log_p, -1)).sum(-1).double()


def test_peaked_logits_over_a_large_vocabulary_differ_in_fp32_entropy_only_by_rounding():
    """Positions over 262,144 tokens whose top logit is 30, 25 or 20 above noise: transformers' fp32 entropy is off
    against float64 by a fraction of an ulp of 30, a large share of a confident position's entropy; the bound holds
    one evaluation within half of it, and a 1% temperature error lies far outside it wherever the entropy is not
    below what fp32 resolves."""
    torch.manual_seed(0)
    vocab, width = 262_144, 16
    z = torch.randn(6, vocab) * torch.tensor([3.0, 3.0, 3.0, 3.0, 2.0, 2.0])[:, None]
    z[:, 7] = torch.tensor([30.0, 30.0, 25.0, 25.0, 20.0, 20.0])
    embedding = torch.randn(vocab, width)
    state = torch.softmax(z, -1) @ embedding * math.sqrt(width)
    bounds = sampler_bounds(z, state, embedding, logit_error=0.0)
    exact, error = bounds["entropy_fp64"], (_fp32_entropy(z) - bounds["entropy_fp64"]).abs()
    assert exact[0] < 1e-4 and error[0] > 1e-3 * exact[0]  # confident: rounding is a visible share of the entropy
    assert (error <= bounds["entropy"] / 2).all()  # one evaluation: half the bound
    assert (bounds["entropy"] >= 2 * UNIT_ROUNDOFF * 30).all()  # never below the rounding of logsumexp ~ 30
    defect = (_fp32_entropy(z / 1.01) - exact).abs()
    assert (defect[2:] > 10 * bounds["entropy"][2:]).all()
    exact_state = torch.softmax(z.double(), -1) @ embedding.double() * math.sqrt(width)
    assert ((state.double() - exact_state).abs() <= bounds["next_self_cond"] / 2).all()
