"""VQA accuracy by the rules of the official VQA evaluation (vqaEval.py of the VQA API, GT-Vision-Lab).

Per question: the predicted answer is normalised (whitespace, punctuation, number words -> digits, articles
dropped, contractions restored); the 10 human answers get only the punctuation step, and only when they
are not all identical (the official code does exactly this: the released answers are already lower-cased
and normalised). Accuracy is the mean over the 10 leave-one-out subsets of 9 human answers of
min(1, #matches / 3). Overall, per-question-type and per-answer-type accuracies are the means of the
per-question accuracies, in percent rounded to 2 decimals, as the official `setAccuracy` reports them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from minivlm.errors import DataFormatError
from minivlm.eval.results import rows_to_dict
from minivlm.io import read_json

# The official contractions table, including its oddities (capitalised keys can never match a lower-cased
# word, and "somebody'd" maps to "somebodyd"): matching official numbers means keeping them.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
# Kept verbatim, typo included: "(?!<=\d)" is a look-ahead for the text "<=" + digit, not a look-behind,
# so any period not followed by a digit is removed ("2.5" keeps its period, "dog." loses it).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """Official punctuation step: a mark next to a space (or any text with a digit,digit comma) is deleted,
    otherwise it becomes a space ("black/white" -> "black white"); then periods not before a digit go."""
    out = text
    has_number_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (32) where `count` goes: at most 32 periods are removed.
    return PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """Official word step: lower-case, number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """What the official evaluation does to a predicted answer before comparing it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def answer_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """One question's accuracy in [0, 1]: mean over leave-one-out subsets of min(1, matches / 3)."""
    if not gt_answers:
        raise ValueError("a question needs its human answers to be scored")
    pred = normalize_answer(prediction)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = [a == pred for a in gts]
    total = sum(matches)
    # Leaving out answer i removes one match when answer i itself matched.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def _field(q: Any, name: str) -> Any:
    return q[name] if isinstance(q, Mapping) else getattr(q, name)


def _answers(q: Any) -> list[str]:
    # VQAQuestion.answers holds strings; raw annotation records hold {"answer": ...} objects.
    return [a["answer"] if isinstance(a, Mapping) else a for a in _field(q, "answers")]


def vqa_accuracy(results: Sequence[Mapping[str, Any]] | Mapping[Any, str], questions: Sequence[Any],
                 precision: int = 2) -> dict[str, Any]:
    """Official VQA accuracy of `results` ([{"question_id", "answer"}] or {question_id: answer}) on
    `questions` (VQAQuestion-like: question_id, question_type, answer_type, answers). Every question needs
    an answer and every answer a question, as the official `loadRes` demands.

    Returns {"overall", "perQuestionType", "perAnswerType", "n_questions", "per_question"}, in percent."""
    answers = rows_to_dict(results, "question_id", "answer")
    by_id = {_field(q, "question_id"): q for q in questions}
    if not by_id:
        raise ValueError("no questions to score")
    extra = [qid for qid in answers if qid not in by_id]
    if extra:
        raise ValueError(f"{len(extra)} result question_id(s) are not among the questions, e.g. {extra[0]}")
    missing = [qid for qid in by_id if qid not in answers]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no answer in the results, e.g. question_id {missing[0]}")

    per_question: dict[Any, float] = {}
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for qid, q in by_id.items():
        pred = answers[qid]
        if not isinstance(pred, str):
            raise ValueError(f"question_id {qid}: answer must be a string, got {type(pred).__name__}")
        gts = _answers(q)
        if not gts:
            raise ValueError(f"question_id {qid}: no human answers (an unannotated split cannot be scored)")
        acc = answer_accuracy(pred, gts)
        per_question[qid] = acc
        by_qtype.setdefault(_field(q, "question_type"), []).append(acc)
        by_atype.setdefault(_field(q, "answer_type"), []).append(acc)

    def pct(vals: Sequence[float]) -> float:
        return round(100.0 * sum(vals) / len(vals), precision)

    return {
        "overall": pct(list(per_question.values())),
        "perQuestionType": {k: pct(v) for k, v in by_qtype.items()},
        "perAnswerType": {k: pct(v) for k, v in by_atype.items()},
        "n_questions": len(per_question),
        "per_question": {qid: round(100.0 * a, precision) for qid, a in per_question.items()},
    }


def read_vqa_results(path: str | Path) -> dict[int, str]:
    """A VQA results file: [{"question_id", "answer"}, ...]."""
    obj = read_json(path)
    if not isinstance(obj, list):
        raise DataFormatError(path, "expected a JSON list of {\"question_id\", \"answer\"}, "
                                    f"got {type(obj).__name__}")
    out: dict[int, str] = {}
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataFormatError(path, f"[{i}]: expected an object with \"question_id\" and \"answer\"")
        for key in ("question_id", "answer"):
            if key not in r:
                raise DataFormatError(path, f"[{i}].{key}: missing")
        qid, ans = r["question_id"], r["answer"]
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise DataFormatError(path, f"[{i}].question_id: expected an integer, got {qid!r}")
        if not isinstance(ans, str):
            raise DataFormatError(path, f"[{i}].answer: expected a string, got {type(ans).__name__}")
        if qid in out:
            raise DataFormatError(path, f"[{i}].question_id: {qid} appears twice")
        out[qid] = ans
    return out


def evaluate_vqa_file(results_json: str | Path, questions_json: str | Path,
                      annotations_json: str | Path) -> dict[str, Any]:
    """Official VQA accuracy of a results file against VQA v2 questions + annotations files."""
    from minivlm.data.readers import read_vqa

    results = read_vqa_results(results_json)
    questions = read_vqa(questions_json, annotations_json)
    try:
        return vqa_accuracy(results, questions)
    except ValueError as err:
        raise DataFormatError(results_json, str(err)) from None
