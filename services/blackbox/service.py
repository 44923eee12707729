"""The black box as an object: decode uploads, one forward pass per request behind admission, count the images."""

from __future__ import annotations

import torch
from prometheus_client import Counter

from advexplain.services.blackbox.counter import QueryCounter
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.services.common.admission import Admission
from advexplain.services.common.metrics import BoundedLabels, ServiceMetrics
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.images import decode_image
from advexplain.shared.wire import Prediction, PredictResponse


class BlackBox:
    """The loaded model with its limits, counter and metrics; lives on `app.state.blackbox`."""

    def __init__(self, classifier: LocalClassifier, settings: BlackboxSettings, metrics: ServiceMetrics):
        self.classifier = classifier
        self.settings = settings
        self.counter = QueryCounter(settings.max_clients)
        self.admission = Admission(settings.workers, settings.max_queue, settings.max_queue_wait,
                                   namespace=metrics.namespace, registry=metrics.registry, what="request")
        self._client_label = BoundedLabels(settings.max_client_labels)
        self._queries = Counter(
            "queries", "Images classified, by client (ids past the label cap share 'other')", ["client"],
            namespace=metrics.namespace, registry=metrics.registry,
        )
        self._queries_total = Counter(
            "queries_all", "Images classified, all clients", namespace=metrics.namespace, registry=metrics.registry,
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.classifier.classes

    def classify(self, files: list[bytes]) -> torch.Tensor:
        """Encoded images -> (N, K) probabilities in request order; one forward pass. Blocking (torch)."""
        size, max_pixels = self.classifier.image_size, self.settings.max_pixels
        batch = torch.stack([decode_image(data, size, max_pixels, name=f"image {i}") for i, data in enumerate(files)])
        return self.classifier.predict_proba(batch)

    async def predict(self, files: list[bytes], client: str) -> tuple[PredictResponse, int]:
        """Classify off the event loop, then count; returns the answer and the client's running total.

        Counting happens only after the forward pass succeeded, so a rejected request counts nothing.
        """
        probs = await self.admission.run(self.classify, files)
        total = self.count(client, len(files))
        return PredictResponse(predictions=self._predictions(probs), queries=len(files)), total

    async def predict_tensor(self, x: torch.Tensor, client: str) -> tuple[torch.Tensor, int]:
        """(N, C, S, S) float in [0, 1] at the model's size -> (N, K) probabilities, and the client's running total.

        The Open Inference Protocol's path (services/blackbox/oip.py): the same forward pass off the
        event loop, the same admission (queue, wait, 503 overloaded), and the same counting after it succeeded.
        """
        probs = await self.admission.run(self.classifier.predict_proba, x)
        return probs, self.count(client, int(x.shape[0]))

    def count(self, client: str, images: int) -> int:
        """Count `images` classified for `client`, in the counter and the metrics; the client's new total."""
        total = self.counter.add(client, images)
        self._queries.labels(client=self._client_label(client)).inc(images)
        self._queries_total.inc(images)
        return total

    def _predictions(self, probs: torch.Tensor) -> list[Prediction]:
        with_probs = self.settings.output == "proba"
        out = []
        for row in probs.tolist():
            index = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(
                label=self.classes[index], index=index,
                probabilities=dict(zip(self.classes, row)) if with_probs else None,
            ))
        return out
