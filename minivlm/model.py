"""`MiniVLM`: one model folder, raw images in, answers out.

    images -> load_image -> TEE-X -> Regions ──┬─> caption transformer   -> captions
                                               ├─> VQA transformer       -> answers
                                               ├─> NLVR2 transformer     -> true / false
                                               └─> retrieval transformer -> image x text scores

Each task is fine-tuned separately from the same pre-trained checkpoint, so each keeps its own
transformer and head; they share the detector, the vocabulary and the tag names.

The model folder is a "model" checkpoint (`minivlm.checkpoint`; safetensors only, loading never unpickles):
config.json {"kind": "model", "version", "config": {"detector": ..., "tasks": {name: ...}}}, one
model.safetensors with the detector ("detector.*") and each task part ("tasks.<name>.*"), vocab.txt and,
with VQA, answers.txt. `MiniVLM.assemble(detector_folder, {task: folder})` joins a "detector" checkpoint
(`minivlm train-detector`) with "task" checkpoints (`minivlm finetune --out DIR`).

`minivlm export MODEL` adds MODEL/onnx/ (ONNX graphs + a manifest of the weights they came from);
`MiniVLM.from_pretrained` then returns the ONNX Runtime model (`minivlm.edge.EdgeMiniVLM`, the same calls)
as long as the graphs are fresh (`minivlm.backend`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image
from torch import nn

from minivlm import checkpoint
from minivlm.checkpoint import DetectorSpec, TaskSpec, load_state_strict
from minivlm.batching import broadcast, chunks
from minivlm.config import BertConfig
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.io import read_lines, write_lines  # noqa: F401  (re-exported: finetune and export use them)
from minivlm.regions import Regions
from minivlm.tasks.data import TASKS, check_region_dim
from minivlm.text.checks import user_texts
from minivlm.text.tokenizer import Tokenizer, get_tokenizer

if TYPE_CHECKING:
    from minivlm.edge import EdgeMiniVLM

ImageLike = str | Path | Image.Image | Regions


# ---------------------------------------------------------------------------------------------- task models


def build_task_model(task: str, cfg: BertConfig, num_answers: int | None = None,
                     tokenizer: Tokenizer | None = None, extra: dict | None = None) -> nn.Module:
    """An untrained task model of the given shape (`tokenizer`: the vocabulary whose special ids the caption
    decoder uses; default BERT uncased; `extra`: the task settings of its folder, e.g. VQA's pooling)."""
    if task == "vqa":
        from minivlm.tasks.vqa import VQAModel

        if not num_answers:
            raise MiniVLMError("a VQA model needs its answer set (answers.txt)")
        return VQAModel(cfg, num_answers, (extra or {}).get("pool", "cls"), bool((extra or {}).get("null_region")))
    if task == "nlvr2":
        from minivlm.tasks.nlvr2 import NLVR2Model

        return NLVR2Model(cfg, (extra or {}).get("pool", "cls"), bool((extra or {}).get("null_region")))
    if task == "retrieval":
        from minivlm.tasks.retrieval import RetrievalModel

        return RetrievalModel(cfg)
    if task == "caption":
        from minivlm.tasks.caption_model import CaptionModel
        from minivlm.tasks.decode import SpecialIds

        return CaptionModel(cfg, SpecialIds.from_tokenizer(tokenizer) if tokenizer is not None else None)
    raise MiniVLMError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------- task folders


def write_task_config(folder: str | Path, task: str, cfg: BertConfig, state: dict[str, torch.Tensor] | None = None,
                      **extra: Any) -> Path:
    """The "task" checkpoint of a fine-tuning output folder; `state` None: the Trainer writes the weights
    (vocab.txt and, for VQA, answers.txt are the run's own files in the folder)."""
    return checkpoint.write(folder, "task", TaskSpec(task, cfg, extra).to_json(), state)


def head_settings(task: str, model: nn.Module) -> dict[str, Any]:
    """What `build_task_model` needs beside the transformer's config to rebuild this task's head."""
    if task not in ("vqa", "nlvr2"):
        return {}
    settings = {"pool": model.pool, "null_region": model.null_region}
    return {"num_answers": model.num_answers, **settings} if task == "vqa" else settings


def load_task_folder(folder: str | Path, device: str | torch.device = "cpu") -> tuple[checkpoint.Checkpoint, nn.Module]:
    ckpt = checkpoint.read(folder, "task")
    spec = ckpt.task_spec()
    tokenizer = Tokenizer(ckpt.vocab) if ckpt.vocab is not None else None
    model = build_task_model(spec.task, spec.bert, len(ckpt.answers()) if spec.task == "vqa" else None, tokenizer,
                             spec.extra)
    load_state_strict(model, ckpt.weights)
    return ckpt, model.to(device).eval()


# ---------------------------------------------------------------------------------------------- the model


class MiniVLM(nn.Module):
    """TEE-X plus one fine-tuned transformer per task. Images may be paths, PIL images or `Regions`
    already extracted (then the detector is skipped)."""

    def __init__(self, detector: nn.Module, tasks: dict[str, nn.Module], tokenizer: Tokenizer | None = None,
                 answers: Sequence[str] | None = None, batch_size: int = 16):
        super().__init__()
        self.detector = detector
        self.tasks = nn.ModuleDict(tasks)
        self.tokenizer = tokenizer or get_tokenizer()
        self.answers = list(answers or [])
        self.batch_size = batch_size
        for name, model in self.tasks.items():
            if name not in TASKS:
                raise MiniVLMError(f"unknown task {name!r}; choose among {', '.join(TASKS)}")
            check_region_dim(model.cfg, detector.cfg.feature_dim, f"{name} transformer vs the detector")
        if "vqa" in self.tasks and len(self.answers) != self.tasks["vqa"].num_answers:
            raise MiniVLMError(f"{len(self.answers)} answers for a VQA head of {self.tasks['vqa'].num_answers}")

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    def task(self, name: str) -> nn.Module:
        if name not in self.tasks:
            present = ", ".join(self.tasks) or "none"
            raise MiniVLMError(f"this model has no {name} transformer (tasks present: {present}); fine-tune it with "
                               f"`minivlm finetune --task {name}` and assemble the model again")
        return self.tasks[name]

    # -- images -> regions -------------------------------------------------------------------------

    @torch.no_grad()
    def regions(self, images: Sequence[ImageLike] | ImageLike) -> list[Regions]:
        """Runs TEE-X over the images (paths or PIL images; `Regions` pass through)."""
        from minivlm.data.images import load_image

        images = _as_list(images)
        out: list[Regions | None] = [im if isinstance(im, Regions) else None for im in images]
        todo = [i for i, r in enumerate(out) if r is None]
        pil = [load_image(images[i]) for i in todo]  # every image is checked before any work is done
        self.detector.eval()
        for idx, batch in zip(chunks(todo, self.batch_size), chunks(pil, self.batch_size)):
            for i, r in zip(idx, self.detector.extract(list(batch), batch_size=self.batch_size)):
                out[i] = r
        return out  # type: ignore[return-value]

    # -- tasks ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def caption(self, images: Sequence[ImageLike] | ImageLike, beam_size: int = 1, **kwargs: Any) -> list[str]:
        model = self.task("caption")
        regions = self.regions(images)
        out: list[str] = []
        for batch in chunks(regions, self.batch_size):
            out += list(model.caption(self.tokenizer, list(batch), beam_size=beam_size, **kwargs))
        return out

    @torch.no_grad()
    def answer_scores(self, images: Sequence[ImageLike] | ImageLike, questions: Sequence[str] | str,
                      top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The `top_k` answers (with sigmoid confidences) of each question; one image per question, or one
        image for all the questions."""
        model = self.task("vqa")
        questions = user_texts(questions, "question", self.tokenizer, model.cfg.max_text_len)
        regions = broadcast(self.regions(images), len(questions), "images", "questions")
        out: list[list[tuple[str, float]]] = []
        for r, q in zip(chunks(regions, self.batch_size), chunks(questions, self.batch_size)):
            idx, conf = model.predict(self.tokenizer, list(r), list(q), top_k)
            out += [[(self.answers[int(i)], float(c)) for i, c in zip(ii, cc)] for ii, cc in zip(idx, conf)]
        return out

    def answer(self, images: Sequence[ImageLike] | ImageLike, questions: Sequence[str] | str) -> list[str]:
        return [s[0][0] for s in self.answer_scores(images, questions, top_k=1)]

    @torch.no_grad()
    def verify_proba(self, left: Sequence[ImageLike] | ImageLike, right: Sequence[ImageLike] | ImageLike,
                     statements: Sequence[str] | str) -> list[float]:
        """P(statement is true of the pair (left[i], right[i]))."""
        model = self.task("nlvr2")
        statements = user_texts(statements, "statement", self.tokenizer, model.cfg.max_text_len)
        lr = broadcast(self.regions(left), len(statements), "left images", "statements")
        rr = broadcast(self.regions(right), len(statements), "right images", "statements")
        out: list[float] = []
        for a, b, s in zip(chunks(lr, self.batch_size), chunks(rr, self.batch_size), chunks(statements, self.batch_size)):
            out += [float(p) for p in model.predict(self.tokenizer, list(a), list(b), list(s))]
        return out

    def verify(self, left: Sequence[ImageLike] | ImageLike, right: Sequence[ImageLike] | ImageLike,
               statements: Sequence[str] | str) -> list[bool]:
        return [p > 0.5 for p in self.verify_proba(left, right, statements)]

    @torch.no_grad()
    def rank(self, images: Sequence[ImageLike] | ImageLike, texts: Sequence[str] | str) -> torch.Tensor:
        """[n_images, n_texts] matching scores (log-odds that text t describes image i)."""
        from minivlm.tasks.retrieval import score_all_pairs

        model = self.task("retrieval")
        texts = user_texts(texts, "text", self.tokenizer, model.cfg.max_text_len, allow_empty=True)
        return score_all_pairs(model, self.tokenizer, self.regions(images), texts,
                               batch_size=max(64, self.batch_size), progress=False)

    def retrieve(self, images: Sequence[ImageLike], query: str, top_k: int = 5) -> list[tuple[int, float]]:
        """The `top_k` (image index, score) best matching the text query, best first."""
        scores = self.rank(images, user_texts(query, "query"))[:, 0]
        best = torch.argsort(scores, descending=True)[:top_k]
        return [(int(i), float(scores[i])) for i in best]

    # -- folders -------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """A "model" checkpoint: the detector and every task part in one model.safetensors."""
        det = self.detector
        tasks = {name: TaskSpec(name, model.cfg, head_settings(name, model)) for name, model in self.tasks.items()}
        config = {"detector": DetectorSpec(det.cfg, det.class_names, det.attribute_names).to_json(),
                  "tasks": {name: spec.to_json() for name, spec in tasks.items()}}
        return checkpoint.write(folder, "model", config, self.state_dict(), vocab=self.tokenizer.vocab_path,
                                answers=self.answers if "vqa" in self.tasks else None)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", backend: str = "auto",
                        int8: bool = False, threads: int | None = None, bf16: bool = False, int4: bool = False
                        ) -> "MiniVLM | EdgeMiniVLM":
        """The model folder on PyTorch, or on ONNX Runtime (`minivlm.edge.EdgeMiniVLM`, the same calls) when
        `minivlm export` wrote fresh graphs into FOLDER/onnx: backend "auto" picks, "torch" / "onnx" force
        one (`minivlm.backend`). `int8`, `int4`, `bf16` and `threads` apply to the exported graphs."""
        if backend != "torch" or int8 or bf16 or int4:
            from minivlm.backend import load

            return load(folder, backend, str(device), int8, threads, bf16, int4)
        from minivlm.vision.tee import TEE

        ckpt = checkpoint.read(folder, "model")
        det, specs = ckpt.detector_spec(), ckpt.task_specs()
        if ckpt.vocab is None:
            raise DataFormatError(ckpt.folder / checkpoint.VOCAB, "missing from the model folder")
        answers = ckpt.answers() if "vqa" in specs else []
        tokenizer = Tokenizer(ckpt.vocab)
        tasks: dict[str, nn.Module] = {}
        for name, spec in specs.items():
            check_region_dim(spec.bert, det.tee.feature_dim, f"{ckpt.config_path}: tasks.{name} vs the detector")
            tasks[name] = build_task_model(name, spec.bert, len(answers) if name == "vqa" else None, tokenizer,
                                           spec.extra)
        model = cls(TEE(det.tee, det.class_names, det.attribute_names), tasks, tokenizer, answers)
        load_state_strict(model, ckpt.weights)
        model.detector.to(memory_format=torch.channels_last)  # as `load_detector` (and `assemble`) gives it: faster
        return model.to(device).eval()

    @classmethod
    def assemble(cls, detector_folder: str | Path, task_folders: dict[str, str | Path],
                 device: str | torch.device = "cpu") -> "MiniVLM":
        """One model from a "detector" checkpoint and "task" checkpoints ({task: folder})."""
        from minivlm.vision.tee import load_detector

        detector = load_detector(detector_folder, device)
        tasks: dict[str, nn.Module] = {}
        answers: list[str] = []
        vocab: Path | None = None
        for task, folder in task_folders.items():
            spec = checkpoint.read(folder, "task").task_spec()
            if spec.task != task:
                raise MiniVLMError(f"{folder}: holds a fine-tuned {spec.task} model, given as {task}")
            check_region_dim(spec.bert, detector.cfg.feature_dim, f"{folder} ({task}) vs the detector {detector_folder}")
            ckpt, model = load_task_folder(folder, device)
            tasks[task] = model
            answers = ckpt.answers() if task == "vqa" else answers
            if ckpt.vocab is not None:
                if vocab is not None and ckpt.vocab.read_bytes() != vocab.read_bytes():
                    raise MiniVLMError(f"{ckpt.vocab} differs from {vocab}: the tasks were trained with "
                                       "different vocabularies")
                vocab = ckpt.vocab
        tokenizer = Tokenizer(vocab) if vocab is not None else get_tokenizer()
        return cls(detector, tasks, tokenizer, answers).to(device).eval()


def _as_list(images: Any) -> list:
    return [images] if isinstance(images, (str, Path, Image.Image, Regions)) else list(images)
