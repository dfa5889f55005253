"""Real defects put into the torch executor, which the parity gate must catch: the gate's own check, at any width
(`tests/test_parity_gate.py` at the tiny one, `scripts/parity_gate.py` at the released one).

temperature: the sampler gets a temperature 1% too high; layer_scalar: the first layer's scalars are dropped
(taken as 1); expert: the first MoE layer's first two experts are swapped."""

from __future__ import annotations

from typing import Any

from ..runtime.step import StepBackend

DEFECTS = ("temperature", "layer_scalar", "expert")


def with_defect(backend: StepBackend, defect: str) -> StepBackend:
    """`backend` (inactive, on the torch executor) with `defect` put into the model it loads or the inputs it runs."""
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; use one of {', '.join(DEFECTS)}")
    executor: Any = backend.executor
    load, run = executor.load, executor.run

    def defective_load() -> None:
        load()
        layers = executor.model.layers
        if defect == "layer_scalar":
            layers[0].layer_scalar.fill_(1.0)
            layers[0].encoder_layer_scalar.fill_(1.0)
        elif defect == "expert":
            experts = next(layer.experts for layer in layers if getattr(layer, "experts", None) is not None)
            for weight in (experts.gate_up_proj, experts.down_proj):
                weight[[0, 1]] = weight[[1, 0]].clone()

    def defective_run(phase: str, feeds: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        if defect == "temperature" and phase == "denoise":
            feeds = {**feeds, "temperature": feeds["temperature"] * 1.01}
        return run(phase, feeds, outputs)

    executor.load, executor.run = defective_load, defective_run
    return backend
