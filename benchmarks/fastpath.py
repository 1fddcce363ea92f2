"""MiniVLM's default inference path for benchmarks/latency.py: the model folder exported by `minivlm export`
(into FOLDER/onnx, fp32 + int8 + the int4 step + the split detector of --bf16), opened by `MiniVLM.from_pretrained(FOLDER)` with backend "auto", which
picks ONNX Runtime; where a caption's time goes there; and a memory probe of that runtime alone.

    python benchmarks/fastpath.py --probe FOLDER IMAGE [--int8] [--int4] [--bf16] [--threads N] [--batch B]

The probe is a fresh process that never imports torch (nor does this module at import): it opens the folder
through `minivlm.backend.load` (what `from_pretrained` calls for "auto"), captions B copies of IMAGE with
exactly 20 tokens and prints its resident memory as JSON. Its peak is the whole ONNX runtime process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS = 20


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The process's resident high-water mark. VmHWM, not getrusage's ru_maxrss: a child keeps the ru_maxrss
    of the parent it was forked from (here 5.5 GB after the batch-32 run), while exec starts a fresh VmHWM."""
    return _status_mb("VmHWM")


# ---------------------------------------------------------------------------------------------- the folder


def export_folder(model, folder: Path) -> Path:
    """A MiniVLM (PyTorch) -> a model folder with fresh fp32, int8, int4-step and split-detector graphs in
    FOLDER/onnx."""
    from minivlm.export import export_model

    model.save_pretrained(folder)
    export_model(folder, int8=True, bf16=True, int4=True)
    return folder


def open_default(folder: Path, threads: int, int8: bool = False, bf16: bool = False, int4: bool = False):
    """`MiniVLM.from_pretrained(folder)` as a user calls it (backend "auto"); it must pick ONNX Runtime."""
    from minivlm.edge import EdgeMiniVLM
    from minivlm.model import MiniVLM

    model = MiniVLM.from_pretrained(folder, int8=int8, threads=threads, bf16=bf16, int4=int4)
    assert isinstance(model, EdgeMiniVLM), f"{folder}: the default path ran {type(model).__name__}, not ONNX Runtime"
    return model


def ort_session(path: Path, threads: int):
    """An onnxruntime session with EdgeMiniVLM's settings (`minivlm.edge.session_options`)."""
    import onnxruntime as ort

    from minivlm.edge import session_options

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- stages


class _Timed:
    def __init__(self, session, clock: "StageClock", stage: str):
        self.session, self.clock, self.stage = session, clock, stage

    def __getattr__(self, name):  # the rest of the session's API (get_inputs, ...) untimed
        return getattr(self.session, name)

    def run(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.session.run(*args, **kwargs)
        self.clock.ms[self.stage] += 1000 * (time.perf_counter() - t)
        return out


class _TimedCall:
    def __init__(self, fn, clock: "StageClock", stage: str):
        self.fn, self.clock, self.stage = fn, clock, stage

    def __call__(self, *args):
        t = time.perf_counter()
        out = self.fn(*args)
        self.clock.ms[self.stage] += 1000 * (time.perf_counter() - t)
        return out


class StageClock:
    """Milliseconds a caption spends in each graph of an EdgeMiniVLM; "rest" is everything outside them
    (image decoding and letterbox, the numpy search and layout, text). Wraps the model's sessions: the
    graphs run unchanged, each call timed."""

    STAGES = ("detector graph", "caption prefix", "decode steps", "rest")

    def __init__(self, model):
        self.ms = dict.fromkeys(self.STAGES, 0.0)
        cap = model.task("caption")
        detector = model.det["bf16"]["head"] if model.bf16 else model.det["graph"]
        for stage, graph in zip(self.STAGES, (detector, cap["prefix"], cap["step"])):
            model._sessions[model._pick(graph)] = _Timed(model.session(graph), self, stage)
        if model.bf16:  # the detector's two graphs: OpenVINO's features, then onnxruntime's head
            model.features = _TimedCall(model.features, self, self.STAGES[0])

    def timed(self, fn, log: list[dict]):
        """fn, with each call's split appended to `log` (ms per stage, the rest = whole call - graphs)."""
        def call():
            self.ms = dict.fromkeys(self.STAGES, 0.0)
            t = time.perf_counter()
            out = fn()
            self.ms["rest"] = 1000 * (time.perf_counter() - t) - sum(self.ms.values())
            log.append(dict(self.ms))
            return out
        return call


def median_split(log: list[dict], last: int, per: int = 1) -> dict[str, float]:
    """Median ms per stage over the last `last` calls, divided by `per` (images per call)."""
    import statistics

    runs = log[-last:]
    return {s: statistics.median(r[s] for r in runs) / per for s in StageClock.STAGES}


# ---------------------------------------------------------------------------------------------- probe


def probe(folder: Path, image: Path, int8: bool, threads: int, batch: int, bf16: bool = False,
          int4: bool = False) -> dict:
    before = rss_mb()
    from minivlm.backend import load

    model = load(folder, "auto", "cpu", int8, threads, bf16, int4)
    built = rss_mb()
    model.batch_size = batch
    model.caption([image] * batch, max_len=TOKENS, min_len=TOKENS)
    peak = peak_rss_mb()
    return {"runtime": type(model).__name__, "torch_imported": "torch" in sys.modules, "rss_at_start_mb": before,
            "rss_after_build_mb": built, "peak_rss_mb": peak, "model_and_run_mb": peak - before}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", type=Path, required=True, metavar="FOLDER", help="model folder with fresh graphs")
    p.add_argument("image", type=Path)
    p.add_argument("--int8", action="store_true")
    p.add_argument("--int4", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    print(json.dumps(probe(args.probe, args.image, args.int8, args.threads, args.batch, args.bf16, args.int4)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
