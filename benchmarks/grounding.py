"""Does the model look at the image? VQA with oracle regions, the detector's regions, and none.

    python benchmarks/grounding.py [--data WORLD] [--features TEE_STORE] [--pretrained PRE/model] [--out runs/grounding]

The same transformer recipe (the demo's VQA recipe: a curriculum of attribute questions, then all of them)
is fine-tuned three times on the same world and scored on the same test split:

    oracle   regions built from the ground truth (true boxes; a one-hot class + multi-hot attribute vector
             of the usual region width, `minivlm.data.oracle`): what a perfect extractor would give;
    tee      the detector's regions (`--features`, a `minivlm extract` store of the same images);
    blind    no regions and no tags, the question alone: what the language prior gives.

With `--nlvr2`, NLVR2 too: the demo's NLVR2 recipe from random weights on the same three region sources of the
NLVR2 images (oracle regions from the synthetic world's nlvr2/annotations/instances_*.json; tee needs
`--nlvr2-features`), per kind of statement beside the kind prior (each statement answered with its kind's
training majority: a blind model that knows the template). oracle at the kind prior says that the fusion
model's learning of the statements, not the regions, holds NLVR2 back at this data size.

Each VQA setting is reported per question type (and the "is the" questions per kind of check: spatial, texture,
size) beside the per-question-type prior (the most common training answer of
that type) and the ceiling: the VQA score of the true answer (100 on the synthetic world, where at least
6 of the 10 annotators give it, so every leave-one-out subset has 3 matches; lower where annotators disagree
more). oracle near the ceiling and tee far below it points at the features;
oracle near blind points at the fusion model. Without `--data` a world like the default demo's is made
(800 images, 12 questions each). `--images 8000` makes the 10x world on which oracle regions reach the
ceiling in `benchmarks/oracle_fusion.py` (`--images 8000 --settings oracle --curriculum-epochs 1 --epochs 5`
is about the same 11,500 steps; not run yet). Prints a table and writes OUT/grounding.json (docs/RESULTS.md quotes
benchmarks/results/grounding.json).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.data.oracle import write_blind_store, write_oracle_store  # noqa: E402
from minivlm.data.synthetic_text import TEXTURES  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.eval.vqa_eval import vqa_accuracy  # noqa: E402
from minivlm.demo import SIZES, stage  # noqa: E402
from minivlm.errors import MiniVLMError  # noqa: E402
from minivlm.io import read_json, write_json  # noqa: E402
from minivlm.tasks.finetune import DEFAULT_LR, finetune  # noqa: E402
from minivlm.tasks.vqa import VQA_POOLS, baseline_results  # noqa: E402

DEMO = SIZES["default"]  # the recipe the benchmark shares with the demo


def ceiling(questions) -> dict:
    """VQA accuracy of answering every question with its true answer (the generator's canonical one)."""
    return vqa_accuracy([{"question_id": q.question_id, "answer": q.multiple_choice_answer} for q in questions],
                        questions)


# The generator's "is the" questions are three kinds of check, with three different difficulties (on oracle
# regions the size checks reach ~90% exact and the spatial ones stay near chance), told apart by their words:
# "is the star left of the arrow?", "is the red star striped?", "is the red star medium sized?".
_RELATION_WORDS = re.compile(r"\b(left|right|above|over|below|under|beneath)\b")
CHECKS = ("spatial", "texture", "size")


def check_kind(question: str) -> str:
    """Which check an "is the" question of the synthetic world is: spatial, texture or size."""
    text = question.lower().rstrip("?")
    if _RELATION_WORDS.search(text):
        return "spatial"
    words = text.split()
    return "texture" if words and words[-1] in TEXTURES else "size"


def checks_table(test_q, per_question: dict[str, dict]) -> dict[str, dict[str, float]]:
    """VQA accuracy on the "is the" questions per check kind, for each column's per-question accuracies
    ({column: {question_id: accuracy}}), and how many questions each kind has ("n")."""
    kinds = {q.question_id: check_kind(q.question) for q in test_q if q.question_type == "is the"}
    table: dict[str, dict[str, float]] = {}
    for k in CHECKS:
        ids = [qid for qid, kind in kinds.items() if kind == k]
        table[k] = {column: sum(acc[qid] for qid in ids) / len(ids) if ids else 0.0
                    for column, acc in per_question.items()}
        table[k]["n"] = len(ids)
    return table


def run_setting(name: str, world: Path, store: Path, out: Path, args) -> dict:
    """Fine-tunes VQA on one region source; the demo's `stage` records its seconds and skips it when done."""
    # The demo's recipe, so a setting it gains later is the benchmark's too; then the flags, whose defaults are its own.
    setup = DEMO.finetune_setup("vqa", epochs=args.epochs, seed=args.seed, data=world, features=store, out=out / name,
                                pretrained=args.pretrained, preset=args.preset, eval_splits=["test"])
    setup = replace(setup, curriculum_epochs=args.curriculum_epochs, curriculum_yes_no=args.curriculum_yes_no,
                    vqa_pool=args.vqa_pool, region_null=args.region_null,
                    train=replace(setup.train, epochs=args.epochs, lr=args.lr or DEFAULT_LR["vqa"],
                                  warmup_steps=args.warmup))
    return stage(name, out / name, lambda: finetune(setup), prefix="grounding")


def run_nlvr2_setting(name: str, world: Path, store: Path, nlvr2_store: Path, out: Path, args) -> dict:
    """Fine-tunes NLVR2 on one region source of the pairs' images, with the demo's recipe from random weights."""
    folder = out / f"nlvr2_{name}"
    return stage(f"nlvr2 {name}", folder, lambda: finetune(DEMO.finetune_setup(
        "nlvr2", epochs=args.nlvr2_epochs, seed=args.seed, data=world, features=store, nlvr2_features=nlvr2_store,
        out=folder, pretrained=None, preset=args.preset, eval_splits=["test1"])), prefix="grounding")


def nlvr2_table(world: World, results: dict[str, dict], out: Path) -> dict:
    """Accuracy per kind of statement on test1: each setting's model and the kind prior."""
    from nlvr2_symbolic import accuracy_by_kind, kind_prior  # benchmarks/, beside this script

    test = world.nlvr2("test1")
    predictions = {n: {r["identifier"]: bool(r["prediction"])
                       for r in read_json(out / f"nlvr2_{n}" / "results_test1.json")} for n in results}
    return accuracy_by_kind(test, {"kind_prior": kind_prior(world.nlvr2(world.train_split("nlvr2")), test),
                                   **predictions})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="world root (default: make one under OUT/world)")
    p.add_argument("--images", type=int, default=DEMO.images,
                   help="images of the world made without --data (default: the demo's; 8000 is the 10x world)")
    p.add_argument("--features", type=Path, help="TEE feature store of the world's images (omit: no tee row)")
    p.add_argument("--pretrained", type=Path, help="pre-trained transformer folder (default: random init)")
    p.add_argument("--preset", default="bert-demo")
    p.add_argument("--epochs", type=int, default=DEMO.task_epochs["vqa"],
                   help="VQA epochs on all questions (default: the demo's)")
    p.add_argument("--curriculum-epochs", type=int, default=DEMO.vqa_curriculum_epochs,
                   help="VQA epochs on the attribute questions first (default: the demo's; 0: none)")
    p.add_argument("--curriculum-yes-no", action=argparse.BooleanOptionalAction, default=DEMO.vqa_curriculum_yes_no,
                   help="the curriculum also takes the yes/no questions about named objects (default: the demo's)")
    p.add_argument("--vqa-pool", default=DEMO.vqa_pool, choices=VQA_POOLS,
                   help="what the answer head reads (default: the demo's)")
    p.add_argument("--region-null", action=argparse.BooleanOptionalAction, default=DEMO.region_null,
                   help="region attention may pick no region (default: the demo's)")
    p.add_argument("--lr", type=float, default=DEMO.task_lr.get("vqa"),
                   help="default: the demo's (finetune's VQA default where the demo sets none)")
    p.add_argument("--warmup", type=int, default=30 if "vqa" in DEMO.task_lr else 0,
                   help="default: the demo's (DemoSize.finetune_setup warms up a task whose lr it sets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="oracle,tee,blind", help="comma-separated subset of oracle,tee,blind")
    p.add_argument("--vqa", action=argparse.BooleanOptionalAction, default=True, help="the VQA table")
    p.add_argument("--nlvr2", action="store_true", help="an NLVR2 table too (synthetic world only)")
    p.add_argument("--nlvr2-features", type=Path, help="TEE feature store of the world's NLVR2 images (the tee row)")
    p.add_argument("--nlvr2-epochs", type=int, default=DEMO.task_epochs["nlvr2"], help="default: the demo's")
    p.add_argument("--out", type=Path, default=Path("runs/grounding"))
    args = p.parse_args(argv)
    if not args.vqa and not args.nlvr2:
        p.error("--no-vqa leaves nothing to run without --nlvr2")
    torch.manual_seed(args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    world_root = args.data
    if world_root is None:
        from minivlm.data.synthetic import generate_world

        world_root = args.out / "world"
        if not (world_root / "world.json").is_file():
            generate_world(world_root, args.images, args.seed, nlvr2_pairs=DEMO.nlvr2_pairs if args.nlvr2 else 0,
                           questions_per_image=DEMO.questions_per_image, nlvr2_statements=DEMO.nlvr2_statements)
    wanted = set(args.settings.split(","))
    stores = {}
    if "oracle" in wanted:
        stores["oracle"] = args.out / "oracle_store"
        write_oracle_store(world_root, stores["oracle"])
    if "tee" in wanted and args.features:
        stores["tee"] = args.features
    if "blind" in wanted:
        stores["blind"] = args.out / "blind_store"
        write_blind_store(world_root, stores["blind"])

    world = World(world_root)
    if args.nlvr2:
        nlvr2_stores = {}
        if "oracle" in stores:
            nlvr2_stores["oracle"] = args.out / "oracle_nlvr2_store"
            write_oracle_store(world_root, nlvr2_stores["oracle"], nlvr2=True)
        if "tee" in stores and args.nlvr2_features:
            nlvr2_stores["tee"] = args.nlvr2_features
        elif "tee" in stores:
            print("no --nlvr2-features: the NLVR2 table has no tee column")
        if "blind" in stores:
            nlvr2_stores["blind"] = args.out / "blind_nlvr2_store"
            write_blind_store(world_root, nlvr2_stores["blind"], nlvr2=True)
        nl = {n: run_nlvr2_setting(n, world_root, stores[n], s, args.out, args) for n, s in nlvr2_stores.items()}
        nl_table = nlvr2_table(world, nl, args.out)
        cols = ["kind_prior", *nl]
        print(f"NLVR2 accuracy on test1 of {world_root} ({len(world.nlvr2(world.train_split('nlvr2')))} training "
              f"statements; transformer {args.preset}, {args.nlvr2_epochs} epochs, random init)")
        print(f"{'kind':<24}{'n':>6}" + "".join(f"{c[:10]:>11}" for c in cols))
        for kind, r in nl_table.items():
            print(f"{kind:<24}{r['n']:>6}" + "".join(f"{r[c]:>11.1f}" for c in cols))
        write_json(args.out / "grounding_nlvr2.json", {
            "data": str(world_root), "nlvr2_features": str(args.nlvr2_features or ""), "preset": args.preset,
            "epochs": args.nlvr2_epochs, "nlvr2": nl_table, "seconds": {n: r.get("seconds") for n, r in nl.items()}},
            indent=1)
        print(f"wrote {args.out / 'grounding_nlvr2.json'}")
        if not args.vqa:
            return 0
    train_q, test_q = world.vqa("train"), world.vqa("test")
    refs = {"ceiling": ceiling(test_q)}
    for name, base in baseline_results(train_q, test_q).items():
        refs[name] = vqa_accuracy(base, test_q)
    results = {name: run_setting(name, world_root, store, args.out, args)
               for name, store in stores.items()}

    types = sorted(refs["ceiling"]["perQuestionType"])
    cols = ["ceiling", "per_question_type", *results]
    row = lambda name, acc: f"{name:<20}" + "".join(f"{acc[c]:>10.1f}" for c in cols)  # noqa: E731
    print(f"VQA accuracy on {len(test_q)} test questions of {world_root} (transformer {args.preset}, "
          f"{args.curriculum_epochs} + {args.epochs} epochs, {'pre-trained ' + str(args.pretrained) if args.pretrained else 'random init'})")
    print(f"{'question type':<20}" + "".join(f"{c[:9]:>10}" for c in cols))
    table = {}
    for t in types:
        table[t] = {"ceiling": refs["ceiling"]["perQuestionType"][t],
                    "per_question_type": refs["per_question_type"]["perQuestionType"][t],
                    **{n: r["eval"]["test"]["per_question_type"].get(t, 0.0) for n, r in results.items()}}
        print(row(t, table[t]))
    table["overall"] = {"ceiling": refs["ceiling"]["overall"], "per_question_type": refs["per_question_type"]["overall"],
                        **{n: r["eval"]["test"]["accuracy"] for n, r in results.items()}}
    print(row("overall", table["overall"]))
    checks = checks_table(test_q, {"ceiling": refs["ceiling"]["per_question"],
                                   "per_question_type": refs["per_question_type"]["per_question"],
                                   **{n: vqa_accuracy(read_json(args.out / n / "results_test.json"), test_q)
                                      ["per_question"] for n in results}})
    for k in CHECKS:
        print(row(f"  {k} check ({checks[k]['n']})", checks[k]))
    for n in results:
        share = 100 * table["overall"][n] / table["overall"]["ceiling"]
        print(f"  {n}: {share:.1f}% of the ceiling, {table['overall'][n] - table['overall']['per_question_type']:+.1f} "
              f"over the per-type prior ({results[n].get('seconds', 0):.0f} s)")
    write_json(args.out / "grounding.json", {
        "data": str(world_root), "features": str(args.features or ""), "preset": args.preset, "epochs": args.epochs,
        "curriculum_epochs": args.curriculum_epochs, "curriculum_yes_no": args.curriculum_yes_no,
        "vqa_pool": args.vqa_pool, "region_null": args.region_null,
        "pretrained": str(args.pretrained or ""), "n_test_questions": len(test_q),
        "most_frequent_answer": refs["most_frequent"]["overall"], "vqa": table, "vqa_checks": checks,
        "seconds": {n: r.get("seconds") for n, r in results.items()}}, indent=1)
    print(f"wrote {args.out / 'grounding.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MiniVLMError as e:  # bad input (a missing file, a foreign folder): one line, not a traceback
        sys.exit(f"error: {e}")
