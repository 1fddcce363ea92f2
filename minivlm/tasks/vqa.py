"""VQA as classification over a fixed answer set (paper Sec. 4.4, OSCAR's recipe).

    [CLS] question [SEP] tags [SEP] regions -> transformer -> pooled [CLS] -> ClassifierHead -> A answers

* Answer set: the `num_answers` (3129 in the paper) most frequent training answers after the official
  normalisation (`minivlm.eval.vqa_eval.normalize_answer`), capped by how many distinct answers the data
  has. Ties are broken alphabetically so the set is the same on every run (a resumed run must see the
  same head).
* Targets are soft: answer a gets min(1, #humans who gave a / 3), the VQA accuracy of predicting a.
* Loss: binary cross-entropy over all answers, summed over answers and averaged over questions (OSCAR
  multiplies the element mean by the number of answers).
* Prediction: the highest-scoring answer; results are the official `[{"question_id", "answer"}]` list.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from minivlm.config import BertConfig
from minivlm.data.readers import VQAQuestion
from minivlm.eval.vqa_eval import normalize_answer
from minivlm.fusion.heads import (POOLED_VECTORS, ClassifierHead, PickCompare, Pooler, RegionAttention, RegionCount,
                                  count_bins, pooled_text_mean, text_and_picked_region, text_and_picks)
from minivlm.fusion.inputs import FusionBatch, build_batch
from minivlm.fusion.transformer import MultimodalBert
from minivlm.regions import Regions
from minivlm.errors import MiniVLMError
from minivlm.batching import chunks
from minivlm.tasks.data import RegionSource, get_regions, model_device
from minivlm.tasks.task import Task
from minivlm.text.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------- answers


def build_answer_vocab(questions: Sequence[VQAQuestion], num_answers: int) -> list[str]:
    """The most frequent normalised human answers, at most `num_answers` of them."""
    counts: Counter[str] = Counter()
    for q in questions:
        counts.update(a for a in (normalize_answer(x) for x in q.answers) if a)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:num_answers]]


def soft_targets(answers: Sequence[str], index: dict[str, int]) -> dict[int, float]:
    """Answer index -> min(1, n / 3) for the answers in the vocabulary (n = humans who gave it)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {index[a]: min(1.0, n / 3.0) for a, n in counts.items() if a in index}


def target_tensor(targets: Sequence[dict[int, float]], num_answers: int) -> torch.Tensor:
    out = torch.zeros(len(targets), num_answers)
    for i, t in enumerate(targets):
        for a, s in t.items():
            out[i, a] = s
    return out


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE over every answer, summed over answers, averaged over questions."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="mean") * targets.shape[1]


# ---------------------------------------------------------------------------------------------- data


@dataclass
class VQAExample:
    question_id: int
    image_key: int | str  # the image's key in the feature store
    question: str
    targets: dict[int, float]  # answer index -> soft score (empty for unannotated questions)


def make_examples(questions: Sequence[VQAQuestion], store: RegionSource, answers: Sequence[str],
                  drop_unanswerable: bool = False) -> tuple[list[VQAExample], int]:
    """Examples whose image is in `store`; returns (examples, number skipped for lack of features).
    `drop_unanswerable` leaves out questions none of whose human answers is in the answer set (training:
    they teach only "none of these"; OSCAR drops them too)."""
    index = {a: i for i, a in enumerate(answers)}
    out, missing = [], 0
    for q in questions:
        key = store.find(q.image_id)
        if key is None:
            missing += 1
            continue
        targets = soft_targets(q.answers, index)
        if drop_unanswerable and not targets:
            continue
        out.append(VQAExample(q.question_id, key, q.question, targets))
    return out, missing


class VQADataset(Dataset):
    def __init__(self, examples: Sequence[VQAExample], store: RegionSource):
        self.examples, self.store = list(examples), store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[VQAExample, Regions]:
        e = self.examples[i]
        return e, get_regions(self.store, e.image_key)


@dataclass
class VQABatch:
    inputs: FusionBatch
    targets: torch.Tensor  # [B, A] soft scores
    question_ids: list[int]

    def __len__(self) -> int:
        return len(self.question_ids)


class VQACollator:
    def __init__(self, tokenizer: Tokenizer, cfg: BertConfig, num_answers: int):
        self.tokenizer, self.cfg, self.num_answers = tokenizer, cfg, num_answers

    def __call__(self, items: Sequence[tuple[VQAExample, Regions]]) -> VQABatch:
        inputs = build_batch(self.tokenizer, [e.question for e, _ in items], None, [r for _, r in items], self.cfg)
        return VQABatch(inputs, target_tensor([e.targets for e, _ in items], self.num_answers),
                        [e.question_id for e, _ in items])


# ---------------------------------------------------------------------------------------------- model


# What the answer head reads. "cls": BERT's pooled [CLS] (OSCAR). "text-mean": the mean of the token segment's
# final states (question and tags), through the same pooler: with oracle regions it learnt faster from random
# weights (57.4 vs 52.8 in 1,200 steps, docs/RESULTS.md: the oracle runs), the question's words being where the
# answer is bound.
# "region-attention": the text-mean vector beside the final region states weighted by a query from the question's
# tokens (`RegionAttention`, top-down attention). "region-count": that, and the soft counts of the regions the
# question names (`RegionCount`), the first fitted to the answer of each counting question (`COUNT_LOSS_WEIGHT`).
# "pick-compare": the text mean beside two picks, each with its own learned weighting of the question's words, and
# their products with the predicate and with each other (`PickCompare`). "pick-match": that, and what the first
# pick's region scores say: a soft count of the matching regions (fitted to the counting answers, as region-count's),
# the null slot's weights and the picked region's fit to the predicate (`PickCompare(match=True)`). "pick-relate":
# that, with the question split at its relation word between the two picks and the relation read from their boxes
# ("is the star left of the arrow?", "what is left of the arrow?": `PickCompare(relate=True)`).
VQA_POOLS = ("cls", "text-mean", "region-attention", "region-count", "pick-compare", "pick-match", "pick-relate")
PICK_POOLS = ("pick-compare", "pick-match", "pick-relate")
COUNT_POOLS = ("region-count", "pick-match", "pick-relate")  # those with a count fitted to the counting answers
COUNT_LOSS_WEIGHT = 1.0


def answer_numbers(answers: Sequence[str]) -> torch.Tensor:
    """[A]: each answer's value where it is a whole number ("0", "3"; the normalisation turns "three" into "3"),
    else -1."""
    return torch.tensor([float(a) if a.isdigit() else -1.0 for a in answers])


def count_targets(targets: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the number each row's best answer is [B], which rows' best answer is a number [B] bool)."""
    best = targets.argmax(1)
    value = numbers[best]
    return value.clamp(min=0), (value >= 0) & (targets.amax(1) > 0)


class VQAModel(nn.Module):
    def __init__(self, cfg: BertConfig, num_answers: int, pool: str = "cls", null_region: bool = False):
        super().__init__()
        if num_answers < 1:
            raise ValueError("a VQA model needs at least one answer")
        if pool not in VQA_POOLS:
            raise MiniVLMError(f"unknown VQA pooling {pool!r}; choose one of: {', '.join(VQA_POOLS)}")
        self.cfg, self.num_answers, self.pool, self.null_region = cfg, num_answers, pool, null_region
        self.bert = MultimodalBert(cfg)
        self.pooler = Pooler(cfg)
        if pool in ("region-attention", "region-count"):
            self.region_attention = RegionAttention(cfg, null_slot=null_region)
        self.region_count = RegionCount(cfg) if pool == "region-count" else None
        if pool in PICK_POOLS:
            self.pick_compare = PickCompare(cfg, null_slot=null_region, match=pool != "pick-compare",
                                            relate=pool == "pick-relate")
        if pool in COUNT_POOLS:
            # Which answers are numbers; set from the answer set (`set_answers`), saved with the weights.
            self.register_buffer("answer_numbers", torch.full((num_answers,), -1.0))
            # The first count's bin of each number answer is added to that answer's logit, times this: a direct
            # path from the fitted count to the answer it names.
            self.count_scale = nn.Parameter(torch.tensor(4.0))
        self.head = ClassifierHead(cfg, num_answers, in_mult=POOLED_VECTORS[pool])

    @torch.no_grad()
    def set_answers(self, answers: Sequence[str]) -> None:
        if len(answers) != self.num_answers:
            raise ValueError(f"{len(answers)} answers for a head of {self.num_answers}")
        if self.pool in COUNT_POOLS:
            self.answer_numbers.copy_(answer_numbers(answers))

    @torch.no_grad()
    def init_answer_bias(self, targets: Sequence[dict[int, float]]) -> None:
        """Sets the last layer's bias to each answer's training log-odds, so the untrained head already
        predicts the answer prior. With BERT's zero bias every one of the A sigmoids starts at 0.5: the
        summed BCE starts near 0.69 x A (46 for 67 answers, against ~5 at the prior), and its first
        hundred steps push every logit down through the whole transformer (at lr 1e-3 the model then
        collapsed to answering "yes" and could not memorise 256 questions with oracle regions)."""
        p = target_tensor(targets, self.num_answers).mean(0).clamp(1e-4, 1 - 1e-4)
        self.head.net[-1].bias.copy_(torch.log(p / (1 - p)))

    def logits_and_counts(self, inputs: FusionBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(answer logits [B, A], the soft counts of region-count [B, heads] or of pick-match / pick-relate [B, 1],
        else None)."""
        hidden = self.bert(**inputs.model_inputs()).hidden_states
        if self.pool == "cls":
            return self.head(self.pooler(hidden)), None
        if self.pool == "text-mean":
            return self.head(pooled_text_mean(hidden, inputs.text_mask, self.pooler)), None
        if self.pool in PICK_POOLS:
            pooled, counts = text_and_picks(hidden, inputs.text_mask, inputs.token_type_ids, inputs.region_mask,
                                            self.pooler, self.pick_compare, inputs.region_boxes)
        else:
            pooled, counts = text_and_picked_region(hidden, inputs.text_mask, inputs.token_type_ids,
                                                    inputs.region_mask, self.pooler, self.region_attention,
                                                    self.region_count)
        return self._with_counts(self.head(pooled), counts), counts

    def _with_counts(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """The first count's bin of each number answer added to that answer's logit (times `count_scale`)."""
        if counts is None:
            return logits
        top = (self.region_count if self.region_count is not None else self.pick_compare).max_count
        numbers = self.answer_numbers.long()
        named = (numbers >= 0) & (numbers <= top)
        bins = count_bins(counts[:, 0], top)[:, numbers.clamp(0, top)]
        return logits + self.count_scale * bins.to(logits.dtype) * named

    def logits(self, inputs: FusionBatch) -> torch.Tensor:
        return self.logits_and_counts(inputs)[0]

    def forward(self, batch: VQABatch) -> dict[str, torch.Tensor]:
        logits, counts = self.logits_and_counts(batch.inputs)
        # VQA score of the arg-max answer: the training accuracy in the official metric's units (0..1).
        score = batch.targets.gather(1, logits.argmax(1, keepdim=True)).mean()
        out = {"loss": vqa_loss(logits.float(), batch.targets), "vqa_score": score.detach()}
        if counts is not None:
            # The first count is fitted to the answer of each counting question: the one signal that says which
            # regions to count (through the soft bins alone the head learnt to count every region).
            number, is_count = count_targets(batch.targets, self.answer_numbers)
            err = F.smooth_l1_loss(counts[:, 0], number, reduction="none")
            count_loss = (err * is_count).sum() / is_count.sum().clamp(min=1)
            out["loss"] = out["loss"] + COUNT_LOSS_WEIGHT * count_loss
            out["count_loss"] = count_loss.detach()
        return out

    @torch.no_grad()
    def predict(self, tokenizer: Tokenizer, regions_list: Sequence[Regions], questions: Sequence[str],
                top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(answer indices [N, k], sigmoid confidences [N, k]) for one batch of (image regions, question)."""
        inputs = build_batch(tokenizer, list(questions), None, list(regions_list), self.cfg)
        probs = torch.sigmoid(self.logits(inputs.to(model_device(self))).float())
        conf, idx = probs.topk(min(top_k, self.num_answers), dim=1)
        return idx.cpu(), conf.cpu()


@torch.no_grad()
def predict_vqa(model: VQAModel, tokenizer: Tokenizer, examples: Sequence[VQAExample], store: RegionSource,
                answers: Sequence[str], batch_size: int = 64, progress: bool = True) -> list[dict]:
    """The official results list `[{"question_id", "answer"}]` for `examples`."""
    was = model.training
    model.eval()
    out: list[dict] = []
    bar = tqdm(total=len(examples), desc="vqa predict", disable=not progress, leave=False)
    for chunk in chunks(examples, batch_size):
        idx, _ = model.predict(tokenizer, [get_regions(store, e.image_key) for e in chunk], [e.question for e in chunk])
        out += [{"question_id": e.question_id, "answer": answers[int(i)]} for e, i in zip(chunk, idx[:, 0])]
        bar.update(len(chunk))
    bar.close()
    model.train(was)
    return out


# ---------------------------------------------------------------------------------------------- baselines


def prior_answers(train: Sequence[VQAQuestion]) -> tuple[str, dict[str, str]]:
    """The most frequent training answer overall, and per question type (the "prior" baselines)."""
    overall: Counter[str] = Counter()
    per_type: dict[str, Counter[str]] = {}
    for q in train:
        answers = [normalize_answer(a) for a in q.answers]
        overall.update(answers)
        per_type.setdefault(q.question_type, Counter()).update(answers)

    def best(c: Counter[str]) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] if c else ""

    return best(overall), {t: best(c) for t, c in per_type.items()}


def baseline_results(train: Sequence[VQAQuestion], questions: Sequence[VQAQuestion]) -> dict[str, list[dict]]:
    """Results lists of the two prior baselines on `questions`: "most_frequent" answers every question with
    the most frequent training answer, "per_question_type" with its question type's most frequent one."""
    top, per_type = prior_answers(train)
    return {
        "most_frequent": [{"question_id": q.question_id, "answer": top} for q in questions],
        "per_question_type": [{"question_id": q.question_id, "answer": per_type.get(q.question_type, top)}
                              for q in questions],
    }


# ---------------------------------------------------------------------------------------------- task

# VQA v2 question types whose answer is one attribute of one named object: the curriculum's questions.
ATTRIBUTE_QUESTION_TYPES = ("what color", "what shape", "what size", "what pattern")
# ... and, with `curriculum_yes_no`, the yes/no ones about named objects: checks, relations and existence.
YES_NO_QUESTION_TYPES = ("is the", "is there")


class VQATask(Task):
    name, kind = "vqa", "vqa"

    def train_examples(self, split):
        from minivlm.model import read_lines, write_lines

        run, setup = self.run, self.setup
        self.train_q = self.world.vqa(split)
        if not any(q.answers for q in self.train_q):
            raise MiniVLMError(f"{self.world.vqa_annotations_path(split)}: the training split needs its annotations")
        # The answer set is fixed by the first run: a resumed run must build the very same head.
        path = run.out / "answers.txt"
        self.answers = read_lines(path) if path.is_file() else build_answer_vocab(self.train_q, setup.num_answers)
        if run.rank == 0:
            write_lines(path, self.answers)
        train, missing = make_examples(self.train_q, self.store, self.answers, drop_unanswerable=True)
        self.train = train = train if setup.max_train is None else train[:setup.max_train]
        if not train:
            raise MiniVLMError(f"{setup.features}: none of the {split} VQA images has features in this store")
        run.say(f"{split}: {len(train)} questions, {len(self.answers)} answers"
                + (f" ({missing} skipped: image not in the store)" if missing else ""))
        return train

    def examples(self, split, limit):
        examples, _ = make_examples(self.world.vqa(split), self.store, self.answers)
        return examples if limit is None else examples[:limit]

    def build_model(self, cfg):
        model = VQAModel(cfg, len(self.answers), self.setup.vqa_pool, self.setup.region_null)
        self.run.init(model)
        model.set_answers(self.answers)
        model.init_answer_bias([e.targets for e in self.train])  # after init: a pre-trained head keeps the prior
        return model

    def dataset(self, train):
        return VQADataset(train, self.store)

    def collate(self, cfg):
        return VQACollator(self.run.tokenizer, cfg, len(self.answers))

    def fit(self, model, train, eval_fn):
        run, setup = self.run, self.setup
        out: dict = {"num_answers": len(self.answers)}
        if setup.curriculum_epochs:
            # From random or briefly pre-trained weights the model otherwise settles on the question-type prior
            # and never binds words to regions (DESIGN.md: the VQA curriculum).
            qtype = {q.question_id: q.question_type for q in self.train_q}
            types = ATTRIBUTE_QUESTION_TYPES + (YES_NO_QUESTION_TYPES if setup.curriculum_yes_no else ())
            easy = [e for e in train if qtype[e.question_id].startswith(types)]
            if not easy:
                raise MiniVLMError(f"--curriculum-epochs: no attribute question ({', '.join(types)}...) in "
                                   f"{run.train_split}")
            run.say(f"curriculum: {setup.curriculum_epochs} epoch(s) on the {len(easy)} questions of types "
                    f"{', '.join(types)} first")
            out["curriculum"] = {"n_train": len(easy), "epochs": setup.curriculum_epochs,
                                 "train": run.fit(model, self.dataset(easy), self.collate(model.cfg), None,
                                                  phase="curriculum", epochs=setup.curriculum_epochs)}
        return {**out, **super().fit(model, train, eval_fn)}

    def predict(self, model, examples):
        return predict_vqa(model, self.run.tokenizer, examples, self.store, self.answers, self.setup.eval_batch_size,
                           progress=self.setup.progress)

    def results_file(self, examples, results):
        return [{"question_id": r["question_id"], "answer": r["answer"]} for r in results]

    def score(self, split, examples, results):
        from minivlm.eval.vqa_eval import vqa_accuracy

        kept = {e.question_id for e in examples}
        scored = [q for q in self.world.vqa(split) if q.question_id in kept and q.answers]
        entry: dict = {"n_questions": len(results), "metrics": {}, "baselines": {}}
        if not scored:  # a test split without annotations: answers written, nothing to score
            return entry
        ids = {q.question_id for q in scored}
        acc = vqa_accuracy({r["question_id"]: r["answer"] for r in results if r["question_id"] in ids}, scored)
        entry.update(accuracy=acc["overall"], per_question_type=acc["perQuestionType"],
                     per_answer_type=acc["perAnswerType"])
        entry["metrics"] = {"accuracy": acc["overall"]}
        for name, base in baseline_results(self.train_q, scored).items():
            b = vqa_accuracy(base, scored)
            entry[f"baseline_{name}"] = {"accuracy": b["overall"], "per_question_type": b["perQuestionType"]}
            entry["baselines"][f"baseline_{name}"] = b["overall"]
        return entry

    def quick_eval(self, model, split):
        examples = self.examples(split, self.setup.eval_examples)
        e = self.score(split, examples, self.predict(model, examples))
        return {"vqa_acc": e["accuracy"]} if "accuracy" in e else {}
