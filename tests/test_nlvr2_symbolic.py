"""benchmarks/nlvr2_symbolic.py: the symbolic reader must read every generated statement as the generator meant it."""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import nlvr2_symbolic as sym  # noqa: E402

from minivlm.data.feature_store import FeatureStoreWriter  # noqa: E402
from minivlm.data.synthetic import CLASSES, generate_world, render_scene  # noqa: E402
from minivlm.data.synthetic_text import nlvr2_statement  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.regions import Regions  # noqa: E402


def _things(scene) -> list[sym.Thing]:
    return [sym.Thing(o.cls, o.colour, (o.box[0], o.box[1], o.box[0] + o.box[2], o.box[1] + o.box[3]))
            for o in scene.objects]


def test_the_reader_gives_the_generators_truth_on_the_true_scenes():
    """On the scenes a statement was written about, the reader's verdict is the statement's label, for every
    template (true and false statements, all eight kinds)."""
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(120):
        classes = [CLASSES[i] for i in rng.choice(len(CLASSES), 3, replace=False)]
        left, right = (render_scene(rng, classes)[1] for _ in range(2))
        for label in (True, False):
            text = nlvr2_statement(left, right, label, rng)
            read = sym.read_statement(text)
            assert read is not None, text
            kinds.add(read[0])
            assert read[1](_things(left), _things(right)) == label, text
    assert kinds == {"more shapes", "same number", "more X", "N in total", "both contain", "only one", "exactly N",
                     "relation"}


def test_the_reader_leaves_other_text_unread():
    assert sym.read_statement("The dog on the left is asleep.") is None


def test_colours_come_from_the_region_code_when_the_features_end_in_one():
    names = ["red", "blue", "small", "large"]
    code = torch.tensor([[0.0, 40, 40, 0], [40, 0, 0, 40]])  # blue + small, red + large (one-hot per group, x40)
    r = Regions(boxes=torch.zeros(2, 4), features=torch.cat([torch.randn(2, 6), code], 1), scores=torch.ones(2),
                labels=torch.zeros(2, dtype=torch.long), image_size=(8, 8), tags=["circle", "circle"],
                attributes=torch.tensor([2, 3]), attribute_names=["small", "large"])
    assert sym.colours_of(r, names) == ["blue", "red"]
    r.features = torch.randn(2, 10)  # no code: the best attribute, when it is a colour
    assert sym.colours_of(r, names) == [None, None]


def test_things_keep_confident_regions_and_only_colours_as_colours():
    r = Regions(boxes=torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]), features=torch.zeros(3, 4),
                scores=torch.tensor([0.9, 0.5, 0.1]), labels=torch.tensor([0, 1, 0]), image_size=(64, 64),
                tags=["circle", "square", "circle"], attributes=torch.tensor([0, 1, 0]),
                attribute_names=["red", "striped", "red"])
    things = sym.things_of(r, min_score=0.3)
    assert [(t.cls, t.colour) for t in things] == [("circle", "red"), ("square", None)]
    assert things[1].box == (20.0, 0.0, 30.0, 10.0)


def test_the_benchmark_scores_the_reader_and_a_models_results_per_kind(tmp_path):
    """A store whose regions name nothing: the reader says "false" to every statement but the ones that hold of
    empty images; a model whose results are the labels scores 100."""
    generate_world(tmp_path / "world", images=16, seed=0, nlvr2_pairs=8, workers=1, nlvr2_statements=4)
    world = World(tmp_path / "world")
    with FeatureStoreWriter(tmp_path / "store", meta={"class_names": ["nothing"]}) as w:
        for split in ("train", "dev", "test1"):
            for e in world.nlvr2(split):
                for name in (e.left_image, e.right_image):
                    key = f"{split}/{name}"
                    if key not in w.done_keys():
                        w.add(key, Regions(boxes=torch.tensor([[0.0, 0, 4, 4]]), features=torch.zeros(1, 8),
                                           scores=torch.tensor([0.9]), labels=torch.tensor([0]), image_size=(32, 32),
                                           tags=["nothing"]))
    test = world.nlvr2("test1")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"identifier": e.identifier, "prediction": e.label} for e in test]))
    out = tmp_path / "out.json"
    assert sym.main(["--data", str(tmp_path / "world"), "--features", str(tmp_path / "store"),
                     "--results", str(results), "--out", str(out)]) == 0
    kinds = json.loads(out.read_text())["kinds"]
    assert kinds["all"]["n"] == len(test) == sum(v["n"] for k, v in kinds.items() if k != "all")
    assert kinds["all"]["model"] == 100.0
    empty = [(e, sym.read_statement(e.sentence)) for e in test]
    expected = sum(read[1]([sym.Thing("nothing", None, (0, 0, 4, 4))], [sym.Thing("nothing", None, (0, 0, 4, 4))])
                   == e.label for e, read in empty)
    assert kinds["all"]["reader"] == 100.0 * expected / len(test)
    majority = sym.kind_majorities(world.nlvr2("train"))  # the blind kind prior: each kind's training majority
    assert kinds["all"]["prior"] == 100.0 * sum(majority.get(sym.kind_of(e.sentence), True) == e.label
                                                for e in test) / len(test)


def test_oracle_regions_of_the_nlvr2_images_are_their_truth(tmp_path):
    """The synthetic world writes the NLVR2 images' objects (nlvr2/annotations/instances_{split}.json); the oracle
    store built from them answers to the pairs' image names, and the reader on its regions gives every statement's label."""
    from minivlm.data.feature_store import FeatureStore
    from minivlm.data.oracle import write_oracle_store

    generate_world(tmp_path / "world", images=8, seed=3, nlvr2_pairs=12, workers=1, nlvr2_statements=4)
    world = World(tmp_path / "world")
    n = write_oracle_store(tmp_path / "world", tmp_path / "oracle", region_dim=32, nlvr2=True)
    store = FeatureStore(tmp_path / "oracle")
    classes, attrs = store.class_names, store.attribute_names
    assert n == 2 * 12 == len(store)

    def things(name: str) -> list[sym.Thing]:
        r = store[store.find(name)]
        hot = [set(torch.nonzero(f).flatten().tolist()) for f in r.features]
        colours = [next(attrs[i - len(classes)] for i in h if i >= len(classes) and attrs[i - len(classes)] in
                        sym.COLOURS) for h in hot]
        assert [classes[min(h)] for h in hot] == r.tags  # one-hot class first, then the attributes
        return [sym.Thing(t, c, tuple(b.tolist())) for t, c, b in zip(r.tags, colours, r.boxes)]

    checked = 0
    for split in ("train", "dev", "test1"):
        for e in world.nlvr2(split):
            read = sym.read_statement(e.sentence)
            assert read is not None and read[1](things(e.left_image), things(e.right_image)) == e.label, e.sentence
            checked += 1
    assert checked == 4 * 12
