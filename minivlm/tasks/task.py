"""The Task protocol: what the one fine-tuning driver (`minivlm.tasks.finetune.finetune`) asks of a task.

A task is built on a `Run` (the setup, the dataset root `world`, the region source `store`, the tokenizer and
the output folder) and keeps what it learns from the training split (VQA's answer set, the most common
caption) for scoring. Each implementation lives in its task's module; `minivlm.tasks.registry.TASKS` names them.
A task names the kind of data it reads (`kind`); the World chooses the splits of that kind, by its one rule.

`score` returns one shape for every task, per split: the task's own detail (official metric layouts) plus
    {"metrics": {name: value}, "baselines": {name: value}}
which metrics.json and the demo report read as `{task}_{name}`, so a new baseline reaches them unasked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from torch import nn

from minivlm.config import BertConfig


class Task(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]  # the World's kind of split the task reads (`minivlm.data.world.SPLIT_FILES`)

    def __init__(self, run):
        self.run, self.setup, self.world, self.store = run, run.setup, run.world, run.store

    def eval_splits(self) -> list[str]:
        """The held-out splits evaluated by default."""
        return self.world.eval_splits(self.kind)

    @abstractmethod
    def train_examples(self, split: str) -> list:
        """The training examples found in the region source (capped by --max-train); refuses none."""

    @abstractmethod
    def examples(self, split: str, limit: int | None) -> Any:
        """Evaluation examples of `split` found in the region source; empty: the split is skipped."""

    @abstractmethod
    def build_model(self, cfg: BertConfig) -> nn.Module:
        """The task model, initialised from `setup.pretrained`."""

    def folder_extra(self) -> dict:
        """Task fields of the folder's config.json beside the head's settings (`model.head_settings`, which
        `finetune` reads from the built model)."""
        return {}

    @abstractmethod
    def dataset(self, train: list) -> Any:
        ...

    @abstractmethod
    def collate(self, cfg: BertConfig) -> Callable:
        ...

    def fit(self, model: nn.Module, train: list, eval_fn: Callable | None) -> dict:
        """Trains `model`; returns the metrics.json fields of training."""
        return {"train": self.run.fit(model, self.dataset(train), self.collate(model.cfg), eval_fn)}

    @abstractmethod
    def predict(self, model: nn.Module, examples: Any) -> Any:
        ...

    def results_file(self, examples: Any, results: Any) -> Any:
        """results_{split}.json in the task's official format."""
        return results

    @abstractmethod
    def score(self, split: str, examples: Any, results: Any) -> dict:
        """{"metrics": {...}, "baselines": {...}, **detail} of one split."""

    def quick_eval(self, model: nn.Module, split: str) -> dict:
        """The periodic check during training (the log's held-out numbers)."""
        return {}


MEMBERS = ("name", "kind", "eval_splits", "train_examples", "examples", "build_model", "folder_extra", "dataset",
           "collate", "fit", "predict", "results_file", "score", "quick_eval")
