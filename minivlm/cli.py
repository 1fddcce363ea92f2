"""`minivlm <command>`: a thin shell over the library.

Each command lives in the module that owns the concept and exposes `add_arguments(parser)` and
`run(args)`; the training stages generate their flags from their setup dataclasses (`minivlm.setup_args`)
and `run` only builds the setup and calls the stage's Python function. The table below is the only registry; modules are imported only when their command runs,
so `minivlm --help` is instant and a broken optional part cannot break the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minivlm.errors import MiniVLMError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("minivlm.demo", "end-to-end demo on the synthetic world: data, detector, features, "
                             "pre-training, four tasks, report.html"),
    "make-data": ("minivlm.data.synthetic", "generate the synthetic world in the real datasets' formats"),
    "cost": ("minivlm.cost", "parameters and FLOPs per component, beside the paper's tables"),
    "train-detector": ("minivlm.vision.train", "train a TEE-X detector on COCO-style instances + attributes"),
    "extract": ("minivlm.vision.extract", "images -> top-K regions (boxes, features, tags) in a feature store"),
    "pretrain": ("minivlm.tasks.pretrain", "vision-language pre-training (MLM + ITM with tags)"),
    "finetune": ("minivlm.tasks.finetune", "fine-tune captioning, VQA, NLVR2 or retrieval"),
    "evaluate": ("minivlm.eval.evaluate", "score result files: captions, VQA, retrieval, NLVR2"),
    "caption": ("minivlm.inference", "caption images with a model folder"),
    "vqa": ("minivlm.inference", "answer a question about an image"),
    "nlvr2": ("minivlm.inference", "verify a statement about two images"),
    "retrieve": ("minivlm.inference", "rank a folder of images against a text query"),
    "distill": ("minivlm.tasks.distill", "teacher model writes pseudo-captions for unlabeled images"),
    "export": ("minivlm.export", "model folder -> ONNX graphs in MODEL/onnx (detector and every task), "
                                 "which the inference commands then run; optionally int8"),
    "edge-caption": ("minivlm.edge", "caption images with an export folder's ONNX graphs (onnxruntime, no PyTorch)"),
    "edge-vqa": ("minivlm.edge", "answer questions with an export folder's ONNX graphs (onnxruntime, no PyTorch)"),
    "serve": ("minivlm.serve.cli", "HTTP API (OpenAI-compatible chat + native endpoints) and web page, "
                                   "with dynamic batching"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minivlm",
        description="MiniVLM: a smaller and faster vision-language model. Run `minivlm COMMAND --help`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<15} {h}" for n, (_, h) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    return parser


def parse(name: str, argv: list[str]) -> tuple[object, argparse.Namespace]:
    """The command's module and its parsed arguments (argparse exits 2 on a usage error)."""
    if name not in COMMANDS:
        raise MiniVLMError(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"minivlm {name}", description=help_text)
    module.add_arguments(parser, name) if _takes_name(module) else module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.command = name
    return module, args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    module, args = parse(name, rest)
    try:
        result = module.run(args)
    except MiniVLMError as err:
        print(f"minivlm {name}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, permission denied, ...: the user's environment, not a bug
        print(f"minivlm {name}: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minivlm {name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


def _takes_name(module) -> bool:
    # Modules that serve several commands (minivlm.inference) take the command name too.
    import inspect

    return len(inspect.signature(module.add_arguments).parameters) == 2


if __name__ == "__main__":
    sys.exit(main())
