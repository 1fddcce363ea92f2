"""`MiniVLM`: one model folder, raw images in, answers out.

    images -> load_image -> TEE-X -> Regions ──┬─> caption transformer   -> captions
                                               ├─> VQA transformer       -> answers
                                               ├─> NLVR2 transformer     -> true / false
                                               └─> retrieval transformer -> image x text scores

Each task is fine-tuned separately from the same pre-trained checkpoint, so each keeps its own
transformer and head; they share the detector, the vocabulary and the tag names.

Model folder (safetensors only: loading never unpickles anything):

    config.json           format, versions, the TEE config, each present task's BertConfig and file
    detector.safetensors  TEE-X weights
    caption.safetensors   one per fine-tuned task: that task's transformer + head
    vqa.safetensors  nlvr2.safetensors  retrieval.safetensors
    vocab.txt             WordPiece vocabulary
    tags.txt              the detector's class names (object tags), one per line
    attributes.txt        the detector's attribute names
    answers.txt           the VQA answer set (when VQA is present)

A fine-tuning output folder (`minivlm finetune --out DIR`) holds config.json (the BertConfig, plus
"minivlm": {"format": "minivlm-task", "task": ...}), model.safetensors, vocab.txt and, for VQA,
answers.txt; `MiniVLM.assemble(detector_folder, {task: folder})` joins such folders with a detector.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from minivlm import __version__
from minivlm.config import BertConfig, PaperCost, TEEConfig, from_dict, to_dict
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.io import atomic_path, load_weights, read_json, save_weights, write_json, write_text
from minivlm.regions import Regions
from minivlm.tasks.data import TASKS, check_region_dim, chunks
from minivlm.text.tokenizer import Tokenizer, get_tokenizer

MODEL_FORMAT = "minivlm-model"
TASK_FORMAT = "minivlm-task"
FORMAT_VERSION = 1
ImageLike = str | Path | Image.Image | Regions


# ---------------------------------------------------------------------------------------------- task models


def build_task_model(task: str, cfg: BertConfig, num_answers: int | None = None,
                     tokenizer: Tokenizer | None = None) -> nn.Module:
    """An untrained task model of the given shape (`tokenizer`: the vocabulary whose special ids the caption
    decoder uses; default BERT uncased)."""
    if task == "vqa":
        from minivlm.tasks.vqa import VQAModel

        if not num_answers:
            raise MiniVLMError("a VQA model needs its answer set (answers.txt)")
        return VQAModel(cfg, num_answers)
    if task == "nlvr2":
        from minivlm.tasks.nlvr2 import NLVR2Model

        return NLVR2Model(cfg)
    if task == "retrieval":
        from minivlm.tasks.retrieval import RetrievalModel

        return RetrievalModel(cfg)
    if task == "caption":
        from minivlm.tasks.caption import CaptionModel
        from minivlm.tasks.decode import SpecialIds

        return CaptionModel(cfg, SpecialIds.from_tokenizer(tokenizer) if tokenizer is not None else None)
    raise MiniVLMError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def load_state_strict(model: nn.Module, path: Path) -> None:
    """safetensors weights that must fit the model exactly; a mismatch names the file and the tensors."""
    state = load_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs config)", wrong))
                 if items]
        raise DataFormatError(path, "weights do not fit the config; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def write_lines(path: Path, lines: Sequence[str]) -> None:
    bad = [s for s in lines if "\n" in s or "\r" in s]
    if bad:
        raise MiniVLMError(f"{path.name}: names cannot contain line breaks ({bad[0]!r})")
    write_text(path, "".join(f"{s}\n" for s in lines))


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataFormatError(path, "not a UTF-8 text file") from None
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


# ---------------------------------------------------------------------------------------------- task folders


def write_task_config(folder: str | Path, task: str, cfg: BertConfig, **extra: Any) -> Path:
    """config.json of a fine-tuning output folder: the BertConfig plus what the task needs to rebuild."""
    path = Path(folder) / "config.json"
    write_json(path, {**to_dict(cfg), "minivlm": {"format": TASK_FORMAT, "task": task, "version": FORMAT_VERSION,
                                                  **extra}}, indent=1)
    return path


@dataclasses.dataclass
class TaskFolder:
    folder: Path
    task: str
    cfg: BertConfig
    weights: Path
    vocab: Path | None
    answers: list[str] | None
    meta: dict


def read_task_folder(folder: str | Path) -> TaskFolder:
    folder = Path(folder)
    path = folder / "config.json"
    data = read_json(path)
    meta = data.get("minivlm") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != TASK_FORMAT or meta.get("task") not in TASKS:
        raise DataFormatError(path, f"not a fine-tuned task folder (\"minivlm\".format must be {TASK_FORMAT!r} and "
                                    f"\"minivlm\".task one of {', '.join(TASKS)}); run `minivlm finetune`")
    cfg = from_dict(BertConfig, data)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise DataFormatError(weights, "weights file not found (did the fine-tuning run finish?)")
    answers = read_lines(folder / "answers.txt") if meta["task"] == "vqa" else None
    vocab = folder / "vocab.txt"
    return TaskFolder(folder, meta["task"], cfg, weights, vocab if vocab.is_file() else None, answers, meta)


def load_task_folder(folder: str | Path, device: str | torch.device = "cpu") -> tuple[TaskFolder, nn.Module]:
    info = read_task_folder(folder)
    tokenizer = Tokenizer(info.vocab) if info.vocab is not None else None
    model = build_task_model(info.task, info.cfg, len(info.answers) if info.answers else None, tokenizer)
    load_state_strict(model, info.weights)
    return info, model.to(device).eval()


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
            check_region_dim(model.cfg, detector.cfg.region_dim, f"{name} transformer vs the detector")
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
        questions = [questions] if isinstance(questions, str) else list(questions)
        regions = _broadcast(self.regions(images), len(questions), "images", "questions")
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
        statements = [statements] if isinstance(statements, str) else list(statements)
        lr = _broadcast(self.regions(left), len(statements), "left images", "statements")
        rr = _broadcast(self.regions(right), len(statements), "right images", "statements")
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

        texts = [texts] if isinstance(texts, str) else list(texts)
        return score_all_pairs(self.task("retrieval"), self.tokenizer, self.regions(images), texts,
                               batch_size=max(64, self.batch_size), progress=False)

    def retrieve(self, images: Sequence[ImageLike], query: str, top_k: int = 5) -> list[tuple[int, float]]:
        """The `top_k` (image index, score) best matching the text query, best first."""
        scores = self.rank(images, [query])[:, 0]
        best = torch.argsort(scores, descending=True)[:top_k]
        return [(int(i), float(scores[i])) for i in best]

    # -- folders -------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        det = self.detector
        tee = dataclasses.replace(det.cfg, pretrained_backbone=None)
        save_weights(det.state_dict(), folder / "detector.safetensors", metadata={"format": "minivlm-tee"})
        tasks = {}
        for name, model in self.tasks.items():
            save_weights(model.state_dict(), folder / f"{name}.safetensors", metadata={"format": f"minivlm-{name}"})
            tasks[name] = {"weights": f"{name}.safetensors", "bert": to_dict(model.cfg)}
            if name == "vqa":
                tasks[name]["num_answers"] = model.num_answers
        with atomic_path(folder / "vocab.txt") as tmp:
            shutil.copyfile(self.tokenizer.vocab_path, tmp)
        write_lines(folder / "tags.txt", det.class_names)
        write_lines(folder / "attributes.txt", det.attribute_names)
        if "vqa" in self.tasks:
            write_lines(folder / "answers.txt", self.answers)
        write_json(folder / "config.json", {
            "format": MODEL_FORMAT, "version": FORMAT_VERSION,
            "versions": {"minivlm": __version__, "torch": torch.__version__},
            "detector": {"weights": "detector.safetensors", "config": to_dict(tee),
                         "num_classes": len(det.class_names), "num_attributes": len(det.attribute_names)},
            "tasks": tasks,
            "files": {"vocab": "vocab.txt", "tags": "tags.txt", "attributes": "attributes.txt",
                      **({"answers": "answers.txt"} if "vqa" in self.tasks else {})},
        }, indent=1)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "MiniVLM":
        from minivlm.vision.tee import TEE

        folder = Path(folder)
        if not folder.is_dir():
            raise DataFormatError(folder, "model folder not found")
        path = folder / "config.json"
        config = read_json(path)
        if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
            raise DataFormatError(path, f"not a MiniVLM model folder (\"format\" must be {MODEL_FORMAT!r})")
        if int(config.get("version", 0)) > FORMAT_VERSION:
            raise DataFormatError(path, f"version {config['version']} is newer than this minivlm reads ({FORMAT_VERSION})")
        det_meta, tasks_meta, files = (_field(path, config, k, dict) for k in ("detector", "tasks", "files"))
        for key in ("vocab", "tags", "attributes") + (("answers",) if "vqa" in tasks_meta else ()):
            if key not in files:
                raise DataFormatError(path, f"files.{key}: missing")
        needed = [folder / files[k] for k in files] + [folder / _field(path, det_meta, "weights", str, "detector")]
        needed += [folder / _field(path, m, "weights", str, f"tasks.{t}") for t, m in tasks_meta.items()]
        for p in needed:  # every file first, so a broken folder fails before any weight is read
            if not p.is_file():
                raise DataFormatError(p, f"missing from the model folder {folder} (listed in config.json)")

        tee_dict = _field(path, det_meta, "config", dict, "detector")
        tee = from_dict(TEEConfig, {k: v for k, v in tee_dict.items() if k != "paper"})
        tee.paper, tee.pretrained_backbone = from_dict(PaperCost, tee_dict.get("paper") or {}), None
        names, attrs = read_lines(folder / files["tags"]), read_lines(folder / files["attributes"])
        for what, got, n in (("tags", names, tee.num_classes), ("attributes", attrs, tee.num_attributes)):
            if len(got) != n:
                raise DataFormatError(folder / files[what], f"{len(got)} names for a detector with {n}")
        detector = TEE(tee, names, attrs)
        load_state_strict(detector, folder / det_meta["weights"])

        answers = read_lines(folder / files["answers"]) if "vqa" in tasks_meta else []
        tokenizer = Tokenizer(folder / files["vocab"])
        tasks: dict[str, nn.Module] = {}
        for name, meta in tasks_meta.items():
            if name not in TASKS:
                raise DataFormatError(path, f"tasks.{name}: unknown task (expected one of {', '.join(TASKS)})")
            cfg = from_dict(BertConfig, _field(path, meta, "bert", dict, f"tasks.{name}"))
            check_region_dim(cfg, tee.region_dim, f"{path}: tasks.{name} vs the detector")
            model = build_task_model(name, cfg, len(answers) if name == "vqa" else None, tokenizer)
            load_state_strict(model, folder / meta["weights"])
            tasks[name] = model
        return cls(detector, tasks, tokenizer, answers).to(device).eval()

    @classmethod
    def assemble(cls, detector_folder: str | Path, task_folders: dict[str, str | Path],
                 device: str | torch.device = "cpu") -> "MiniVLM":
        """One model from a `train-detector` output folder and `finetune` output folders ({task: folder})."""
        from minivlm.vision.tee import load_detector

        detector = load_detector(detector_folder, device)
        tasks: dict[str, nn.Module] = {}
        answers: list[str] = []
        vocab: Path | None = None
        for task, folder in task_folders.items():
            info = read_task_folder(folder)
            if info.task != task:
                raise MiniVLMError(f"{folder}: holds a fine-tuned {info.task} model, given as {task}")
            check_region_dim(info.cfg, detector.cfg.region_dim, f"{folder} ({task}) vs the detector {detector_folder}")
            _, model = load_task_folder(folder, device)
            tasks[task] = model
            answers = info.answers or answers
            if info.vocab is not None:
                if vocab is not None and info.vocab.read_bytes() != vocab.read_bytes():
                    raise MiniVLMError(f"{info.vocab} differs from {vocab}: the tasks were trained with "
                                       "different vocabularies")
                vocab = info.vocab
        tokenizer = Tokenizer(vocab) if vocab is not None else get_tokenizer()
        return cls(detector, tasks, tokenizer, answers).to(device).eval()


def _field(path: Path, obj: dict, key: str, kind: type, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise DataFormatError(path, f"{name}: missing")
    if not isinstance(obj[key], kind):
        raise DataFormatError(path, f"{name}: expected {'an object' if kind is dict else 'a string'}")
    return obj[key]


def _as_list(images: Any) -> list:
    return [images] if isinstance(images, (str, Path, Image.Image, Regions)) else list(images)


def _broadcast(items: list, n: int, what: str, per: str) -> list:
    if len(items) == n:
        return items
    if len(items) == 1:
        return items * n
    raise MiniVLMError(f"{len(items)} {what} for {n} {per}: give one, or one per {per[:-1]}")
