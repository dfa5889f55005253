"""canvasrt eval on the trained sort model: the reference and the ONNX graphs solve the task equally well, with
the adaptive stop firing; loop parity on a confident model (early stops, EOS, frozen rows)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from canvasrt.cli import main


def test_eval_reference_torch_and_onnx_agree_and_solve_the_task(sort_checkpoint, sort_artifacts):
    runner = CliRunner()
    reference = runner.invoke(
        main,
        [
            "eval",
            str(sort_checkpoint),
            "--task",
            "sort",
            "--samples",
            "48",
            "--backend",
            "transformers",
            "--backend",
            "torch",
            "--json",
        ],
    )
    assert reference.exit_code == 0, reference.output
    onnx = runner.invoke(main, ["eval", str(sort_artifacts), "--task", "sort", "--samples", "48", "--json"])
    assert onnx.exit_code == 0, onnx.output
    results = {r["backend"]: r for r in json.loads(reference.output) + json.loads(onnx.output)}
    assert set(results) == {"transformers", "torch", "onnxruntime"}
    for result in results.values():
        assert result["exact_match"] >= 0.95
        assert result["steps_per_block"] < result["max_denoising_steps"]  # the adaptive stop fires
    assert results["onnxruntime"]["exact_match"] == results["transformers"]["exact_match"]
    assert results["onnxruntime"] == {
        **results["torch"],
        "backend": "onnxruntime",
        "seconds": results["onnxruntime"]["seconds"],
    }


def test_generate_solves_a_text_prompt(sort_artifacts):
    result = CliRunner().invoke(main, ["generate", str(sort_artifacts), "--prompt", "sort 7 3 9 1 =", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["text"] == ["1 3 7 9"]


def test_loop_parity_on_a_confident_model(sort_checkpoint, sort_artifacts, tmp_path):
    result = CliRunner().invoke(
        main,
        ["parity", str(sort_checkpoint), str(sort_artifacts), "--level", "loop", "--report", str(tmp_path / "r.json")],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    steps = next(c for c in report["checks"] if c["output"] == "steps_per_block")["metrics"]["onnxruntime"]
    assert max(steps) < report["info"]["settings"]["max_denoising_steps"]


def test_eval_bad_task(sort_artifacts):
    result = CliRunner().invoke(main, ["eval", str(sort_artifacts), "--task", "multiply"])
    assert result.exit_code == 2 and "unknown task 'multiply'" in result.output
