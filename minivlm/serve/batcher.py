"""Dynamic batching: one worker thread owns the model and serves requests in gathered batches.

    handlers --submit(Job)--> bounded queue --> worker: gather <= max_batch jobs for <= max_wait_ms
                                                  -> model.regions(every image of every job)   one detector batch
                                                  -> captions: one decoding batch (rows end independently)
                                                  -> VQA / NLVR2 / retrieval: one call per kind
                                                  -> each job's future resolved as soon as its answer is known

Only this thread calls the model, so the model needs no locking and the CPU is not oversubscribed by
concurrent forward passes. A full queue refuses at once (503) instead of queueing without bound. A model
exception fails the batch; its jobs are then retried one by one, so that only the job that really fails
gets the 500 (logged with its traceback), and the worker goes on with the next batch.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from minivlm.serve.decode import decode_captions
from minivlm.serve.errors import ApiError

log = logging.getLogger(__name__)
KINDS = ("caption", "vqa", "detect", "nlvr2", "retrieve")


@dataclass(eq=False)
class Job:
    """One request's work. `images` are decoded RGB images (checked by the handler before queueing)."""

    kind: str
    images: list = field(default_factory=list)
    text: str = ""
    top_k: int = 1
    max_len: int = 20
    beam_size: int = 1
    on_token: Callable[[int], None] | None = None  # streaming: called from the worker with each token id
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    regions: list = field(default_factory=list)
    streamed: int = 0

    def resolve(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


class Batcher:
    """The worker thread and its queue. `model` may be set later (`start` after loading)."""

    def __init__(self, max_batch: int, max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[int], None] | None = None, on_error: Callable[[], None] | None = None):
        self.model: Any = None
        self.index: list = []  # regions of the retrieval index (`--index DIR`)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        # unbounded underneath, bounded by `submit`: the stop signal must always find room
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.on_batch, self.on_error = on_batch, on_error
        self._thread: threading.Thread | None = None

    # -- outside: handlers ------------------------------------------------------------------------------

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise ApiError(503, f"server busy: {self.max_queue} requests already waiting; retry shortly",
                               "server_busy", headers={"Retry-After": "1"})
            self._waiting += 1
            job.future.waiting = True  # on the future, not the job: the callback below must not hold the job
        # a request that timed out while queued frees its place at once, not when the worker reaches it
        job.future.add_done_callback(self._taken)
        self.queue.put_nowait(job)
        return job.future

    def _taken(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            if getattr(future, "waiting", False):
                future.waiting = False
                self._waiting -= 1

    def depth(self) -> int:
        """Requests waiting for the model (not yet in a batch, not given up)."""
        return self._waiting

    def start(self, model: Any) -> None:
        self.model = model
        self._thread = threading.Thread(target=self._loop, name="minivlm-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.queue.put(None)
            self._thread.join(timeout=30)

    # -- inside: the worker --------------------------------------------------------------------------------

    def _gather(self, first: Job) -> list[Job]:
        jobs = [first]
        deadline = time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:  # past the deadline, still take whatever is already waiting
                job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop: finish this batch first
                self.queue.put(None)
                break
            jobs.append(job)
        for j in jobs:
            self._taken(j.future)
        # a job whose client gave up (timeout: the future was cancelled) is dropped here
        return [j for j in jobs if j.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs = self._gather(first)
            if not jobs:
                continue
            if self.on_batch is not None:
                self.on_batch(len(jobs))
            try:
                self.run(jobs)
            except Exception:  # noqa: BLE001 - the model failed: find which job, keep serving
                log.exception("model failure in a batch of %d; retrying its requests one by one", len(jobs))
                for job in jobs:
                    if job.future.done():
                        continue
                    if job.streamed:  # its client already has tokens: a rerun would repeat them
                        self._fail(job)
                        continue
                    try:
                        self.run([job])
                    except Exception:  # noqa: BLE001
                        log.exception("model failure on a %s request", job.kind)
                        self._fail(job)
            for job in jobs:  # a model that returned too few answers must not leave a client hanging
                if not job.future.done():
                    log.error("a %s request got no answer from its batch", job.kind)
                    self._fail(job)
                job.images = []  # the pixels are no longer needed; the handler may hold the job a while

    def _fail(self, job: Job) -> None:
        if self.on_error is not None:
            self.on_error()
        job.fail(ApiError(500, "the model failed on this request (the error is in the server log)", "model_error"))

    def run(self, jobs: list[Job]) -> None:
        """One batch: every image through the detector at once, then one call per kind of task."""
        model = self.model
        images = [im for j in jobs for im in j.images]
        regions = model.regions(images) if images else []
        start = 0
        for j in jobs:
            j.regions, start = regions[start:start + len(j.images)], start + len(j.images)
        kind = {k: [j for j in jobs if j.kind == k] for k in KINDS}
        for j in kind["detect"]:
            j.resolve(j.regions[0])
        if kind["caption"]:
            self._captions(kind["caption"])
        if kind["vqa"]:
            js = kind["vqa"]
            scores = model.answer_scores([j.regions[0] for j in js], [j.text for j in js],
                                         top_k=max(j.top_k for j in js))
            for j, s in zip(js, scores):
                j.resolve((s[:j.top_k], j.regions))
        if kind["nlvr2"]:
            js = kind["nlvr2"]
            probs = model.verify_proba([j.regions[0] for j in js], [j.regions[1] for j in js], [j.text for j in js])
            for j, p in zip(js, probs):
                j.resolve((p, j.regions))
        if kind["retrieve"]:
            js = kind["retrieve"]
            scores = model.rank(self.index, [j.text for j in js]).tolist()  # [images, queries]
            for q, j in enumerate(js):
                column = [row[q] for row in scores]
                best = sorted(range(len(column)), key=lambda i: -column[i])[:j.top_k]
                j.resolve([(i, float(column[i])) for i in best])

    def _captions(self, jobs: list[Job]) -> None:
        # greedy rows share one batch whatever their max_len; beam rows only with their own (beam, max_len)
        groups: dict[tuple[int, int], list[Job]] = {}
        for j in jobs:
            groups.setdefault((j.beam_size, j.max_len if j.beam_size > 1 else 0), []).append(j)
        for (beam, _), group in groups.items():
            def done(row: int, ids: list[int], reason: str, group=group) -> None:
                group[row].resolve((ids, reason, group[row].regions))

            def token(row: int, tid: int, group=group) -> None:
                job = group[row]
                if job.on_token is not None:
                    job.streamed += 1
                    job.on_token(tid)

            decode_captions(self.model, [j.regions[0] for j in group], [j.max_len for j in group], beam, done, token)
