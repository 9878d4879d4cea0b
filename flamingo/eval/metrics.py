"""The metrics of the OpenFlamingo paper's table, computed as the datasets' own evaluation code does.

- `cider`: CIDEr-D ×100 by `pycocoevalcap` (Stanford PTB tokenization, which runs Java), as COCOEvalCap reports it.
- `vqa_accuracy`: the official VQA accuracy, `min(1, matches / 3)` averaged over the 10 leave-one-out subsets of the
  human answers, after the official script's answer normalisation (reproduced here, quirks included, see below).
- `roc_auc`: scikit-learn's `roc_auc_score` (Hateful Memes); `top1_accuracy` for ImageNet-style classification.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------------------------


def cider(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> float:
    """Corpus CIDEr-D ×100 of one caption per image against its reference captions.

    Both captions and references go through pycocoevalcap's `PTBTokenizer` (lower-casing, PTB tokens, punctuation
    removed), then its `Cider` scorer: the steps and the number that `COCOEvalCap` reports as "CIDEr".
    """
    if set(predictions) != set(references):
        missing, extra = set(references) - set(predictions), set(predictions) - set(references)
        raise ValueError(f"predictions and references differ: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    if not predictions:
        raise ValueError("no captions to score")
    if shutil.which("java") is None:
        raise RuntimeError(
            "CIDEr needs Java for pycocoevalcap's PTB tokenizer: install a JRE (Debian: apt-get install "
            "default-jre-headless)"
        )
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Integer keys in a fixed order: the tokenizer joins the sentences by line, so any key type works, but COCO's
    # own ids are ints and sorting keeps the scorer's document frequencies independent of arrival order.
    keys = sorted(references, key=str)
    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({i: [{"caption": ref} for ref in references[key]] for i, key in enumerate(keys)})
    preds = tokenizer.tokenize({i: [{"caption": predictions[key]}] for i, key in enumerate(keys)})
    score, _ = Cider().compute_score(refs, preds)
    return float(score) * 100.0


def postprocess_caption(generated: str) -> str:
    """OpenFlamingo's captioning post-processing: cut where the model starts another "Output", drop quotes."""
    return generated.split("Output", 1)[0].replace('"', "").strip()


# ---------------------------------------------------------------------------------------------------------------
# VQA: the official evaluation script's normalisation (GT-Vision-Lab/VQA, vqaEval.py)
# ---------------------------------------------------------------------------------------------------------------

# Contracted forms written without (or with misplaced) apostrophes -> the form with them. The table is the official
# script's, entries that can never match included (capitalised keys: answers are lower-cased first).
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split()
)
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# The official pattern reads like "a period not after a digit" but `(?!<=\d)` is a lookahead for the text "<=" and a
# digit: it removes every period that is not followed by a digit. The script also passes `re.UNICODE` where `sub`
# takes its count, so at most 32 periods go.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    """Punctuation next to a space (or anywhere, once the text has a digit-comma-digit) is deleted, other
    punctuation becomes a space; then periods go as described at `_PERIOD`."""
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if glued or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def _normalize_words(text: str) -> str:
    """Lower-case; number words to digits; articles dropped; missing apostrophes restored."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official script's normalisation of a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _normalize_words(_strip_punctuation(answer))


def vqa_item_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy of one prediction against the human answers (10 in VQAv2), in [0, 1].

    As in the official script: the prediction is normalised (punctuation, then number words, articles and
    contractions), the human answers only lose punctuation, and only when they are not all the same (the released
    annotations are normalised already). Each human answer in turn is left out; the prediction scores
    `min(1, matches among the others / 3)`; the result is the mean over the left-out answers.
    """
    if not answers:
        raise ValueError("a VQA item needs at least one reference answer")
    predicted = normalize_vqa_answer(prediction)
    references = [answer.replace("\n", " ").replace("\t", " ").strip() for answer in answers]
    if len(set(references)) > 1:
        references = [_strip_punctuation(answer) for answer in references]
    scores = []
    for left_out in range(len(references)):
        others = references[:left_out] + references[left_out + 1 :]
        scores.append(min(1.0, sum(other == predicted for other in others) / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: Mapping[Any, str], answers: Mapping[Any, Sequence[str]]) -> float:
    """Mean official VQA accuracy ×100 over the questions of `answers` (question id -> human answers)."""
    missing = set(answers) - set(predictions)
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {sorted(missing, key=str)[:5]}")
    if not answers:
        raise ValueError("no questions to score")
    return 100.0 * sum(vqa_item_accuracy(predictions[q], answers[q]) for q in answers) / len(answers)


def exact_match(predictions: Mapping[Any, str], answers: Mapping[Any, str]) -> float:
    """Percentage of items whose prediction equals their one answer, both normalised as VQA predictions are (case,
    punctuation, articles, number words): for answers that are one right word or name, as in few-shot episodes."""
    if not answers:
        raise ValueError("no items to score")
    return 100.0 * sum(normalize_vqa_answer(predictions[k]) == normalize_vqa_answer(a) for k, a in answers.items()) / len(answers)


def postprocess_vqa_answer(generated: str) -> str:
    """OpenFlamingo's VQA post-processing: cut where the model starts another question or answer, then at ", "."""
    answer = re.split("Question|Answer|Short", generated, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0].strip()


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC ×100 of scores for the positive class (label 1), by scikit-learn."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) < 2:
        raise ValueError(f"ROC AUC needs both classes among the labels; got only {sorted(set(labels))}")
    return float(roc_auc_score(list(labels), list(scores))) * 100.0


def top1_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Percentage of predictions equal to their label."""
    if not labels:
        raise ValueError("no items to score")
    return 100.0 * sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)
