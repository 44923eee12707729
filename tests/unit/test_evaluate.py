"""`advexplain evaluate` end to end on tiny models: the files exist and agree with each other."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from advexplain.cli import main
from advexplain.shared.errors import InvalidInput


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
    rc = main(
        [
            "--threads",
            "1",
            "evaluate",
            "--data",
            "elpv",
            "--split",
            "validation",
            "--blackbox",
            str(tiny_models["blackbox"]),
            "--surrogate",
            str(tiny_models["surrogate"]),
            "--surrogate",
            str(distilled),
            "--mode",
            "blackbox",
            "--limit",
            "3",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "(ensemble)" in metrics["gradient_source"]
    assert metrics["distillation_queries"] == 150
    assert metrics["distillation_queries_per_image"] == pytest.approx(50.0)
    assert metrics["mean_queries_with_distillation"] == pytest.approx(metrics["mean_queries"] + 50.0)
    assert "150 black-box queries spent training" in (out / "report.md").read_text()


# ---------------------------------------------------------------- --target and --counterfactual

def test_choose_goals_picks_the_photos_and_classes_of_each_selection():
    from advexplain.commands.evaluate import choose_goals

    predictions, labels = [0, 1, 2, 3, 0], [0, 2, 2, 1, 3]
    assert choose_goals(predictions, labels) == [(1, 2), (3, 1), (4, 3)], "mistakes, toward their labels"
    assert choose_goals(predictions, labels, target=0) == [(1, 0), (2, 0), (3, 0)], "every photo not predicted 0"
    assert choose_goals(predictions, labels, nearest=lambda i: 10 + i) == [(0, 10), (2, 12)], "correct photos only"
    with pytest.raises(InvalidInput):
        choose_goals(predictions, labels, target=0, nearest=lambda i: 1)


def test_runner_up_class_index_and_one_hot():
    from advexplain.commands.evaluate import class_index, is_one_hot, runner_up

    assert runner_up(torch.tensor([0.1, 0.6, 0.3]), 1) == 2
    assert runner_up(torch.tensor([0.9, 0.05, 0.05]), 0) == 1, "ties go to the lower index"
    assert runner_up(torch.tensor([0.2, 0.7, 0.1]), 0) == 1, "the box's top class when the prediction is another"
    classes = ("p0", "p33", "p67", "p100")
    assert class_index("p67", classes) == 2 and class_index("3", classes) == 3
    for bad in ("p50", "4", "-1", ""):
        with pytest.raises(InvalidInput):
            class_index(bad, classes)
    assert is_one_hot(torch.tensor([0.0, 1.0, 0.0])) and not is_one_hot(torch.tensor([0.2, 0.8, 0.0]))


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    from tests.tiny_elpv4 import tiny4_models

    return tiny4_models(tmp_path_factory.mktemp("elpv4"))


def box_view(blackbox_path):
    """(predictions, probabilities, labels) of the tiny elpv4 box on every validation photo, at its own size."""
    from advexplain.shared.classifiers import LocalClassifier
    from advexplain.shared.data import load_photos

    box = LocalClassifier.from_checkpoint(blackbox_path)
    photos = load_photos("elpv4", "validation")
    with torch.no_grad():
        probs = [torch.softmax(box.logits(photos.image(i)[None])[0], 0) for i in range(len(photos))]
    return [int(p.argmax()) for p in probs], probs, photos.labels


def evaluate4(tiny4, out, *extra):
    rc = main(["--threads", "1", "evaluate", "--data", "elpv4", "--split", "validation", "--blackbox",
               str(tiny4["blackbox"]), "--surrogate", str(tiny4["surrogate"]), "--quiet", "--out", str(out), *extra])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    lines = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    return metrics, lines, (out / "report.md").read_text()


def test_evaluate_target_explains_every_photo_not_yet_predicted_as_the_target(tiny4, tmp_path):
    predictions, _, labels = box_view(tiny4["blackbox"])
    target = 3
    metrics, lines, report = evaluate4(tiny4, tmp_path / "t", "--target", "p100-defective", "--limit", "4",
                                       "--max-linf", "0.25")
    chosen = [i for i, p in enumerate(predictions) if p != target]
    assert metrics["selection"] == "target" and metrics["target"] == "p100-defective"
    assert metrics["selected"] == len(chosen) and metrics["explained"] == len(lines) == 4
    assert metrics["misclassified"] == sum(p != y for p, y in zip(predictions, labels)), "still the split's mistakes"
    assert [line["index"] for line in lines] == chosen[:4], "the first photos of the split not predicted as the target"
    for line in lines:
        assert line["target"] == target and line["target_name"] == "p100-defective"
        assert line["label"] == labels[line["index"]], "label stays the true label"
        assert line["original_prediction"] == predictions[line["index"]] != target and not line["already_correct"]
        if line["success"]:
            assert line["final_prediction"] == target and line["linf"] <= 0.25
    assert metrics["correctly_classified_explained"] == sum(predictions[i] == labels[i] for i in chosen[:4])
    assert metrics["oracle_queries_total"] == sum(line["queries"] for line in lines)
    assert all(pair.endswith("-> p100-defective") for pair in metrics["by_goal"])
    assert sum(g["explained"] for g in metrics["by_goal"].values()) == 4
    assert "toward `p100-defective`" in report and "73.08%" not in report, "no paper row: the paper explains mistakes"
    assert len(list((tmp_path / "t" / "gallery").glob("*-to-p100-defective.png"))) == 4

    # The same target by index selects the same photos.
    by_index, _, _ = evaluate4(tiny4, tmp_path / "i", "--target", "3", "--limit", "1")
    assert by_index["selected"] == metrics["selected"] and by_index["target"] == "p100-defective"


@pytest.mark.parametrize("label_only", [False, True])
def test_evaluate_counterfactual_explains_correct_photos_toward_the_nearest_other_class(tiny4, tmp_path, label_only):
    from advexplain.shared.classifiers import LocalClassifier
    from advexplain.shared.data import load_photos

    predictions, probs, labels = box_view(tiny4["blackbox"])
    metrics, lines, report = evaluate4(tiny4, tmp_path / "c", "--counterfactual", "--limit", "3",
                                       *(["--label-only"] if label_only else []))
    correct = [i for i, (p, y) in enumerate(zip(predictions, labels)) if p == y]
    assert metrics["selection"] == "counterfactual" and metrics["selected"] == len(correct)
    assert metrics["explained"] == metrics["correctly_classified_explained"] == len(lines) == 3
    assert [line["index"] for line in lines] == correct[:3]
    if label_only:
        # A label-only box says nothing about the other classes: the surrogate's runner-up decides.
        assert metrics["nearest_by"] == "gradient source"
        surrogate = LocalClassifier.from_checkpoint(tiny4["surrogate"])
        photos = load_photos("elpv4", "validation")
        with torch.no_grad():
            scores = [surrogate.logits(photos.image(line["index"])[None])[0] for line in lines]
    else:
        assert metrics["nearest_by"] == "black-box probabilities"
        scores = [probs[line["index"]] for line in lines]
    for line, s in zip(lines, scores):
        i = line["index"]
        assert line["label"] == line["original_prediction"] == labels[i] and not line["already_correct"]
        s = s.clone()
        s[labels[i]] = float("-inf")
        assert line["target"] == int(s.argmax()) != labels[i], "the highest-scoring class other than the prediction"
        if line["success"]:
            assert line["final_prediction"] == line["target"]
    assert "nearest other class" in report and "73.08%" not in report
    assert len(list((tmp_path / "c" / "gallery").glob("*.png"))) == 3


def test_evaluate_default_is_still_the_mistakes_toward_their_labels(tiny4, tmp_path):
    predictions, _, labels = box_view(tiny4["blackbox"])
    metrics, lines, report = evaluate4(tiny4, tmp_path / "m", "--limit", "3")
    mistakes = [i for i, (p, y) in enumerate(zip(predictions, labels)) if p != y]
    assert metrics["selection"] == "mistakes" and metrics["target"] is None and metrics["nearest_by"] is None
    assert metrics["selected"] == metrics["misclassified"] == len(mistakes)
    assert [(line["index"], line["target"]) for line in lines] == [(i, labels[i]) for i in mistakes[:3]]
    assert metrics["correctly_classified_explained"] == 0 and "73.08%" in report


def test_evaluate_target_errors(tiny4, tmp_path, capsys):
    rc = main(["--threads", "1", "evaluate", "--data", "elpv4", "--blackbox", str(tiny4["blackbox"]),
               "--surrogate", str(tiny4["surrogate"]), "--target", "p50", "--quiet", "--out", str(tmp_path / "x")])
    assert rc == 2 and "unknown --target 'p50'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--target", "1", "--counterfactual"])
    assert exc.value.code == 2
