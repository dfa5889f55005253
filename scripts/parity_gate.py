"""The fp32 step-parity gate at any width, on one run of the reference: the artifacts on ONNX Runtime and the torch
backend on them, clean and with each of `canvasrt.validation.defects`. Prints one line per backend (passed or the
outputs that failed) and how far each fp32 entropy lies from a float64 evaluation of the same logits; writes every
report to --report. Released width, 2 layers: 36 minutes on 2 loaded cores, peak RSS 23 GB with the weights files'
pages (hold /work/heavy.lock; docs/PERFORMANCE.md has the result):

    flock /work/heavy.lock python scripts/parity_gate.py CKPT ART --report gate.json
"""

from __future__ import annotations

import argparse
import json

from canvasrt.runtime.backends import open_backend
from canvasrt.validation.defects import DEFECTS, with_defect
from canvasrt.validation.parity import step_parity_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("artifacts")
    parser.add_argument("--report", required=True, help="JSON file for every backend's report")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    names = ["onnxruntime", "torch", *(f"torch+{defect}" for defect in DEFECTS)]
    backends = [open_backend(args.artifacts, "onnxruntime", threads=args.threads)]
    backends.append(open_backend(args.artifacts, "torch", threads=args.threads))
    backends += [with_defect(open_backend(args.artifacts, "torch", threads=args.threads), d) for d in DEFECTS]
    reports = step_parity_of(args.checkpoint, backends, threads=args.threads, target=args.artifacts)
    results = {}
    for name, report in zip(names, reports):
        failed = [f"{c.stage}/{c.output}" for c in report.checks if not c.passed]
        print(f"{name}: {'passed' if report.passed else 'FAILED ' + ', '.join(failed)} ({len(report.checks)} checks)")
        for stage, errors in report.info["entropy_vs_fp64"].items():
            print(
                f"  {stage}: |entropy - float64| reference {errors['reference_fp32']:.3g}, "
                f"backend {errors['backend']:.3g}; largest bound {errors['bound_max']:.3g}"
            )
        results[name] = report.to_dict()
    with open(args.report, "w") as out:
        json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
