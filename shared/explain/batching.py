"""One surrogate shared by concurrent explanations, its work batched across them.

Each explanation asks its gradient source for a few views at a time (the margin search: `samples`
views per step). Alone, that is a small batch that leaves a GPU mostly idle; served to many
requests at once, it is many small batches queued on one device. `BatchedSurrogate` gives every
concurrent search the same GradientSource interface but sends the network's part of the work to
one batching thread: whatever the searches have submitted while the previous pass ran goes through
the network together (one forward and one backward pass), up to `max_batch` images, and each
search gets back its own values and input gradients.

This is the same arithmetic, not an approximation: the network runs in eval mode (BatchNorm uses
its running statistics), so each image's logits depend on that image alone, and the gradient of
the summed objective with respect to the batch holds each image's own gradient. Only floating-point
rounding differs (kernels chosen per batch size, the chain rule applied in another order: logits
move by about 1e-5), which can send a search that sits on an 8-bit rounding edge down another path.
Resizing to the network's input (differentiable) stays in the caller's thread and graph; the
network pass is a custom autograd function whose backward multiplies the returned per-image
gradient by the incoming one.

>>> shared = BatchedSurrogate(LocalClassifier.from_checkpoint("models/surrogate", device="cuda"))  # doctest: +SKIP
>>> explain(photo, label, shared, black_box)        # from many threads at once              # doctest: +SKIP
>>> shared.close()                                                                              # doctest: +SKIP
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from advexplain.shared.classifiers import LocalClassifier, fit_to_size

Objective = Literal["margin", "loss"]

# Images per network pass at most (a search submits `samples` views at a time, so this is many searches).
DEFAULT_MAX_BATCH = 512


@dataclass
class _Work:
    images: torch.Tensor          # (n, C, S, S) at the network's input size, detached, on its device
    objective: Objective
    cls: int                      # the goal (margin) or the label (loss)
    gradient: bool
    result: Future[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=Future)


class _NetworkPass(torch.autograd.Function):
    """values = objective(network(v)) computed by the batcher; backward: grad_out * d values / d v."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, batcher: BatchedSurrogate, objective: Objective, cls: int) -> torch.Tensor:
        values, grad = batcher.submit(v.detach(), objective, cls, gradient=bool(ctx.needs_input_grad[0]))
        ctx.save_for_backward(grad if grad is not None else torch.zeros_like(v))
        return values

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad_values.reshape(-1, *([1] * (grad.ndim - 1))) * grad, None, None, None


class BatchedSurrogate:
    """A GradientSource over one network, safe to share between threads, batching their passes.

    surrogate: the LocalClassifier to wrap; its network is put in eval mode and frozen for good
    (`LocalClassifier.freeze`), so the searches' own eval/freeze toggles change nothing.
    max_batch: the most images in one pass; a submission larger than that runs alone. Call
    `close()` (or use it as a context manager) to stop the batching thread. `passes` and `images`
    count the network passes and the images they held (mean batch size = images / passes).
    """

    def __init__(self, surrogate: LocalClassifier, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.surrogate = surrogate
        self.classes = surrogate.classes
        self.image_size = surrogate.image_size
        self.trained_on_grey = surrogate.trained_on_grey
        self.max_batch = max_batch
        self.model: nn.Module = surrogate.freeze().model
        self.passes = 0
        self.images = 0
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="surrogate-batcher", daemon=True)
        self._thread.start()

    # The GradientSource interface -------------------------------------------------------------
    def margin(self, x: torch.Tensor, goal: int) -> torch.Tensor:
        return self._objective(x, "margin", goal)

    def loss(self, x: torch.Tensor, label: int) -> torch.Tensor:
        return self._objective(x, "loss", label)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Unbatched logits (reports, not searches): the wrapped classifier's own."""
        return self.surrogate.logits(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped classifier's probabilities (reports, not searches)."""
        return self.surrogate.predict_proba(x)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    # Batching ----------------------------------------------------------------------------------
    def _objective(self, x: torch.Tensor, objective: Objective, cls: int) -> torch.Tensor:
        if not 0 <= int(cls) < len(self.classes):
            raise ValueError(f"class {cls} is out of range for {len(self.classes)} classes")
        v = fit_to_size(x.to(self.surrogate.device), self.surrogate.image_size)
        values: torch.Tensor = _NetworkPass.apply(v, self, objective, int(cls))
        return values

    def submit(self, images: torch.Tensor, objective: Objective, cls: int,
               gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queue (n, C, S, S) images for the next pass; blocks until it ran. Returns ((n,) values,
        (n, C, S, S) input gradients or None)."""
        if self._closed:
            raise RuntimeError("the batched surrogate is closed")
        work = _Work(images, objective, cls, gradient)
        self._queue.put(work)
        return work.result.result()

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, size, stop = [first], first.images.shape[0], False
            while size < self.max_batch:
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    break
                if work is None:
                    stop = True
                    break
                if size + work.images.shape[0] > self.max_batch:
                    self._run([work])  # too big to join this pass: its own pass first
                    continue
                batch.append(work)
                size += work.images.shape[0]
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Work]) -> None:
        try:
            x = torch.cat([w.images for w in batch])
            gradient = any(w.gradient for w in batch)
            counts = [w.images.shape[0] for w in batch]
            pairs = list(zip(batch, counts, strict=True))
            classes = torch.cat([torch.full((n,), w.cls, dtype=torch.long) for w, n in pairs])
            is_margin = torch.cat([torch.full((n,), w.objective == "margin") for w, n in pairs])
            classes, is_margin = classes.to(x.device), is_margin.to(x.device)
            x = x.requires_grad_(gradient)
            with torch.enable_grad() if gradient else torch.no_grad():
                logits = self.model(x)
                goal = logits.gather(1, classes[:, None])[:, 0]
                others = logits.masked_fill(F.one_hot(classes, logits.shape[1]).bool(), float("-inf")).max(1).values
                loss = F.cross_entropy(logits, classes, reduction="none")
                values = torch.where(is_margin, goal - others, loss)
                grads = torch.autograd.grad(values.sum(), x)[0] if gradient else None
            self.passes += 1
            self.images += x.shape[0]
            start = 0
            for w, n in zip(batch, counts, strict=True):
                part = slice(start, start + n)
                start += n
                w.result.set_result((values[part].detach(), None if grads is None or not w.gradient
                                     else grads[part].detach()))
        except BaseException as exc:  # every waiting search gets the error, the thread goes on
            for w in batch:
                if not w.result.done():
                    w.result.set_exception(exc)

    def close(self) -> None:
        """Stop the batching thread after the work already queued."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> BatchedSurrogate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
