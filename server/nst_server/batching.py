"""Batching concurrent jobs of equal size into one replica pass.

Every optimisation step of a job costs one forward and one backward pass of the PyTorch replica on its
``(1, 3, H, W)`` image. Jobs running at the same time with the same input shape, pooling and precision can
share those passes: their images are concatenated into one ``(B, 3, H, W)`` batch, the replica runs once,
each job's costs are computed on its own slice of the features against its own targets, and one backward
pass of the sum of the jobs' totals gives every job exactly its own gradient (VGG-19 has no batch
normalisation, so the items of a batch never interact; the gradient of a sum of independent terms is each
term's gradient).

The jobs stay in their own threads and keep their own optimisers; a :class:`ReplicaBatcher` only meets
them at the evaluation. A job *joins* the group of its key while it iterates at one size
(:meth:`ReplicaBatcher.joined`) and submits one evaluation per iteration (:meth:`ReplicaBatcher.evaluate`).
A batch runs as soon as every joined job of the key has submitted (jobs that iterate in step fall into
lockstep after their first meeting), or when the oldest request has waited ``max_wait_s`` (a job busy
elsewhere, e.g. encoding a preview, delays the others by at most that much). The thread whose request
completes the batch, or whose wait runs out, runs it for everyone and hands each job its costs; an error
in the pass is raised in every job of that batch.

On a CPU the gain of a batch over single passes is modest (bigger matrix products for the same cores);
on a GPU a single 128-256 px image leaves most of the device idle, and batching pays most there. A batched
pass need not give the same last bits as a single one (other convolution algorithms), so a job run beside
others is reproducible only up to rounding.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from nst_server import metrics
from nst_server.costs import CostTerms

CostFunction = Callable[[tuple[torch.Tensor, ...], torch.Tensor], CostTerms]
"""``cost(features, pixels) -> CostTerms`` (content, style, total variation, total, each ``(1,)`` float32): one
job's costs of its slice of the replica's features (a tuple in ``OUTPUT_LAYERS`` order, each
``(1, C, H_l, W_l)``) and of its image ``pixels`` ``(1, 3, H, W)`` in pixel levels."""


@dataclass(eq=False)
class _Request:
    pixels: torch.Tensor
    cost: CostFunction
    taken: bool = False
    done: bool = False
    result: CostTerms | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Group:
    joined: int = 0
    pending: list[_Request] = field(default_factory=list)
    oldest: float = 0.0


@dataclass
class BatchStats:
    """Counters since start: replica passes run, the job evaluations they served, the largest batch."""

    passes: int = 0
    evaluations: int = 0
    largest: int = 0

    @property
    def mean_batch(self) -> float:
        return self.evaluations / self.passes if self.passes else 0.0


class ReplicaBatcher:
    """Meets concurrent jobs' replica evaluations and runs those of equal key as one batch.

    Args:
        run_pass: ``run_pass(images, key) -> features``: the replica's forward pass of ``images``
            ``(B, 3, H, W)`` float32 RGB [0, 1] (with autograd recording) under the key's pooling and
            precision, returning a tuple of ``(B, C, H_l, W_l)`` tensors.
        max_batch: B, the most jobs in one pass (>= 1; 1 means every job alone).
        max_wait_s: the longest a request waits for the other joined jobs of its key, seconds.
    Raises:
        ValueError: ``max_batch < 1``, or ``max_wait_s`` negative, NaN or over ``threading.TIMEOUT_MAX``.
    """

    def __init__(self, run_pass: Callable[[torch.Tensor, tuple], tuple[torch.Tensor, ...]], max_batch: int,
                 max_wait_s: float = 0.02) -> None:
        if max_batch < 1 or not 0 <= max_wait_s <= threading.TIMEOUT_MAX:
            raise ValueError(f"need max_batch >= 1 and 0 <= max_wait_s <= {threading.TIMEOUT_MAX:g}, "
                             f"got {max_batch}, {max_wait_s}")
        self.run_pass, self.max_batch, self.max_wait_s = run_pass, max_batch, max_wait_s
        self.stats = BatchStats()
        self._groups: dict[tuple, _Group] = {}
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def joined(self, key: tuple) -> Iterator[None]:
        """While inside, the calling job counts as one that will submit an evaluation for ``key`` each
        iteration. Leave it as soon as the job stops iterating at this key (the others wait for joined jobs)."""
        with self._cond:
            self._groups.setdefault(key, _Group()).joined += 1
        try:
            yield
        finally:
            with self._cond:
                group = self._groups[key]
                group.joined -= 1
                if not group.joined and not group.pending:
                    del self._groups[key]
                self._cond.notify_all()

    def evaluate(self, key: tuple, pixels: torch.Tensor, cost: CostFunction) -> CostTerms:
        """One job's costs and gradient for this iteration, possibly computed in a batch with other jobs.

        Args:
            key: ``(shape, pooling, precision)`` of the job; only equal keys share a pass. The caller must be
                inside :meth:`joined` for ``key``.
            pixels: the job's image, ``(1, 3, H, W)`` float32 pixel levels, a leaf with ``requires_grad``;
                on return its ``.grad`` holds dJ/dpixels when J is finite (it is left untouched otherwise).
            cost: computes the job's costs from its features (:data:`CostFunction`).
        Returns:
            ``cost``'s :class:`~nst_server.costs.CostTerms` for this job (with autograd history); the batch's
            gradient is that of the sum of each job's finite ``total``.
        Raises:
            Whatever the batched pass raised (every job of that batch gets it).
        """
        request = _Request(pixels, cost)
        with self._cond:
            group = self._groups[key]
            if not group.pending:
                group.oldest = time.monotonic()
            group.pending.append(request)
            try:
                batch = self._await_batch(group, request)
            except BaseException:            # e.g. KeyboardInterrupt while waiting: withdraw the request
                if not request.taken:
                    group.pending.remove(request)
                    self._cond.notify_all()
                raise
        if batch is not None:
            self._run(batch, key)
        with self._cond:
            while not request.done:
                self._cond.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _await_batch(self, group: _Group, request: _Request) -> list[_Request] | None:
        """Under the lock: wait until ``request`` is taken into a batch. Returns the batch when this thread
        is to run it, None when another thread took it."""
        while not request.taken:
            waited = time.monotonic() - group.oldest
            if len(group.pending) >= min(group.joined, self.max_batch) or waited >= self.max_wait_s:
                others = [r for r in group.pending if r is not request][: self.max_batch - 1]
                batch = [request] + others
                for r in batch:
                    r.taken = True
                group.pending = [r for r in group.pending if not r.taken]
                group.oldest = time.monotonic()
                return batch
            self._cond.wait(self.max_wait_s - waited)
        return None

    def _run(self, batch: list[_Request], key: tuple) -> None:
        try:
            with torch.enable_grad():
                images = torch.cat([r.pixels for r in batch]) / 255.0
                features = self.run_pass(images, key)
                totals = []
                for index, r in enumerate(batch):
                    r.result = r.cost(tuple(f[index:index + 1] for f in features), r.pixels)
                    if torch.isfinite(r.result.total).all():
                        totals.append(r.result.total.sum())
                if totals:
                    torch.stack(totals).sum().backward()
        except BaseException as exc:   # handed to every job of the batch, re-raised in its own thread
            for r in batch:
                r.error = exc
        with self._cond:
            self.stats.passes += 1
            self.stats.evaluations += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            metrics.BATCH_JOBS.observe(len(batch))
            for r in batch:
                r.done = True
            self._cond.notify_all()
