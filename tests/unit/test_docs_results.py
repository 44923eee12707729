"""Every results file the READMEs cite is committed under bench/results/.

Numbers in the READMEs must trace to a committed JSON; a renamed or never-committed file would
leave a number with nothing behind it.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "bench" / "results"
# Names the READMEs use for what a script writes or a model folder holds, not for committed results.
OUTPUT_NAMES = {"config.json", "metrics.json", "explanations.jsonl", "paper_scale.json", "paper_scale.jsonl"}
CITED = re.compile(r"`([A-Za-z0-9_{},.\-]+\.jsonl?)`")


def expand(name: str) -> list[str]:
    """Shell-style braces: `a_{b,c}_d.json` -> a_b_d.json, a_c_d.json."""
    parts = re.split(r"\{([^{}]*)\}", name)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_expand() -> None:
    assert expand("a_{b,c}_d_{1,2}.json") == ["a_b_d_1.json", "a_b_d_2.json", "a_c_d_1.json", "a_c_d_2.json"]
    assert expand("plain.json") == ["plain.json"]


def cited() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for match in CITED.finditer(doc.read_text()):
            for name in expand(match.group(1)):
                out.append((doc.relative_to(ROOT).as_posix(), Path(name).name))
    return out


def test_the_readmes_cite_results() -> None:
    # Guards the regex: if it stopped matching, the test below would pass on nothing.
    assert len({name for _, name in cited()}) > 30


@pytest.mark.parametrize(("doc", "name"), sorted(set(cited())))
def test_cited_results_are_committed(doc: str, name: str) -> None:
    if name in OUTPUT_NAMES:
        return
    assert (RESULTS / name).is_file(), f"{doc} cites {name}, which is not in bench/results/"
