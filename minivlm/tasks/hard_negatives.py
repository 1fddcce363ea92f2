"""Hard negatives for image-text matching: the image's own caption with one word swapped for another of its
kind ("a red circle" -> "a blue circle", "three shapes" -> "five shapes", "left of" -> "right of").

OSCAR's ITM negatives are other images' captions, which differ from the true one in almost every word: the
model tells them apart from the tags alone, without checking any word against the regions. A caption that is
wrong in one colour, count, object or side can only be told apart by binding that word to what the regions
show, which is what VQA's yes/no questions and NLVR2's statements ask ("is the circle red?", "the left image
has exactly three stars"). Captions with a swapped word are the negatives of ALBEF-style hard ITM and of
NegCLIP's swapped-word captions; here a swap keeps the sentence grammatical by construction (a word for a word
of the same family, singular for singular, plural for plural).

Families come from the data: the detector's class names (singular and plural), each attribute group's names
(colour, size, texture, ...; all attributes as one family when the data gives no groups), number words, and
the spatial opposites. A swapped class never names a tag of the image, so the negative is false against the
detector's own reading; a swapped attribute or number is false unless another object happens to fit it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Sequence

import torch

from minivlm.eval.caption_grounding import plural

NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below", "below": "above",
             "upper": "lower", "lower": "upper"}


@dataclass(frozen=True)
class WordFamilies:
    """Groups of words that may replace one another in a caption; `classes` are the families of object names."""

    families: tuple[tuple[str, ...], ...]
    classes: frozenset[int]  # indices into `families` whose words name objects (never swapped to an image's tag)

    @classmethod
    def build(cls, class_names: Sequence[str], attribute_groups: Mapping[str, Sequence[str]] | None = None,
              attribute_names: Sequence[str] = ()) -> "WordFamilies":
        """Families for a dataset: its class names, its attribute groups (or all `attribute_names` as one
        family), numbers and opposites."""
        names = [n.lower() for n in class_names if n]
        families = [tuple(names), tuple(plural(n) for n in names)]
        groups = attribute_groups or ({"attribute": attribute_names} if attribute_names else {})
        families += [tuple(a.lower() for a in words) for words in groups.values()]
        families.append(NUMBERS)
        families += [(a, b) for a, b in OPPOSITES.items() if a < b]
        return cls(tuple(f for f in families if len(set(f)) > 1), frozenset({0, 1}))

    @cached_property
    def patterns(self) -> tuple[re.Pattern, ...]:
        """One regular expression per family, longest word first, compiled once (`swap` runs per training item)."""
        return tuple(re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b",
                                flags=re.IGNORECASE) for words in self.families)

    def swap(self, text: str, avoid: Iterable[str] = (), generator: torch.Generator | None = None) -> str | None:
        """`text` with one of its family words (picked at random) replaced by another word of that family, not
        in `avoid` for object names; None when the text has no word that can be swapped."""
        avoid = {a.lower() for a in avoid} | {plural(a.lower()) for a in avoid}
        spots = []  # (start, end, family index)
        for f, pattern in enumerate(self.patterns):
            spots += [(m.start(), m.end(), f) for m in pattern.finditer(text)]
        order = torch.randperm(len(spots), generator=generator).tolist()
        for k in order:
            start, end, f = spots[k]
            word = text[start:end].lower()
            choices = [w for w in self.families[f] if w != word and not (f in self.classes and w in avoid)]
            if not choices:
                continue
            new = choices[int(torch.randint(len(choices), (1,), generator=generator))]
            if text[start].isupper():
                new = new[0].upper() + new[1:]
            return text[:start] + new + text[end:]
        return None
