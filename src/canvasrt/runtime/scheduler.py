"""In-flight batching: many requests share one backend, each in its own slot, and every step call carries every row
that is denoising, whatever its canvas or step.

Per iteration (`Scheduler.step`): requests whose clients cancelled leave; waiting requests take free slots; prompt
chunks of newcomers run (a budget of one chunk's worth of tokens while other rows denoise, so that a long prompt
does not stall them); one `denoise_rows` call runs a step for every denoising row; then each row applies the loop's
stop rule, and a stopped canvas is committed (its encoder pass runs on that row alone) and the row starts its next
canvas or leaves. A leaving row's slot is reused: the last denoising row moves into it, which keeps the denoising
rows packed in slots [0, n), so a step reads the leading rows of the buffers as they are.

Every row's events are those `loop.stream()` yields for that request alone (a batch of one): the same prefill
chunks, the same stop and commit rules (`loop.stop_rule`, `loop.commit_rule`), draws from the counter RNG keyed by
the request's own seed, canvas and step only. So a row's tokens equal its own `canvasrt generate` run, whatever else
shares its step calls. The backend runs on the thread that calls `step()`; `submit` and `Ticket.cancel` may come
from others.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError
from .images import PromptImages, image_chunks
from .loop import Committed, Draft, GenerationResult, check_request, commit_rule, stop_rule, tokens_per_forward
from .rng import CounterDraws, make_draws
from .settings import GenerationSettings
from .step import Draws, StepBackend, StepInputs

Event = Draft | Committed | GenerationResult


SERVER_FULL = "the server is full"


class QueueFull(CanvasrtError):
    """Every slot and the whole queue are taken: the server's state, not the request's fault, so the request may
    succeed later (Triton answers it UNAVAILABLE: HTTP 503, gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class RowRequest:
    ids: list[int]
    seed: int
    settings: GenerationSettings
    images: PromptImages | None = None  # the prompt's image soft tokens and their places (slot [1, P])


class Ticket:
    """One request in the scheduler. Its events go to `on_event` (default: the `events` list), in stream() order.

    `cancelled` asks the client whether it gave up (a server's response sender); it is asked at most once per
    `poll_s`, since asking may cost an inter-process round trip, which every row paid at every step."""

    def __init__(
        self,
        request: RowRequest,
        on_event: Callable[[Event], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        poll_s: float = 0.0,
    ):
        self.request = request
        self.events: list[Event] = []
        self.on_event = on_event or self.events.append
        self._cancelled = cancelled
        self.poll_s = poll_s
        self._asked = -float("inf")
        self.cancel_requested = False
        self.submitted = time.perf_counter()
        self.first_block_s: float | None = None  # from submit to its first committed canvas
        self.finished = False

    def cancel(self) -> None:
        """Frees the row at the next step; no more events are delivered."""
        self.cancel_requested = True

    @property
    def cancelled(self) -> bool:
        if self.cancel_requested:
            return True
        now = time.monotonic()
        if now - self._asked < self.poll_s:
            return False
        self._asked = now
        return self._cancelled()


@dataclass
class _Row:
    ticket: Ticket
    ids: np.ndarray  # [1, P]
    blocks: int
    draws: CounterDraws
    prefilled: int = 0
    context: int = 0
    block: int = 0
    step: int = 0
    canvas: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.int64))
    argmax: np.ndarray | None = None
    history: np.ndarray | None = None
    sequences: np.ndarray | None = None
    finished: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=bool))
    forwards: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    chunks: list[tuple[int, int]] = field(default_factory=list)  # prefill chunks not yet run (none split an image)

    @property
    def settings(self) -> GenerationSettings:
        return self.ticket.request.settings

    def start_canvas(self, canvas_len: int) -> None:
        self.canvas = self.draws.initial_canvas(self.block)
        self.argmax = self.canvas
        self.history = np.full((self.settings.stability_threshold, 1, canvas_len), -1, dtype=np.int64)
        self.step = 0


@dataclass
class SchedulerStats:
    step_calls: int = 0
    row_steps: int = 0  # denoising steps summed over rows: what the step calls would be without batching
    prefill_chunks: int = 0
    commits: int = 0
    occupancy: Counter = field(default_factory=Counter)  # rows in a step call -> step calls with that many
    completed: int = 0
    cancelled: int = 0
    refused: int = 0  # queue full

    def as_dict(self) -> dict[str, Any]:
        return {
            "step_calls": self.step_calls,
            "row_steps": self.row_steps,
            "prefill_chunks": self.prefill_chunks,
            "commits": self.commits,
            "occupancy": dict(sorted(self.occupancy.items())),
            "completed": self.completed,
            "cancelled": self.cancelled,
            "refused": self.refused,
        }


class Scheduler:
    """Serves requests on an active backend with `slots` rows (default: the max batch) and a bounded queue."""

    def __init__(
        self,
        backend: StepBackend,
        max_queue: int,
        slots: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ):
        """on_step(rows) runs after each step call, before its events reach the tickets: what counts steps (the
        served metrics) has counted one before any client sees the replies it produced."""
        if max_queue < 0:
            raise CanvasrtError(f"the queue length must be 0 or more, got {max_queue}")
        self.backend = backend
        backend.open_slots(slots or backend.spec.capacity.max_batch)
        self.max_queue = max_queue
        self.canvas_len = backend.spec.capacity.canvas
        self.chunk = backend.spec.capacity.max_prefill
        self.vocab = backend.spec.model.vocab_size
        self.queue: deque[_Row] = deque()
        self.rows: list[_Row] = []  # slot i holds rows[i]; the last one may still be prefilling
        self.stats = SchedulerStats()
        self.on_step = on_step
        self.lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.queue)

    @property
    def denoising(self) -> int:
        return sum(1 for r in self.rows if r.prefilled == r.ids.shape[1])

    def submit(self, ticket: Ticket) -> Ticket:
        """Queues a request; refuses it (CanvasrtError) if it cannot run or the queue is full."""
        request = ticket.request
        ids = np.asarray([request.ids], dtype=np.int64)
        blocks = check_request(self.backend, ids, request.settings, request.images)
        slot = None if request.images is None else request.images.slot
        chunks = image_chunks(slot, ids.shape[1], self.chunk)
        draws = make_draws("counter", request.seed, 1, self.vocab, self.canvas_len)
        assert isinstance(draws, CounterDraws)
        with self.lock:
            if len(self.queue) >= self.max_queue + self.backend.slots - len(self.rows):
                self.stats.refused += 1
                raise QueueFull(
                    f"{SERVER_FULL}: its {self.backend.slots} slots and its queue of {self.max_queue} "
                    "are taken; retry later (its operator can serve it with more instances or a longer queue)"
                )
            self.queue.append(_Row(ticket, ids, blocks, draws, chunks=chunks))
        return ticket

    def step(self) -> list[Ticket]:
        """One iteration: drop cancelled rows, admit and prefill newcomers, one step call, stops and commits.
        Returns the tickets dropped because they were cancelled."""
        dropped = self._drop_cancelled()
        self._prefill()
        active = [r for r in self.rows if r.prefilled == r.ids.shape[1]]
        if not active:
            return dropped
        n = len(active)
        for row in active:
            row.step += 1
            row.forwards += 1
        draws = [row.draws.step(row.block, row.step) for row in active]
        settings = [row.settings for row in active]
        inputs = StepInputs(
            canvas=np.concatenate([row.canvas for row in active]),
            context_length=np.asarray([row.context for row in active], dtype=np.int64),
            temperature=np.asarray(
                [s.temperature(s.max_denoising_steps - row.step + 1) for s, row in zip(settings, active)],
                dtype=np.float32,
            ),
            entropy_bound=np.asarray([s.entropy_bound for s in settings], dtype=np.float32),
            draws=Draws(
                renoise_ids=np.concatenate([d.renoise_ids for d in draws]),
                uniforms=np.concatenate([d.uniforms for d in draws]),
            ),
            first_step=np.asarray([row.step == 1 for row in active]),
            frozen=np.zeros(n, dtype=bool),
        )
        result = self.backend.denoise_rows(n, inputs)
        self.stats.step_calls += 1
        self.stats.row_steps += n
        self.stats.occupancy[n] += 1
        if self.on_step is not None:
            self.on_step(n)
        leaving = []
        for i, row in enumerate(active):
            if not self._after_step(
                row,
                result.argmax[i : i + 1],
                result.next_canvas[i : i + 1],
                result.accepted[i : i + 1],
                result.mean_entropy[i : i + 1],
            ):
                leaving.append(i)
        for slot in reversed(leaving):
            self._release(slot)
        return dropped

    def abort(self) -> list[Ticket]:
        """Drops every request (after a failed backend call, whose rows' state is unknown); returns their tickets."""
        with self.lock:
            tickets = [r.ticket for r in (*self.rows, *self.queue)]
            self.queue.clear()
        self.rows.clear()
        return tickets

    def run(self) -> None:
        """Steps until every request has left (in-process use: submit, then run)."""
        while self.busy:
            self.step()

    # -- per row ----------------------------------------------------------------------------------------------------

    def _deliver(self, row: _Row, event: Event) -> None:
        if not row.ticket.cancel_requested:  # the client's own cancellation is asked once per step, in _drop_cancelled
            row.ticket.on_event(event)

    def _after_step(
        self, row: _Row, argmax: np.ndarray, next_canvas: np.ndarray, accepted: np.ndarray, mean_entropy: np.ndarray
    ) -> bool:
        """The loop's rules for one row after its step; False when the request is complete."""
        settings = row.settings
        row.canvas = next_canvas
        stopping, row.history = stop_rule(row.history, argmax, mean_entropy, settings)
        row.argmax = argmax
        self._deliver(row, Draft(row.block, row.step, argmax, accepted, mean_entropy, stopping.copy()))
        if not stopping[0] and row.step < settings.max_denoising_steps:
            return True
        row.steps_per_block.append(row.step)
        tokens, row.finished = commit_rule(argmax, row.finished, settings)
        row.sequences = np.concatenate([row.sequences, tokens], axis=1)
        if row.ticket.first_block_s is None:
            row.ticket.first_block_s = time.perf_counter() - row.ticket.submitted
        self._deliver(row, Committed(row.block, tokens, row.finished.copy(), row.step))
        if row.finished.all() or row.block == row.blocks - 1:
            prompt = row.ids.shape[1]
            self._deliver(
                row,
                GenerationResult(
                    sequences=row.sequences,
                    prompt_length=prompt,
                    steps_per_block=row.steps_per_block,
                    tokens_per_forward=tokens_per_forward(
                        row.sequences[:, prompt:], np.asarray([row.forwards]), settings
                    ),
                    timings={
                        "total_s": time.perf_counter() - row.ticket.submitted,
                        "first_block_s": row.ticket.first_block_s,
                        "steps": sum(row.steps_per_block),
                    },
                ),
            )
            row.ticket.finished = True
            self.stats.completed += 1
            return False
        end = row.sequences.shape[1]
        self.backend.encode_slot(
            self.rows.index(row),
            tokens,
            np.arange(end - self.canvas_len, end, dtype=np.int64),
            np.asarray([row.context], dtype=np.int64),
        )
        self.stats.commits += 1
        row.context += self.canvas_len
        row.block += 1
        row.start_canvas(self.canvas_len)
        return True

    # -- slots ------------------------------------------------------------------------------------------------------

    def _release(self, slot: int) -> None:
        """Frees a denoising row's slot, moving the last denoising row (and a prefilling row after it) down."""
        denoising = self.denoising
        last = denoising - 1
        if slot != last:
            self.backend.move_slot(last, slot)
            self.rows[slot] = self.rows[last]
        del self.rows[last]
        if len(self.rows) > last:  # the newcomer being prefilled sat right after the denoising rows
            self.backend.move_slot(last + 1, last)

    def _drop_cancelled(self) -> list[Ticket]:
        with self.lock:
            dropped = [r.ticket for r in self.queue if r.ticket.cancelled]
            self.queue = deque(r for r in self.queue if r.ticket not in dropped)
        for slot in reversed([i for i, r in enumerate(self.rows) if r.ticket.cancelled]):
            dropped.append(self.rows[slot].ticket)
            if self.rows[slot].prefilled < self.rows[slot].ids.shape[1]:
                del self.rows[slot]  # the newcomer: last in the pool, nothing to move
            else:
                self._release(slot)
        self.stats.cancelled += len(dropped)
        return dropped

    def _prefill(self) -> None:
        """Prompt chunks at the chunk boundaries of a batch-of-one run: at most one chunk's worth of tokens per
        iteration while rows denoise; with none denoising, until the pool is full or the queue empty."""
        spent = 0
        while True:
            if not self.rows or self.rows[-1].prefilled == self.rows[-1].ids.shape[1]:
                with self.lock:
                    if not self.queue or len(self.rows) >= self.backend.slots:
                        return
                    row = self.queue.popleft()
                self.rows.append(row)
                self.backend.admit(len(self.rows) - 1)
                row.sequences = row.ids
            row = self.rows[-1]
            begin, end = row.chunks[0]
            size = end - begin
            if spent and self.denoising and spent + size > self.chunk:
                return
            images = row.ticket.request.images
            self.backend.encode_slot(
                len(self.rows) - 1,
                np.ascontiguousarray(row.ids[:, begin:end]),
                np.arange(begin, end, dtype=np.int64),
                np.asarray([begin], dtype=np.int64),
                None if images is None else images.chunk(begin, end),
            )
            row.chunks.pop(0)
            self.stats.prefill_chunks += 1
            spent += size
            row.prefilled += size
            row.context += size
            if row.prefilled == row.ids.shape[1]:
                row.start_canvas(self.canvas_len)
