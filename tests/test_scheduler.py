"""In-flight batching in process: many requests through one backend's slots, each row's events exactly those of its
own batch-of-one run, rows joining and leaving at any step, cancellation, the bounded queue, slot moves, the RNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from canvasrt.cli import main
from canvasrt.core.errors import CanvasrtError
from canvasrt.runtime.backends import open_backend
from canvasrt.runtime.loop import Committed, Draft, GenerationResult, left_pad, stream
from canvasrt.runtime.rng import make_draws
from canvasrt.runtime.scheduler import RowRequest, Scheduler, Ticket
from canvasrt.runtime.settings import resolve_settings
from canvasrt.runtime.step import Draws, StepInputs, StepResult


def mixed_requests(generation: dict, vocab: int, count: int, longest: int) -> list[RowRequest]:
    """Prompt lengths 1..longest, one to three canvases, other step counts, stop rules and temperatures."""
    rng = np.random.default_rng(7)
    requests = []
    for i in range(count):
        overrides = {
            "max_new_tokens": [16, 32, 48][i % 3],
            "max_denoising_steps": [16, 5, 9, 12][i % 4],
            "stability_threshold": [1, 0, 2][i % 3],
            "confidence_threshold": [0.005, 10.0][i % 2],  # 10: stops on stability alone, at differing steps
            "entropy_bound": [0.1, 0.5, 2.0][i % 3],
            "t_min": [0.4, 0.2][i % 2],
            "t_max": [0.8, 1.1][i % 2],
        }
        length = int(rng.integers(1, longest + 1)) if i else longest
        requests.append(
            RowRequest(
                rng.integers(3, vocab, size=length).tolist(),
                seed=100 + i,
                settings=resolve_settings(generation, overrides),
            )
        )
    return requests


def alone(backend, request: RowRequest) -> list:
    """The request's events from the plain loop, as a batch of one (what `canvasrt generate` runs)."""
    ids, padding = left_pad([request.ids], request.settings.pad_token_id or 0)
    draws = make_draws("counter", request.seed, 1, backend.spec.model.vocab_size, backend.spec.capacity.canvas)
    return list(stream(backend, ids, padding, request.settings, draws))


def same_events(ours: list, theirs: list, exact_entropy: bool = True) -> None:
    """exact_entropy False: the mean entropy to float32 rounding (the torch backend's logits depend on the batch in
    the last bit, through its MoE experts: see test_a_rows_step_is_bitwise_its_own_on_the_torch_backend); every
    token, stop and step count stays exact."""
    assert [type(e) for e in ours] == [type(e) for e in theirs]
    for a, b in zip(ours, theirs):
        if isinstance(a, Draft):
            assert (a.block, a.step) == (b.block, b.step)
            np.testing.assert_array_equal(a.argmax, b.argmax)
            np.testing.assert_array_equal(a.accepted, b.accepted)
            if exact_entropy:
                np.testing.assert_array_equal(a.mean_entropy, b.mean_entropy)
            else:
                np.testing.assert_allclose(a.mean_entropy, b.mean_entropy, rtol=1e-6)
            np.testing.assert_array_equal(a.done, b.done)
        elif isinstance(a, Committed):
            assert (a.block, a.steps) == (b.block, b.steps)
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.finished, b.finished)
        else:
            assert isinstance(a, GenerationResult)
            np.testing.assert_array_equal(a.sequences, b.sequences)
            assert a.steps_per_block == b.steps_per_block and a.prompt_length == b.prompt_length
            np.testing.assert_array_equal(a.tokens_per_forward, b.tokens_per_forward)


@pytest.mark.parametrize("backend_name", ["onnxruntime", "torch"])
def test_sixteen_streams_through_four_slots_each_equal_their_own_run(variant_artifacts, backend_name):
    """16 requests, 4 slots: 12 wait, rows join and leave at any step and slots are reused; prompts up to 90 tokens
    are prefilled in chunks of 40 between the others' steps. Every event of every row is its batch-of-one event."""
    with open_backend(variant_artifacts, backend_name, threads=1) as backend:
        requests = mixed_requests(backend.spec.generation, backend.spec.model.vocab_size, 16, 90)
        expected = [alone(backend, r) for r in requests]
        scheduler = Scheduler(backend, max_queue=16)
        tickets = [scheduler.submit(Ticket(r)) for r in requests]
        scheduler.run()
    for ticket, theirs in zip(tickets, expected):
        same_events(ticket.events, theirs, exact_entropy=backend_name == "onnxruntime")
    stats = scheduler.stats
    assert stats.completed == 16 and max(stats.occupancy) == 4
    assert stats.row_steps == sum(sum(e[-1].steps_per_block) for e in expected)
    assert stats.step_calls < stats.row_steps / 2  # rows shared the step calls
    chunk = backend.spec.capacity.max_prefill
    assert stats.prefill_chunks == sum(-(-len(r.ids) // chunk) for r in requests)
    assert chunk == (40 if backend_name == "onnxruntime" else 160)  # the artifacts' chunks; torch takes any length
    assert len({len(r.ids) for r in requests}) > 10 and {len(e[-1].steps_per_block) for e in expected} == {1, 2, 3}


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_are_unaffected(tiny_artifacts):
    with open_backend(tiny_artifacts, threads=1) as backend:
        no_early_stop = resolve_settings(backend.spec.generation, {"confidence_threshold": 1e-30})
        requests = [
            RowRequest(list(range(3, 3 + length)), seed, no_early_stop) for seed, length in enumerate([4, 9, 2, 7])
        ]
        expected = [alone(backend, r) for r in requests]
        scheduler = Scheduler(backend, max_queue=0)
        tickets = [scheduler.submit(Ticket(r)) for r in requests]
        for _ in range(3):
            scheduler.step()
        seen = len(tickets[1].events)
        assert scheduler.denoising == 4 and seen > 0
        tickets[1].cancel()
        scheduler.step()
        assert len(scheduler.rows) == 3 and tickets[1] not in [row.ticket for row in scheduler.rows]
        scheduler.run()
    assert len(tickets[1].events) == seen and not tickets[1].finished
    for i in (0, 2, 3):
        same_events(tickets[i].events, expected[i])
    assert scheduler.stats.cancelled == 1


def test_a_client_side_cancellation_is_seen_at_the_next_step(tiny_artifacts):
    gone = {"value": False}
    with open_backend(tiny_artifacts, threads=1) as backend:
        (request,) = mixed_requests(backend.spec.generation, backend.spec.model.vocab_size, 1, 5)
        scheduler = Scheduler(backend, max_queue=0)
        ticket = scheduler.submit(Ticket(request, cancelled=lambda: gone["value"]))
        scheduler.step()
        gone["value"] = True
        scheduler.step()
        assert not scheduler.busy and len(ticket.events) == 1


def test_the_queue_is_bounded_with_a_clear_error(tiny_artifacts):
    with open_backend(tiny_artifacts, threads=1) as backend:
        requests = mixed_requests(backend.spec.generation, backend.spec.model.vocab_size, 7, 5)
        scheduler = Scheduler(backend, max_queue=2)  # 4 slots + 2 waiting
        for request in requests[:6]:
            scheduler.submit(Ticket(request))
        with pytest.raises(
            CanvasrtError, match="the server is full: its 4 slots and its queue of 2 are taken"
        ) as error:
            scheduler.submit(Ticket(requests[6]))
        assert "retry later" in str(error.value) and "\n" not in str(error.value)
        scheduler.run()
        assert scheduler.stats.completed == 6 and scheduler.stats.refused == 1
        scheduler.submit(Ticket(requests[6]))  # room again
        scheduler.run()


def test_a_request_that_cannot_run_is_refused_at_submit(tiny_artifacts):
    with open_backend(tiny_artifacts, threads=1) as backend:
        (request,) = mixed_requests(backend.spec.generation, backend.spec.model.vocab_size, 1, 5)
        scheduler = Scheduler(backend, max_queue=1)
        with pytest.raises(CanvasrtError, match="outside the vocabulary"):
            scheduler.submit(Ticket(RowRequest([10_000], 0, request.settings)))
        assert not scheduler.busy


@pytest.mark.parametrize("backend_name", ["onnxruntime", "torch"])
def test_slot_moves_and_admission_touch_one_row(tiny_artifacts, backend_name):
    with open_backend(tiny_artifacts, backend_name, threads=1) as backend:
        backend.open_slots(3)
        rng = np.random.default_rng(0)
        for slot in range(3):
            backend.encode_slot(slot, rng.integers(3, 200, size=(1, 5)), np.arange(5), np.zeros(1, np.int64))
        keys, _ = backend.kv_cache()
        backend.move_slot(2, 0)
        moved, _ = backend.kv_cache()
        np.testing.assert_array_equal(moved[1][0], keys[1][2])
        np.testing.assert_array_equal(moved[1][1:], keys[1][1:])
        backend.admit(1)
        cleared, _ = backend.kv_cache()
        assert not cleared[1][1].any() and cleared[1][0].any() and cleared[1][2].any()


def test_a_rows_draws_depend_on_its_own_request_only(tiny_artifacts):
    """The counter RNG: a row's draws are a function of (seed, canvas, step), not of its slot or batch neighbours."""
    one = make_draws("counter", 5, 1, 288, 16)
    many = make_draws("counter", 0, 3, 288, 16, row_seeds=[9, 5, 11])
    np.testing.assert_array_equal(one.initial_canvas(2)[0], many.initial_canvas(2)[1])
    a, b = one.step(1, 3), many.step(1, 3)
    np.testing.assert_array_equal(a.uniforms[0], b.uniforms[1])
    np.testing.assert_array_equal(a.renoise_ids[0], b.renoise_ids[1])
    assert not np.array_equal(one.step(1, 4).uniforms, a.uniforms) and not np.array_equal(
        one.step(2, 3).uniforms, a.uniforms
    )


def test_the_sampler_gives_a_row_the_same_bits_in_any_batch(tiny_checkpoint):
    """DiffusionGemmaText.sample (softmax, entropy, its mean over the canvas: the adaptive stop's figure, accepted
    positions, next canvas and self-conditioning) on one row's logits alone and among 2-7 other rows of other
    content; canvas lengths a multiple of the vector width and not."""
    with open_backend(tiny_checkpoint, "torch", threads=1) as backend, torch.inference_mode():
        model, vocab = backend.executor.model, backend.spec.model.vocab_size
        for canvas in (16, 37):
            generator = torch.Generator().manual_seed(canvas)
            logits = torch.randn(8, canvas, vocab, generator=generator) * 4
            temperature, bound = torch.rand(8, generator=generator) + 0.3, torch.rand(8, generator=generator) * 3
            uniforms = torch.rand(8, canvas, generator=generator)
            renoise = torch.randint(3, vocab, (8, canvas), generator=generator)
            alone_ = model.sample(logits[:1], temperature[:1], bound[:1], uniforms[:1], renoise[:1])
            for rows in range(3, 9):
                batched = model.sample(logits[:rows], temperature[:rows], bound[:rows], uniforms[:rows], renoise[:rows])
                for name in (
                    "sampled",
                    "argmax",
                    "entropy",
                    "accepted",
                    "next_canvas",
                    "next_self_cond",
                    "mean_entropy",
                ):
                    assert torch.equal(getattr(batched, name)[0], getattr(alone_, name)[0]), (canvas, rows, name)


SPARSE_BATCH_DEPENDENCE = pytest.mark.xfail(
    strict=True,
    reason=(
        "the logits differ in the last bit by batch before the sampler: the sparse experts' GEMMs see the batch's "
        "routed-token counts"
    ),
)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("tiny_artifacts", id="dense experts"),
        pytest.param("tiny_checkpoint", id="sparse experts", marks=SPARSE_BATCH_DEPENDENCE),
    ],
)
def test_a_rows_step_is_bitwise_its_own_on_the_torch_backend(request, target):
    """In-flight batching's rule at the step: one row's entropy and mean entropy alone and among 2 to 7 rows of other
    prompts and canvases, whose contexts differ and so do the K/V spans of the call. The sampler keeps it (above); so
    does the dense backbone, its experts being two 2-D GEMMs over the tokens; the sparse one does not yet."""
    rng = np.random.default_rng(1)
    with open_backend(request.getfixturevalue(target), "torch", threads=1) as backend:
        canvas, vocab = backend.spec.capacity.canvas, backend.spec.model.vocab_size
        most = min(8, backend.spec.capacity.max_batch)
        prompts = [rng.integers(3, vocab, size=(1, int(rng.integers(2, 30)))) for _ in range(most)]
        canvases = rng.integers(3, vocab, size=(most, canvas))
        draws = Draws(
            renoise_ids=rng.integers(3, vocab, size=(most, canvas)),
            uniforms=rng.random((most, canvas), dtype=np.float32),
        )

        def step(rows: int) -> StepResult:
            backend.open_slots(rows)
            for slot in range(rows):
                backend.encode_slot(slot, prompts[slot], np.arange(prompts[slot].shape[1]), np.zeros(1, np.int64))
            return backend.denoise_rows(
                rows,
                StepInputs.uniform(
                    canvases[:rows],
                    np.asarray([p.shape[1] for p in prompts[:rows]], np.int64),
                    0.9,
                    0.5,
                    Draws(renoise_ids=draws.renoise_ids[:rows], uniforms=draws.uniforms[:rows]),
                    True,
                ),
            )

        one = step(1)
        for rows in range(3, most + 1):
            batched = step(rows)
            np.testing.assert_array_equal(batched.entropy[0], one.entropy[0])
            np.testing.assert_array_equal(batched.mean_entropy[0], one.mean_entropy[0])


def test_bench_concurrency_drives_the_scheduler(tiny_artifacts):
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_artifacts),
            "--backend",
            "onnxruntime",
            "--concurrency",
            "4",
            "--prompt-length",
            "8",
            "--steps",
            "6",
            "--threads",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)["backends"]["onnxruntime"]
    assert entry["inflight"]["occupancy"] == {"4": 6}
    batched, alone_ = entry["inflight"], entry["sequential"]
    assert batched["row_steps"] == alone_["row_steps"] == 4 * 6
    assert batched["step_calls"] <= batched["row_steps"] / 4
    assert alone_["step_calls"] == alone_["row_steps"]
    assert batched["ids"] == alone_["ids"]
    assert batched["weight_bytes_per_token"] < alone_["weight_bytes_per_token"]  # step calls shared by 4 rows
    late = entry["late_arrival"]
    assert late["others"] == 3 and late["alone_ms"] > 0 and late["with_others_ms"] > 0 and len(late["ratios"]) == 3
