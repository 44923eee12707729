"""Reading a service's /metrics text in tests: prometheus_client's own parser, never string matching."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`; 0 when there are none.

    >>> metric('c_total{client="a"} 2.0\\nc_total{client="b"} 1.0\\n', "c_total", client="a")
    2.0
    """
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def families(text: str) -> set[str]:
    """The metric families the text declares, samples or not yet (a labelled histogram has none until
    it is observed). Counters are named without `_total`, as the parser names them."""
    return {family.name for family in text_string_to_metric_families(text)}
