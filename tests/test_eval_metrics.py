"""flamingo.eval.metrics against the reference implementations: pycocoevalcap's COCOEvalCap (CIDEr), the official
VQA evaluation script's behaviour on its edge cases (written out below), scikit-learn (ROC AUC)."""

import json

import pytest
from extras import needs_eval_extra, needs_java

from flamingo.eval import metrics

CAPTIONS = {
    1: "A man riding a wave on top of a surfboard.",
    2: "two dogs playing in the snow",
    3: "a plate of food with broccoli",
}
REFERENCES = {
    1: [
        "A man riding a wave on a surfboard.",
        "a surfer rides a large wave",
        "Man surfing on a wave.",
        "a person on a surfboard in the ocean",
        "A surfer in the water riding a wave.",
    ],
    2: [
        "Two dogs play in the snow.",
        "dogs running through snow",
        "A pair of dogs playing outside in snow.",
        "two brown dogs in the snow",
        "Dogs playing in a snowy field",
    ],
    3: [
        "A plate with broccoli and rice.",
        "food on a white plate",
        "a dish of vegetables",
        "Broccoli and meat on a plate.",
        "a meal with broccoli on a plate",
    ],
}


@needs_java
@needs_eval_extra
def test_cider_equals_coco_eval_cap(tmp_path, monkeypatch):
    """COCOEvalCap end to end (pycocotools' COCO + loadRes, as OpenFlamingo's coco_metric.py), with its Java
    METEOR/SPICE scorers (SPICE downloads models) left out: they do not change CIDEr."""
    from pycocoevalcap import eval as cap_eval
    from pycocotools.coco import COCO

    monkeypatch.setattr(cap_eval, "Meteor", lambda: _Skip("METEOR"))
    monkeypatch.setattr(cap_eval, "Spice", lambda: _Skip("SPICE"))
    annotations = {
        "images": [{"id": i} for i in REFERENCES],
        "annotations": [
            {"image_id": i, "id": 10 * i + j, "caption": c}
            for i, refs in REFERENCES.items()
            for j, c in enumerate(refs)
        ],
        "type": "captions",
        "info": {},
        "licenses": [],
    }
    (tmp_path / "refs.json").write_text(json.dumps(annotations))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in CAPTIONS.items()]))
    coco = COCO(str(tmp_path / "refs.json"))
    result = coco.loadRes(str(tmp_path / "res.json"))
    evaluator = cap_eval.COCOEvalCap(coco, result)
    evaluator.params["image_id"] = result.getImgIds()
    evaluator.evaluate()

    ours = metrics.cider(CAPTIONS, REFERENCES)
    assert ours == pytest.approx(evaluator.eval["CIDEr"] * 100, abs=1e-9)
    assert ours > 0


class _Skip:
    def __init__(self, name):
        self.name = name

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return self.name


@needs_java
@needs_eval_extra
def test_cider_ranks_a_matching_caption_above_an_unrelated_one():
    # (CIDEr's n-gram weights need a corpus: on one image every n-gram has idf 0)
    good = metrics.cider({**CAPTIONS, 1: "a man riding a wave on a surfboard"}, REFERENCES)
    bad = metrics.cider({**CAPTIONS, 1: "a plate of broccoli"}, REFERENCES)
    assert good > bad >= 0


def test_cider_needs_a_prediction_per_image():
    with pytest.raises(ValueError, match="missing"):
        metrics.cider({1: "x"}, {1: ["x"], 2: ["y"]})


# --- VQA accuracy: the official script's behaviour ---------------------------------------------------------------

TEN = 10


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # leave-one-out over the 10 answers: min(1, matches among the other 9 / 3), averaged
        ("cat", ["cat"] * TEN, 1.0),
        ("cat", ["cat"] * 3 + ["dog"] * 7, (3 * 2 / 3 + 7 * 1) / TEN),  # 0.9
        ("cat", ["cat"] * 2 + ["dog"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / TEN),  # 0.6
        ("cat", ["cat"] + ["dog"] * 9, (1 * 0 + 9 * 1 / 3) / TEN),  # 0.3
        ("bird", ["cat"] * 5 + ["dog"] * 5, 0.0),
        # the prediction: lower case, number words -> digits, articles dropped, apostrophes restored
        ("Two", ["2"] * TEN, 1.0),
        ("none", ["0"] * TEN, 1.0),
        ("the dog", ["dog"] * TEN, 1.0),
        ("A dog", ["dog"] * TEN, 1.0),
        ("dont", ["don't"] * TEN, 1.0),
        ("  yes\n", ["yes"] * TEN, 1.0),
        # punctuation next to a space is deleted, elsewhere it becomes a space (then words are re-joined)
        ("red, white", ["red white"] * TEN, 1.0),
        ("black/white", ["black white"] * TEN, 1.0),
        ("1,000", ["1000"] * TEN, 1.0),  # a digit-comma-digit: every mark is deleted
        # periods go unless a digit follows
        ("yes.", ["yes"] * TEN, 1.0),
        ("3.5", ["3.5"] * TEN, 1.0),
        # human answers are left as they are when they all agree (released annotations are normalised already) ...
        ("two", ["Two"] * TEN, 0.0),
        # ... and otherwise lose only their punctuation: not their case, articles or number words
        ("2", ["two"] * 5 + ["2"] * 5, (5 * 1 + 5 * 1) / TEN),
        ("2", ["Two"] * 9 + ["2"], 0.3),
        ("yes", ["yes!"] * 9 + ["no"], 0.0),  # "yes!" -> "yes " (the mark becomes a space, nothing strips it)
        ("yes", ["yes, sir"] * 9 + ["no"], 0.0),  # ", " -> "yes sir"
        ("yes sir", ["yes, sir"] * 9 + ["no"], 1.0),
    ],
)
def test_vqa_accuracy_matches_the_official_script(prediction, answers, expected):
    assert metrics.vqa_item_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_period_quirks_of_the_official_pattern():
    # `(?!<=\d)` is a lookahead, not a lookbehind: a period after a digit still goes when no digit follows
    assert metrics.normalize_vqa_answer("5.") == "5"
    # the script passes re.UNICODE (32) as `count`: only the first 32 periods are removed
    assert metrics.normalize_vqa_answer("x" + "." * 40) == "x" + "." * 8


def test_vqa_accuracy_is_a_percentage_over_questions():
    answers = {1: ["cat"] * TEN, 2: ["dog"] * TEN}
    assert metrics.vqa_accuracy({1: "cat", 2: "cow"}, answers) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no prediction"):
        metrics.vqa_accuracy({1: "cat"}, answers)


def test_openflamingo_answer_postprocessing():
    assert metrics.postprocess_vqa_answer("yes Question: is it") == "yes"
    assert metrics.postprocess_vqa_answer("red, white and blue") == "red"
    assert metrics.postprocess_caption('a "cat" on a mat Output: a dog') == "a cat on a mat"


# --- classification ----------------------------------------------------------------------------------------------


@needs_eval_extra
def test_roc_auc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    labels = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0]
    scores = [0.1, 0.8, 0.35, 0.4, 0.9, 0.2, 0.65, 0.3, 0.7, 0.05]
    assert metrics.roc_auc(labels, scores) == pytest.approx(100 * roc_auc_score(labels, scores))
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc_auc([1, 1], [0.2, 0.3])


def test_top1_accuracy():
    assert metrics.top1_accuracy(["cat", "dog", "cow"], ["cat", "dog", "dog"]) == pytest.approx(200 / 3)
