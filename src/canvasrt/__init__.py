"""canvasrt: DiffusionGemma checkpoints into deployable step graphs and engines, and the block-diffusion loop over them.

Stages, lowest first (a stage imports only those above it in this list; tests/test_structure.py enforces it):
core (errors, typed manifests, graph contract, K/V layout), model (the PyTorch model and checkpoints), exporter,
builder, runtime (step backends, loop, parity), calibration, serving (Triton), cli.
"""
