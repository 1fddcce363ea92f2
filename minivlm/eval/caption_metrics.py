"""Caption metrics as the COCO caption server computes them, plus a fast CIDEr-D for SCST rewards.

`score_captions` follows pycocoevalcap's `COCOEvalCap`: captions and references are tokenised by the
Stanford PTB tokenizer (java, lower-cased, punctuation tokens dropped), then BLEU-1..4, METEOR, ROUGE-L,
CIDEr and SPICE are computed by pycocoevalcap's scorers on the images that have a result. pycocoevalcap's
"CIDEr" is CIDEr-D (clipped n-gram counts, Gaussian length penalty, x10).

The java tools are run here rather than through pycocoevalcap's wrappers so that they can be guarded:
a missing `java`, a crash or a hang becomes a clear error (or, for METEOR and SPICE, a null metric with the
reason) instead of a stuck process. They use pycocoevalcap's own jars and the same command lines.

SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use; nothing can be downloaded
here, so SPICE runs only when those jars are already in place and is otherwise reported as unavailable
(`None`, never a made-up number) with the reason.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np
import pycocoevalcap
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.eval.results import rows_to_dict
from minivlm.io import read_json

# pycocoevalcap is a namespace package (no __init__.py): its folder comes from __path__, not __file__.
PYCOCOEVALCAP_DIR = Path(list(pycocoevalcap.__path__)[0])
PTB_JAR = PYCOCOEVALCAP_DIR / "tokenizer" / "stanford-corenlp-3.4.1.jar"
METEOR_DIR = PYCOCOEVALCAP_DIR / "meteor"
METEOR_JAR = "meteor-1.5.jar"
SPICE_DIR = PYCOCOEVALCAP_DIR / "spice"
SPICE_JAR = "spice-1.0.jar"
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_CORENLP_ZIP = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_PUNCT = frozenset(PUNCTUATIONS)
# The JVM's default charset depends on the locale; UTF-8 keeps non-ASCII captions intact both ways.
_JVM_UTF8 = "-Dfile.encoding=UTF-8"


class JavaError(MiniVLMError):
    """`java` is missing, or a java tool (PTB tokenizer, METEOR, SPICE) failed or did not finish."""


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaError("`java` is not on PATH; the PTB tokenizer, METEOR and SPICE need a Java runtime "
                        "(8 or newer), e.g. `apt-get install default-jre-headless`")
    return java


def _run_java(args: list[str], stdin: str, cwd: Path, timeout: float, what: str) -> str:
    try:
        proc = subprocess.run([_java(), _JVM_UTF8, *args], input=stdin.encode("utf-8"), cwd=cwd,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise JavaError(f"{what} did not finish within {timeout:.0f} s (java hung?)") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise JavaError(f"{what} failed (java exit code {proc.returncode}): {tail}")
    return proc.stdout.decode("utf-8", "replace")


# ---------------------------------------------------------------- tokenisation

def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]], timeout: float = 600.0) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTBTokenizer in one java call: lower-cased PTB tokens, punctuation tokens removed,
    joined by single spaces. Keys and the order of captions are kept."""
    keys: list[Hashable] = []
    lines: list[str] = []
    for key, caps in captions.items():
        for cap in caps:
            keys.append(key)
            # One caption per line: any whitespace the JVM could read as a line break becomes a space.
            lines.append(" ".join(cap.split()))
    # A sentinel last line proves the output lines up with the input even when captions are empty.
    sentinel = "zzminivlmendzz"
    out = _run_java(["-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                     "-lowerCase", "-encoding", "utf-8"], "\n".join(lines + [sentinel]) + "\n",
                    PTB_JAR.parent, timeout, "PTB tokenizer")
    out_lines = out.rstrip("\n").split("\n")
    if len(out_lines) != len(lines) + 1 or out_lines[-1].strip() != sentinel:
        raise JavaError(f"PTB tokenizer returned {len(out_lines) - 1} lines for {len(lines)} captions")
    result: dict[Hashable, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, out_lines):
        result[key].append(" ".join(w for w in line.split() if w not in _PUNCT))
    return result


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def simple_tokenize(text: str) -> str:
    """Lower-case words and numbers (keeping a trailing 's / 't), punctuation dropped: a java-free stand-in
    for the PTB tokenizer where speed matters (SCST rewards, quick validation)."""
    return " ".join(_WORD.findall(text.lower()))


# ---------------------------------------------------------------- METEOR and SPICE (java)

def meteor_score(gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]],
                 timeout: float = 600.0) -> tuple[float, list[float]]:
    """METEOR 1.5 over tokenised captions, speaking the same stdio protocol as pycocoevalcap's Meteor:
    one SCORE line per image returns its statistics, one EVAL line over all of them returns the per-image
    scores and the corpus score. A watchdog kills java after `timeout` seconds so a hang becomes an error."""
    ids = list(res)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([_java(), _JVM_UTF8, "-jar", "-Xmx2G", METEOR_JAR, "-", "-", "-stdio", "-l", "en",
                                 "-norm"], cwd=METEOR_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()

        def send(line: str) -> None:
            assert proc.stdin is not None
            proc.stdin.write((line + "\n").encode("utf-8"))
            proc.stdin.flush()

        def receive() -> str:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise EOFError
            return line.decode("utf-8").strip()

        try:
            stats = []
            for i in ids:
                hyp = res[i][0].replace("|||", "").replace("  ", " ")
                send(" ||| ".join(["SCORE", *gts[i], hyp]))
                stats.append(receive())
            send(" ||| ".join(["EVAL", *stats]))
            scores = [float(receive()) for _ in ids]
            total = float(receive())
        except (EOFError, OSError, ValueError) as e:
            if timed_out.is_set():
                raise JavaError(f"METEOR did not finish within {timeout:.0f} s (java hung?)") from None
            proc.kill()
            proc.wait()
            err.seek(0)
            tail = err.read().decode("utf-8", "replace").strip()[-2000:]
            raise JavaError(f"METEOR (java) failed: {tail or type(e).__name__ + ': ' + str(e)}") from None
        finally:
            watchdog.cancel()
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            proc.kill()
            proc.wait()
    return total, scores


def spice_unavailable_reason(spice_dir: str | Path = SPICE_DIR) -> str | None:
    """None when SPICE can run; otherwise why not and how to enable it."""
    spice_dir = Path(spice_dir)
    if not (spice_dir / SPICE_JAR).is_file():
        return f"{spice_dir / SPICE_JAR} not found (pycocoevalcap's SPICE jar)"
    lib = spice_dir / "lib"
    missing = [name for name in SPICE_CORENLP_JARS if not (lib / name).is_file()]
    if missing:
        return (f"Stanford CoreNLP 3.6.0 jars missing from {lib}: {', '.join(missing)}. To enable SPICE, take "
                f"{' and '.join(SPICE_CORENLP_JARS)} from stanford-corenlp-full-2015-12-09.zip "
                f"({SPICE_CORENLP_ZIP}) and put them in {lib}/")
    if shutil.which("java") is None:
        return "`java` is not on PATH"
    return None


def spice_score(gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]],
                spice_dir: str | Path = SPICE_DIR, timeout: float = 1800.0) -> tuple[float, list[float]]:
    """SPICE F-score, as pycocoevalcap's Spice runs it (same jar and flags, without the parse cache, whose
    LMDB binding is the part that breaks on newer JVMs)."""
    reason = spice_unavailable_reason(spice_dir)
    if reason is not None:
        raise JavaError(f"SPICE unavailable: {reason}")
    ids = list(res)
    with tempfile.TemporaryDirectory(prefix="minivlm-spice-") as tmp:
        in_file, out_file = Path(tmp) / "in.json", Path(tmp) / "out.json"
        in_file.write_text(json.dumps([{"image_id": str(i), "test": res[i][0], "refs": gts[i]} for i in ids]))
        _run_java(["-jar", "-Xmx8G", SPICE_JAR, str(in_file), "-out", str(out_file), "-subset", "-silent"], "",
                  Path(spice_dir), timeout, "SPICE")
        by_id = {item["image_id"]: item["scores"]["All"]["f"] for item in json.loads(out_file.read_text())}
    scores = [float(by_id[str(i)]) if by_id.get(str(i)) is not None else math.nan for i in ids]
    return float(np.nanmean(scores)) if scores else math.nan, scores


# ---------------------------------------------------------------- the COCO caption metrics

def _as_result_dict(results: Sequence[Mapping[str, Any]] | Mapping[Hashable, str]) -> dict[Hashable, str]:
    out = rows_to_dict(results, "image_id", "caption")
    for iid, cap in out.items():
        if not isinstance(cap, str):
            raise ValueError(f"image_id {iid!r}: caption must be a string, got {type(cap).__name__}")
    return out


def score_captions(results: Sequence[Mapping[str, Any]] | Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]], *, tokenizer: str = "ptb",
                   meteor: bool = True, spice: bool = True, spice_dir: str | Path = SPICE_DIR,
                   timeout: float = 600.0) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE of `results` ([{"image_id", "caption"}] or
    {image_id: caption}) against `references` ({image_id: [captions]}), on the images with a result, as
    pycocoevalcap reports them (0..1; the paper's tables are x100).

    tokenizer: "ptb" (the official java tokenizer) or "simple" (no java, for quick checks).
    A metric that cannot be computed is None, with the reason under "<metric>_unavailable"."""
    res_raw = _as_result_dict(results)
    if not res_raw:
        raise ValueError("no results to score")
    missing = [iid for iid in res_raw if iid not in references or not references[iid]]
    if missing:
        raise ValueError(f"{len(missing)} result image id(s) have no reference captions, e.g. {missing[0]!r}")
    ids = list(res_raw)
    if tokenizer == "ptb":
        # One java call for both sides; keys are tagged so results and references cannot collide.
        tok = ptb_tokenize({**{("res", i): [res_raw[i]] for i in ids},
                            **{("gts", i): list(references[i]) for i in ids}}, timeout=timeout)
        res = {i: tok[("res", i)] for i in ids}
        gts = {i: tok[("gts", i)] for i in ids}
    elif tokenizer == "simple":
        res = {i: [simple_tokenize(res_raw[i])] for i in ids}
        gts = {i: [simple_tokenize(c) for c in references[i]] for i in ids}
    else:
        raise ValueError(f"tokenizer must be 'ptb' or 'simple', got {tokenizer!r}")

    out: dict[str, Any] = {"n_images": len(ids)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor:
        try:
            out["METEOR"] = float(meteor_score(gts, res, timeout=timeout)[0])
        except JavaError as err:
            out["METEOR"], out["METEOR_unavailable"] = None, str(err)
    else:
        out["METEOR"], out["METEOR_unavailable"] = None, "not requested"
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    reason = spice_unavailable_reason(spice_dir) if spice else "not requested"
    if reason is None:
        try:
            out["SPICE"] = float(spice_score(gts, res, spice_dir=spice_dir, timeout=3 * timeout)[0])
        except JavaError as err:
            out["SPICE"], out["SPICE_unavailable"] = None, str(err)
    else:
        out["SPICE"], out["SPICE_unavailable"] = None, reason
    return out


def read_caption_references(path: str | Path) -> dict[int, list[str]]:
    """{image_id: [captions]} from a COCO captions file (`captions_val2014.json`) or a Karpathy split file
    (`dataset_coco.json`, keyed by COCO id)."""
    from minivlm.data.readers import read_coco_captions, read_karpathy

    obj = read_json(path)
    if isinstance(obj, dict) and "annotations" in obj:
        return {iid: caps for iid, caps in read_coco_captions(path).captions.items() if caps}
    if isinstance(obj, dict) and "images" in obj:
        return {img.image_id: list(img.sentences) for img in read_karpathy(path) if img.sentences}
    raise DataFormatError(path, "expected COCO captions (\"annotations\": [{\"image_id\", \"caption\"}]) or a "
                                "Karpathy split file (\"images\": [{\"sentences\": [{\"raw\"}]}])")


def read_caption_results(path: str | Path) -> dict[Hashable, str]:
    """A results file as the COCO server takes it: [{"image_id", "caption"}, ...]."""
    obj = read_json(path)
    if not isinstance(obj, list):
        raise DataFormatError(path, f"expected a JSON list of {{\"image_id\", \"caption\"}}, got {type(obj).__name__}")
    out: dict[Hashable, str] = {}
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataFormatError(path, f"[{i}]: expected an object with \"image_id\" and \"caption\"")
        for key in ("image_id", "caption"):
            if key not in r:
                raise DataFormatError(path, f"[{i}].{key}: missing")
        if not isinstance(r["caption"], str):
            raise DataFormatError(path, f"[{i}].caption: expected a string, got {type(r['caption']).__name__}")
        if not isinstance(r["image_id"], (int, str)) or isinstance(r["image_id"], bool):
            raise DataFormatError(path, f"[{i}].image_id: expected an integer or string id")
        if r["image_id"] in out:
            raise DataFormatError(path, f"[{i}].image_id: {r['image_id']!r} appears twice (one caption per image)")
        out[r["image_id"]] = r["caption"]
    return out


def evaluate_caption_file(results_json: str | Path, captions_json: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Scores a results file against a COCO captions (or Karpathy) file; keyword arguments go to
    `score_captions`."""
    res = read_caption_results(results_json)
    refs = read_caption_references(captions_json)
    missing = [iid for iid in res if iid not in refs]
    if missing:
        raise DataFormatError(results_json, f"{len(missing)} image_id(s) have no captions in {captions_json}, "
                                            f"e.g. {missing[0]!r}")
    if not res:
        raise DataFormatError(results_json, "no results")
    return score_captions(res, refs, **kwargs)


# ---------------------------------------------------------------- CIDEr-D for SCST

class CiderD:
    """CIDEr-D with document frequencies from a fixed reference corpus, computed once.

    The math is pycocoevalcap's CiderScorer (n = 1..4, sigma = 6, clipped counts, x10); the difference is
    where the idf comes from: the whole reference corpus given here rather than the images of one call, as
    SCST needs (rewards must not depend on which images share a batch). With candidates for every reference
    image, the scores equal pycocoevalcap's Cider. Tokenisation is `simple_tokenize` (no java per step).
    """

    def __init__(self, refs: Mapping[Hashable, Sequence[str]], n: int = 4, sigma: float = 6.0,
                 tokenize: bool = True):
        self.n, self.sigma, self._tokenize = n, sigma, tokenize
        self._crefs = {iid: [precook(self._tok(r), n) for r in caps] for iid, caps in refs.items()}
        empty = [iid for iid, caps in self._crefs.items() if not caps]
        if empty:
            raise ValueError(f"image {empty[0]!r} has no reference captions")
        df: dict[tuple[str, ...], float] = defaultdict(float)
        for crefs in self._crefs.values():
            for ngram in {g for c in crefs for g in c}:
                df[ngram] += 1.0
        self._log_df = {g: math.log(max(1.0, d)) for g, d in df.items()}
        self._log_n = math.log(float(len(self._crefs)))
        self._ref_vecs: dict[Hashable, list] = {}  # filled lazily: only images that get scored

    def _tok(self, text: str) -> str:
        return simple_tokenize(text) if self._tokenize else text

    def _vec(self, counts: Mapping[tuple[str, ...], int]) -> tuple[list[dict], np.ndarray, int]:
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = np.zeros(self.n)
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            w = float(tf) * (self._log_n - self._log_df.get(ngram, 0.0))
            vec[k][ngram] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap measures length in bigrams (its `n == 1`); kept to match its scores
                length += tf
        return vec, np.sqrt(norm), length

    def _sim(self, hyp: tuple, ref: tuple) -> np.ndarray:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        val = np.zeros(self.n)
        for k in range(self.n):
            r = vr[k]
            val[k] = sum(min(w, r[g]) * r[g] for g, w in vh[k].items() if g in r)
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
        return val * math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))

    def score_one(self, image_id: Hashable, caption: str) -> float:
        if image_id not in self._crefs:
            raise KeyError(f"image {image_id!r} is not in the CIDEr-D reference corpus")
        refs = self._ref_vecs.get(image_id)
        if refs is None:
            refs = self._ref_vecs[image_id] = [self._vec(c) for c in self._crefs[image_id]]
        hyp = self._vec(precook(self._tok(caption), self.n))
        total = sum(self._sim(hyp, ref) for ref in refs)
        return float(np.mean(total) / len(refs) * 10.0)

    def score(self, candidates: Mapping[Hashable, str] | Iterable[tuple[Hashable, str]]) -> tuple[float, np.ndarray]:
        """candidates: {image_id: caption}, or (image_id, caption) pairs when an image has several samples
        (SCST). Returns (mean, per-candidate scores in the given order)."""
        pairs = list(candidates.items()) if isinstance(candidates, Mapping) else list(candidates)
        scores = np.array([self.score_one(iid, cap) for iid, cap in pairs], dtype=np.float64)
        return (float(scores.mean()) if len(scores) else 0.0), scores


def format_caption_metrics(metrics: Mapping[str, Any]) -> str:
    """Rows 'metric  value' (x100, as the paper reports), with the reason for any metric left out."""
    lines = []
    for name in METRIC_NAMES:
        v = metrics.get(name)
        lines.append(f"{name:<10} {v * 100:8.2f}" if v is not None else f"{name:<10} {'n/a':>8}")
    for name in METRIC_NAMES:
        why = metrics.get(f"{name}_unavailable")
        if why:
            lines.append(f"{name} unavailable: {why}")
    return "\n".join(lines)
