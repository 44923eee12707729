"""`advexplain evaluate` end to end on tiny models: the files exist and agree with each other."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from advexplain.cli import main


@pytest.mark.parametrize("mode,method", [("blackbox", "margin"), ("whitebox", "paper")])
def test_evaluate_writes_consistent_report(tiny_models, tmp_path, mode, method):
    out = tmp_path / "report"
    rc = main(["--threads", "1", "evaluate", "--data", "elpv", "--split", "validation", "--blackbox",
               str(tiny_models["blackbox"]), "--surrogate", str(tiny_models["surrogate"]), "--mode", mode,
               "--method", method, "--limit", "3", "--quiet", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    lines = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert metrics["misclassified"] >= metrics["explained"] == len(lines) == 3
    assert metrics["oracle_queries_total"] == sum(line["queries"] for line in lines)
    assert metrics["mean_search_queries"] == pytest.approx(sum(line["search_queries"] for line in lines) / 3)
    assert metrics["success_rate"] == pytest.approx(sum(line["success"] for line in lines) / 3)
    assert all(not line["already_correct"] for line in lines)
    gallery = list((out / "gallery").glob("*.png"))
    assert len(gallery) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in gallery), "portable file names"
    report = (out / "report.md").read_text()
    assert "99.67%" in report or "73.08%" in report


def test_unreachable_blackbox_url_is_a_clean_error(tiny_models, tmp_path, capsys):
    rc = main(["--threads", "1", "evaluate", "--data", "elpv", "--blackbox", str(tiny_models["blackbox"]),
               "--surrogate", str(tiny_models["surrogate"]), "--blackbox-url", "http://127.0.0.1:9",
               "--limit", "1", "--quiet", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "127.0.0.1:9" in capsys.readouterr().err


def test_ensemble_and_distillation_queries_are_reported(tiny_models, tmp_path):
    """Two surrogates combine into one gradient source; distillation queries are counted apart."""
    distilled = tmp_path / "distilled"
    shutil.copytree(tiny_models["surrogate"], distilled)
    meta = json.loads((distilled / "config.json").read_text())
    meta["distillation"] = {"source": "checkpoint:test", "queries": 150, "budget": 150, "targets": "hard"}
    (distilled / "config.json").write_text(json.dumps(meta))
    out = tmp_path / "ens"
    rc = main(["--threads", "1", "evaluate", "--data", "elpv", "--split", "validation", "--blackbox",
               str(tiny_models["blackbox"]), "--surrogate", str(tiny_models["surrogate"]), "--surrogate", str(distilled),
               "--mode", "blackbox", "--limit", "3", "--quiet", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "(ensemble)" in metrics["gradient_source"]
    assert metrics["distillation_queries"] == 150
    assert metrics["distillation_queries_per_image"] == pytest.approx(50.0)
    assert metrics["mean_queries_with_distillation"] == pytest.approx(metrics["mean_queries"] + 50.0)
    assert "150 black-box queries spent training" in (out / "report.md").read_text()
