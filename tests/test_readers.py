"""Readers of the real dataset formats, and `World` over a dataset root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from minivlm.data.readers import (CocoInstances, VisualGenome, read_coco_captions, read_coco_instances,
                                  read_karpathy, read_nlvr2, read_vg, read_vocab, read_vqa)
from minivlm.data.world import World
from minivlm.errors import DataFormatError

# Copies of ../shared/formats (the real datasets' schemas with tiny invented samples): a clone must pass alone.
SHARED = Path(__file__).parent / "fixtures" / "formats"
VALID = Path(__file__).parent / "fixtures" / "valid"
BAD = Path(__file__).parent / "fixtures" / "bad"


# ---------------------------------------------------------------- the real-format samples (copied from ../shared)

def test_shared_samples_exist():
    assert (SHARED / "README.md").is_file(), f"format samples expected at {SHARED}"


def test_shared_coco_instances():
    c = read_coco_instances(SHARED / "coco_instances_sample.json")
    assert set(c.images) == {9, 25}
    assert c.class_names() == ["giraffe", "bowl", "broccoli"]  # sorted by id 25, 51, 56
    assert c.category_index() == {25: 0, 51: 1, 56: 2}
    assert [a.category_id for a in c.annotations[9]] == [51, 56]
    assert c.annotations[25][0].bbox == pytest.approx((385.53, 60.03, 214.97, 297.16))
    assert c.categories[0].group == "animal" and c.attributes == []


def test_shared_coco_captions():
    c = read_coco_captions(SHARED / "coco_captions_sample.json")
    assert list(c.images) == [9] and len(c.captions[9]) == 5
    assert c.captions[9][0].startswith("Plastic trays")


def test_shared_karpathy():
    imgs = read_karpathy(SHARED / "dataset_coco_sample.json")
    assert [(k.image_id, k.split, k.raw_split) for k in imgs] == [(391895, "test", "test"), (57870, "train", "restval")]
    assert imgs[0].filepath == "val2014" and len(imgs[0].sentences) == 2


def test_shared_vqa():
    qs = read_vqa(SHARED / "vqa_v2_questions_sample.json", SHARED / "vqa_v2_annotations_sample.json")
    assert [q.question_id for q in qs] == [458752000, 458752001, 458752002]
    assert qs[1].answer_type == "number" and qs[1].multiple_choice_answer == "2"
    assert len(qs[1].answers) == 10 and qs[1].answers.count("2") == 6
    only_q = read_vqa(SHARED / "vqa_v2_questions_sample.json")
    assert all(q.answers == [] for q in only_q)


def test_shared_nlvr2():
    ex = read_nlvr2(SHARED / "nlvr2_sample.json")
    assert [e.label for e in ex] == [False, True]
    assert (ex[0].left_image, ex[0].right_image) == ("dev-850-0-img0.png", "dev-850-0-img1.png")


def test_shared_vg():
    vg = read_vg(SHARED / "vg_objects_sample.json", SHARED / "vg_attributes_sample.json",
                 SHARED / "vg_image_data_sample.json")
    assert isinstance(vg, VisualGenome)
    assert (vg.images[1].width, vg.images[1].height) == (800, 600)
    tree, clouds = vg.objects[1]
    assert tree.attributes == ["tall", "green"] and clouds.attributes == []
    assert clouds.names == ["clouds", "sky"] and tree.bbox == (421.0, 91.0, 79.0, 339.0)


# ---------------------------------------------------------------- hand-written fixtures: exact values

def test_fixture_instances_values():
    c = read_coco_instances(VALID / "instances.json")
    assert isinstance(c, CocoInstances)
    assert c.class_names() == ["car", "dog"] and c.category_index() == {3: 0, 18: 1}
    assert c.attribute_names() == ["wooden", "red"] and c.attribute_index() == {1: 0, 2: 1}
    assert c.attributes[0].group == "colour"
    assert set(c.annotations) == {1, 2, 7} and c.annotations[7] == []  # every image present
    a = c.annotations[1][0]
    assert (a.id, a.category_id, a.bbox, a.area, a.iscrowd, a.attribute_ids) == (10, 3, (1.0, 2.0, 30.0, 20.0), 600.0, 0, (2, 1))
    sliver = c.annotations[1][1]
    assert sliver.bbox[2] == 0.0 and sliver.iscrowd == 1  # zero-width boxes are kept, as in real COCO
    default = c.annotations[2][0]
    assert default.area == 32 * 32 and default.iscrowd == 0 and default.attribute_ids == ()


def test_fixture_captions_karpathy_vqa_nlvr2():
    caps = read_coco_captions(VALID / "captions.json")
    assert caps.captions == {1: ["A red car.", "A car next to a dog."], 2: []}
    k = read_karpathy(VALID / "dataset_coco.json")
    assert [(x.image_id, x.filepath, x.split) for x in k] == [(1, "train", "train"), (5, "val", "test")]
    assert k[1].sentences == []
    qs = read_vqa(VALID / "vqa_questions.json", VALID / "vqa_annotations.json")
    by_id = {q.question_id: q for q in qs}
    assert by_id[1000].answers.count("red") == 9 and by_id[1000].question_type == "what color is the"
    assert by_id[2001].answers == [] and by_id[2001].image_id == 2  # unannotated question kept
    ex = read_nlvr2(VALID / "nlvr2.json")  # the blank line is skipped
    assert [(e.identifier, e.label) for e in ex] == [("dev-3-1-0", True), ("dev-3-1-1", False)]
    assert ex[1].right_image == "dev-3-1-img1.png"


def test_fixture_vg_and_vocab():
    objs = read_vg(VALID / "vg_objects.json", VALID / "vg_attributes.json")
    assert isinstance(objs, dict) and objs[6] == []
    car, dog = objs[5]
    assert car.names == ["car"] and car.attributes == ["red", "shiny"]  # stripped, lower-cased
    assert dog.names == ["dog"] and dog.attributes == []  # VG 1.0 "name" accepted
    assert all(o.object_id != 999 for o in objs[5])  # attribute records of unknown objects skipped
    vg = read_vg(VALID / "vg_objects.json", None, VALID / "vg_image_data.json")
    assert vg.images[5].file_name == "5.jpg" and vg.images[6].file_name == "6.jpg" and vg.images[6].width == 30
    assert read_vocab(VALID / "objects_vocab.txt") == ["car", "dog", "traffic light"]


# ---------------------------------------------------------------- malformed files: DataFormatError naming file + field

MALFORMED = [
    (read_coco_instances, ["instances_bbox3.json"], "annotations[1].bbox: expected 4 numbers, got 3"),
    (read_coco_instances, ["instances_negative_box.json"], "annotations[0].bbox: negative width"),
    (read_coco_instances, ["instances_unknown_image.json"], "annotations[0].image_id: unknown image id 4"),
    (read_coco_instances, ["instances_unknown_category.json"], "annotations[0].category_id: unknown category id 9"),
    (read_coco_instances, ["instances_no_categories.json"], "missing top-level key 'categories'"),
    (read_coco_instances, ["instances_id_string.json"], "images[0].id: expected an integer, got string"),
    (read_coco_instances, ["instances_no_width.json"], "images[0].width: missing"),
    (read_coco_instances, ["instances_unknown_attribute.json"], "annotations[0].attribute_ids[0]: unknown attribute id 3"),
    (read_coco_instances, ["instances_truncated.json"], "not valid JSON"),
    (read_coco_instances, ["instances_top_list.json"], "expected a JSON object at top level"),
    (read_coco_instances, ["does_not_exist.json"], "file not found"),
    (read_coco_captions, ["captions_not_string.json"], "annotations[0].caption: expected a string, got integer"),
    (read_coco_captions, ["instances_unknown_category.json"], "annotations[0].caption: missing"),  # an instances file
    (read_karpathy, ["karpathy_bad_split.json"], "images[0].split: expected one of"),
    (read_karpathy, ["karpathy_no_raw.json"], "images[0].sentences[0].raw: missing"),
    (read_vqa, ["vqa_questions.json", "vqa_annotations_unknown_qid.json"], "annotations[0].question_id: question id 11 is not in"),
    (read_vqa, ["vqa_questions.json", "vqa_annotations_no_answer.json"], "annotations[0].answers[0].answer: missing"),
    (read_vqa, ["vqa_questions_not_list.json"], "questions: expected a list, got object"),
    (read_nlvr2, ["nlvr2_bad_label.json"], "line 2.label: expected \"True\" or \"False\", got 'maybe'"),
    (read_nlvr2, ["nlvr2_not_json.json"], "line 3: not valid JSON"),
    (read_nlvr2, ["nlvr2_bad_identifier.json"], "line 1.identifier: expected split-set-pair-sentence"),
    (read_nlvr2, ["nlvr2_no_sentence.json"], "line 1.sentence: missing"),
    (read_vg, ["vg_objects_no_x.json"], "[0].objects[0].x: missing"),
    (read_vg, ["vg_objects_not_list.json"], "expected a JSON list of images"),
    (read_vg, ["vg_objects.json", "vg_attributes_not_list.json"], "[0].attributes[0].attributes: expected a list, got string"),
    (read_vg, ["vg_objects.json", None, "vg_image_data_missing_image.json"], "image id 1 has objects but is not in"),
    (read_vocab, ["vocab_blank_line.txt"], "line 2: empty class name"),
]


@pytest.mark.parametrize("reader,files,field", MALFORMED, ids=[f"{r.__name__}:{f[-1]}" for r, f, _ in MALFORMED])
def test_malformed_raises_data_format_error(reader, files, field):
    args = [None if f is None else BAD / f for f in files]
    # pytest.raises(DataFormatError) lets any other exception type propagate and fail the test.
    with pytest.raises(DataFormatError) as info:
        reader(*args)
    msg = str(info.value)
    culprit = next(f for f in reversed(files) if f is not None)
    if "has objects but is not in" not in field:  # that one names objects.json and image_data.json both
        assert msg.startswith(str(BAD / culprit)), msg
    assert field in msg, msg


def test_messages_name_the_real_file_path(tmp_path):
    # The message starts with the path as given, so a user sees which of several split files is bad.
    p = tmp_path / "annotations" / "instances_train.json"
    p.parent.mkdir()
    shutil.copy(BAD / "instances_bbox3.json", p)
    with pytest.raises(DataFormatError, match=r"annotations/instances_train.json: annotations\[1\].bbox: expected 4 numbers, got 3"):
        read_coco_instances(p)


def test_bool_is_not_a_number(tmp_path):
    p = tmp_path / "i.json"
    p.write_text('{"images": [{"id": 1, "file_name": "a", "width": true, "height": 4}], "annotations": [], "categories": []}')
    with pytest.raises(DataFormatError, match=r"images\[0\].width: expected an integer, got boolean"):
        read_coco_instances(p)


# ---------------------------------------------------------------- World

def _make_world(root: Path) -> World:
    ann = root / "annotations"
    ann.mkdir(parents=True)
    shutil.copy(VALID / "instances.json", ann / "instances_train.json")
    shutil.copy(VALID / "captions.json", ann / "captions_train.json")
    shutil.copy(VALID / "dataset_coco.json", ann / "dataset_coco.json")
    (root / "vqa").mkdir()
    shutil.copy(VALID / "vqa_questions.json", root / "vqa" / "v2_OpenEnded_mscoco_train_questions.json")
    shutil.copy(VALID / "vqa_annotations.json", root / "vqa" / "v2_mscoco_train_annotations.json")
    shutil.copy(VALID / "vqa_questions.json", root / "vqa" / "v2_OpenEnded_mscoco_test_questions.json")
    (root / "nlvr2" / "images" / "dev" / "3").mkdir(parents=True)
    shutil.copy(VALID / "nlvr2.json", root / "nlvr2" / "dev.json")
    Image.new("RGB", (4, 4)).save(root / "nlvr2" / "images" / "dev" / "3" / "dev-3-1-img0.png")
    Image.new("RGB", (4, 4)).save(root / "nlvr2" / "images" / "dev" / "dev-3-1-img1.png")
    return World(root)


def test_world_reads_layout(tmp_path):
    w = _make_world(tmp_path)
    assert w.splits() == ["train"] and w.splits("vqa") == ["test", "train"] and w.splits("nlvr2") == ["dev"]
    assert w.class_names() == ["car", "dog"] and w.attribute_names() == ["wooden", "red"]
    inst = w.instances("train")
    assert w.instances("train") is inst  # cached
    assert w.image_path("train", inst.images[1]) == tmp_path / "train" / "img_1.jpg"
    assert w.image_path("val2014", "x.jpg") == tmp_path / "val2014" / "x.jpg"
    assert w.captions("train").captions[1][0] == "A red car."
    assert [k.split for k in w.karpathy()] == ["train", "test"]
    assert len([q for q in w.vqa("train") if q.answers]) == 2
    assert all(q.answers == [] for q in w.vqa("test"))  # no annotations file for test
    assert w.vqa_image_path("train", 2) == tmp_path / "train" / "img_2.jpg"
    assert w.vqa_image_path("test", 2) == tmp_path / "test" / "COCO_test_000000000002.jpg"
    ex = w.nlvr2("dev")[0]
    assert w.nlvr2_image_path("dev", ex.left_image) == tmp_path / "nlvr2/images/dev/3/dev-3-1-img0.png"  # in a subfolder
    assert w.nlvr2_image_path("dev", ex.right_image) == tmp_path / "nlvr2/images/dev/dev-3-1-img1.png"


def test_world_chooses_splits_by_one_rule(tmp_path):
    from minivlm.io import write_json

    def captions(ids):
        return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in ids],
                "annotations": [{"id": i, "image_id": i, "caption": f"file caption {i}"} for i in ids]}

    ann, vqa = tmp_path / "annotations", tmp_path / "vqa"
    for split, ids in (("train2014", [1, 2]), ("val2014", [3]), ("val", [3])):
        write_json(ann / f"captions_{split}.json", captions(ids))
    write_json(ann / "dataset_coco.json", {"images": [
        {"filepath": "train2014", "filename": f"{i}.jpg", "cocoid": i, "split": split,
         "sentences": [{"raw": f"karpathy {i}"}]} for i, split in ((1, "restval"), (2, "train"), (3, "val"), (4, "test"))]})
    for split in ("train2014", "val2014", "test2015"):
        write_json(vqa / f"v2_OpenEnded_mscoco_{split}_questions.json", {"questions": []})
    w = World(tmp_path)
    # captions: the files' splits sorted, then Karpathy's that no file has; Karpathy "train" sorts first
    assert w.splits("captions") == ["train2014", "val", "val2014", "train", "test"]
    assert w.train_split("captions") == "train" and w.train_split("captions", "train2014") == "train2014"
    assert w.eval_splits("captions") == ["val", "val2014", "test"] and w.val_split("captions") == "val"
    assert (w.train_split("vqa"), w.eval_splits("vqa"), w.val_split("vqa")) == ("train2014", ["test2015", "val2014"],
                                                                                "val2014")
    assert w.splits("pretrain") == ["test2015", "train2014", "val", "val2014"]
    assert (w.test_split("vqa"), w.test_split("captions"), w.test_split("nlvr2")) == ("test2015", "test", None)
    # one precedence for references: the captions file, else the Karpathy split (restval is training data)
    assert w.caption_references("val") == {3: ["file caption 3"]}
    assert w.caption_references("train") == {1: ["karpathy 1"], 2: ["karpathy 2"]}
    assert w.caption_references("test") == {4: ["karpathy 4"]}
    with pytest.raises(DataFormatError, match=r"captions_test2015.json: not found, and no Karpathy split"):
        w.caption_references("test2015")
    with pytest.raises(DataFormatError, match=r"no vqa split 'train' \(found: test2015, train2014, val2014\)"):
        w.train_split("vqa", "train")
    with pytest.raises(DataFormatError, match=r"nlvr2/train.json: expected file not found \(no nlvr2 training split"):
        w.train_split("nlvr2")


def test_world_missing_files_name_expected_path(tmp_path):
    w = _make_world(tmp_path)
    with pytest.raises(DataFormatError, match=r"instances_val.json: expected file not found"):
        w.instances("val")
    with pytest.raises(DataFormatError, match=r"nlvr2/test1.json"):
        w.nlvr2("test1")
    with pytest.raises(DataFormatError, match=r"nlvr2/images/dev/dev-9-9-img0.png: NLVR2 image not found"):
        w.nlvr2_image_path("dev", "dev-9-9-img0.png")
    with pytest.raises(DataFormatError, match=r"instances_train.json"):
        World(tmp_path / "nowhere").class_names()


def test_file_names_cannot_leave_the_dataset_root(tmp_path):
    w = _make_world(tmp_path / "root")
    (tmp_path / "secret.jpg").write_bytes(b"not for the model")
    for name in ("../../secret.jpg", str(tmp_path / "secret.jpg"), "sub/../../x.jpg", ""):
        with pytest.raises(DataFormatError, match="leaves the dataset folder|empty"):
            w.image_path("train", name)
    (tmp_path / "root" / "train").mkdir(exist_ok=True)
    (tmp_path / "root" / "train" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(DataFormatError, match="link.jpg: a link that points out of the dataset folder"):
        w.image_path("train", "link.jpg")
    with pytest.raises(DataFormatError, match="leaves the dataset folder"):
        w.nlvr2_image_path("dev", "../../../secret.jpg")
    (tmp_path / "root" / "nlvr2" / "images" / "dev" / "7").mkdir(parents=True)
    (tmp_path / "root" / "nlvr2" / "images" / "dev" / "7" / "dev-7-0-img0.png").symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(DataFormatError, match="points out of the dataset folder"):
        w.nlvr2_image_path("dev", "dev-7-0-img0.png")  # found by the subfolder search, refused all the same
    # a split folder that is itself a link (a dataset linked into place) is fine
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "elsewhere" / "a.png")
    (tmp_path / "root" / "val2014").symlink_to(tmp_path / "elsewhere")
    assert w.image_path("val2014", "a.png").read_bytes() == (tmp_path / "elsewhere" / "a.png").read_bytes()


def test_generated_synthetic_world_loads_through_world(tmp_path):
    from minivlm.data.images import load_image
    from minivlm.data.synthetic import generate_world

    generate_world(tmp_path / "w", images=12, seed=0, nlvr2_pairs=4, workers=1)
    w = World(tmp_path / "w")
    assert w.splits() == ["test", "train", "val"] and w.splits("vqa") == ["test", "train", "val"]
    assert len(w.class_names()) > 1 and len(w.attribute_names()) > 1
    n_images = 0
    for split in w.splits():
        inst, caps = w.instances(split), w.captions(split)
        assert set(caps.images) == set(inst.images) and all(caps.captions[i] for i in caps.images)
        for info in inst.images.values():
            assert load_image(w.image_path(split, info)).size == (info.width, info.height)
            for a in inst.annotations[info.id]:
                assert a.bbox[0] + a.bbox[2] <= info.width + 1 and a.bbox[1] + a.bbox[3] <= info.height + 1
        for q in w.vqa(split):
            assert q.image_id in inst.images and w.vqa_image_path(split, q.image_id).is_file()
        n_images += len(inst.images)
    assert len(w.karpathy()) == n_images
    assert all(w.image_path(k.filepath, k.filename).is_file() for k in w.karpathy())
    examples = [(s, e) for s in w.splits("nlvr2") for e in w.nlvr2(s)]
    assert examples
    for split, e in examples:
        assert w.nlvr2_image_path(split, e.left_image).is_file() and w.nlvr2_image_path(split, e.right_image).is_file()
