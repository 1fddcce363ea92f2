"""Do the captions name what is in the image? Each caption's object words checked against the image's objects.

CIDEr rewards the words the references share, and a caption that names the right shapes in the wrong colours
still shares most of them. This metric reads every object mention of a caption, a class noun with the
attribute words right before it ("a large striped pink circle"), and checks it against the image's annotated
objects (COCO instances with the project's `attribute_categories`):

* class precision: the share of mentions whose class is in the image;
* per attribute group (colour, size, texture): of the mentions that give one, the share for which an object
  of that class in the image has it.

The words for a class are its name and plural, and, in the synthetic world, the generator's own synonyms
("disc", "plus sign", "five-pointed star"); attribute words are the attribute names (and the generator's
"plain", "hatched"). Words that name neither are skipped ("shapes", "background").
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Hashable, Mapping

from minivlm.data.readers import CocoInstances

Vocabulary = tuple[dict[tuple[str, ...], str], dict[str, tuple[str, str]]]  # (noun words -> class, word -> attr)


def plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x", "ch", "sh")) else word + "s"


def vocabulary(instances: CocoInstances) -> Vocabulary:
    """(class noun as a word tuple -> class name, attribute word -> (group, attribute name)) for these instances."""
    from minivlm.data import synthetic_text as gen

    nouns: dict[tuple[str, ...], str] = {}
    for cls in instances.class_names():
        for form in (cls, plural(cls)):
            nouns[tuple(form.lower().split())] = cls
        for one, many in gen.NOUNS.get(cls, ()):  # the synthetic world's other words for its classes
            nouns[tuple(one.split())] = nouns[tuple(many.split())] = cls
    words = {a.name.lower(): (a.group, a.name) for a in instances.attributes}
    for name, adjectives in gen.TEXTURE_ADJ.items():
        if words.get(name, ("", ""))[0] == "texture":
            words.update({adj: words[name] for adj in adjectives})
    return nouns, words


def mentions(caption: str, vocab: Vocabulary) -> list[tuple[str, dict[str, str]]]:
    """[(class, {group: attribute})] for each class noun of `caption`, longest noun first, with the attribute
    words that stand right before it."""
    nouns, attribute_words = vocab
    tokens = re.findall(r"[a-z]+(?:-[a-z]+)*", caption.lower())
    longest = max((len(n) for n in nouns), default=1)
    out, i = [], 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            cls = nouns.get(tuple(tokens[i:i + n]))
            if cls is not None:
                attrs: dict[str, str] = {}
                j = i - 1
                while j >= 0 and tokens[j] in attribute_words:
                    group, name = attribute_words[tokens[j]]
                    attrs.setdefault(group, name)
                    j -= 1
                out.append((cls, attrs))
                i += n
                break
        else:
            i += 1
    return out


def image_objects(instances: CocoInstances) -> dict[int, list[tuple[str, frozenset[str]]]]:
    """Image id -> [(class name, its attribute names)]."""
    cls = {c.id: c.name for c in instances.categories}
    attr = {a.id: a.name for a in instances.attributes}
    return {image: [(cls[a.category_id], frozenset(attr[i] for i in a.attribute_ids if i in attr)) for a in anns]
            for image, anns in instances.annotations.items()}


def caption_grounding(captions: Mapping[Hashable, str], objects: Mapping[Hashable, list[tuple[str, frozenset[str]]]],
                      vocab: Vocabulary) -> dict:
    """{"mentions", "class_precision", "<group>_mentions", "<group>_precision", ...} in percent, over the
    captions whose image is in `objects`."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, caption in captions.items():
        if image not in objects:
            continue
        present = objects[image]
        for cls, attrs in mentions(caption, vocab):
            hits["class"].append(any(c == cls for c, _ in present))
            for group, name in attrs.items():
                hits[group].append(any(c == cls and name in a for c, a in present))
    out: dict = {"mentions": len(hits["class"])}
    for key, h in sorted(hits.items(), key=lambda kv: kv[0] != "class"):
        if key != "class":
            out[f"{key}_mentions"] = len(h)
        out[f"{key}_precision"] = round(100.0 * sum(h) / len(h), 2) if h else None
    return out


def rotated(captions: Mapping[Hashable, str]) -> dict[Hashable, str]:
    """Each image given the caption of the next one (in key order): the same words on the wrong images, the
    precision a captioner would reach that names objects as often as this one but does not look."""
    keys = sorted(captions, key=str)
    return {k: captions[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)}
