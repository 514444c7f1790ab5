"""Training and validation examples for the miniature: a scene's pixels and its six questions as
token ids, the SFT response (answer, <|eot_id|>, then <|endoftext|> up to a fixed length, or with
`eot_padding` <|eot_id|> again: docs/cameras.md), and
per visual token what the scene holds there (the vision tower's auxiliary labels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from miniature.scenes import COLORS, LANES, LIGHTS, LIMITS, RigScene, Scene, questions, rig, rig_questions, scene
from runtime.anyres import ANYRES, PAD, ImageGeometry, TileLayout
from runtime.preprocess import prepare_image
from runtime.pruning_map import token_boxes, tokens_covering
from runtime.tokens import PromptIds, TextTokenizer

VALIDATION_SEEDS = range(9_990_000, 9_990_040)  # inside the training range, never reached by a run
IGNORE = -100  # a label no loss counts: image_newline tokens, which cover no image cell

# What each visual token's image cell holds, one classification per attribute; class 0 = nothing of
# that kind there. Objects are labelled in drawing order, so a nearer object overwrites a farther one.
TOKEN_ATTRIBUTES = {
    "light": ("none", *LIGHTS),  # the lit lamp's colour
    "sign": ("none", *map(str, LIMITS)),
    "vehicle": ("none", *COLORS),
    "lane": ("none", *LANES),  # the vehicle's lane
    "pedestrian": ("none", "left", "right"),  # the pedestrian's side of the road
}


def _object_classes(o) -> dict[str, int]:
    cls = {attr: names.index for attr, names in TOKEN_ATTRIBUTES.items()}
    if o.kind == "light":
        return {"light": cls["light"](o.color)}
    if o.kind == "sign":
        return {"sign": cls["sign"](str(o.value))}
    if o.kind == "vehicle":
        return {"vehicle": cls["vehicle"](o.color), "lane": cls["lane"](o.lane)}
    return {"pedestrian": cls["pedestrian"](o.side)}


def token_labels(s: Scene, layout: TileLayout, side: int) -> np.ndarray:
    """(V, len(TOKEN_ATTRIBUTES)) int64 class per visual token and attribute, from the scene's
    boxes (a token holds an object when its cell holds one of the object's pixel centres, the rule
    of runtime.pruning_map.tokens_covering); IGNORE on image_newline tokens."""
    names = list(TOKEN_ATTRIBUTES)
    out = np.full((layout.num_visual_tokens, len(names)), IGNORE, np.int64)
    out[[i for i, *_ in token_boxes(layout, side)]] = 0
    for o in s.objects:
        cov = tokens_covering(layout, side, o.box.xyxy)
        for attr, c in _object_classes(o).items():
            out[cov, names.index(attr)] = c
    return out


@dataclass(frozen=True)
class Example:
    """One scene (or camera rig): its tiles and, per question, the prompt ids and the target response ids."""

    seed: int
    pixels: np.ndarray  # (T, 3, S, S) float32: every image's tiles, image after image
    layouts: tuple[TileLayout, ...]  # one per image (a rig: one padded view per camera)
    questions: tuple  # Question, or RigQuestion for a rig
    prompts: tuple[PromptIds, ...]
    responses: tuple[tuple[int, ...], ...]  # each exactly response_length ids
    labels: np.ndarray  # (V, attributes) token_labels, image after image
    cameras: tuple[str, ...] = ()  # a rig's camera names

    def alone(self, k: int) -> "Example":
        """The same scene asking only its question k."""
        return replace(self, questions=(self.questions[k],), prompts=(self.prompts[k],), responses=(self.responses[k],))

    def asking(self, kinds) -> "Example":
        """The same scene asking only the questions of these kinds (Question.report_kind), in order."""
        keep = [i for i, q in enumerate(self.questions) if q.report_kind in kinds]
        return replace(self, questions=tuple(self.questions[i] for i in keep),
                       prompts=tuple(self.prompts[i] for i in keep), responses=tuple(self.responses[i] for i in keep))


class Encoder:
    """Turns scenes into Examples with one tokenizer and one image geometry."""

    def __init__(self, tokenizer: TextTokenizer, geometry: ImageGeometry, response_length: int,
                 eot_padding: bool = False):
        self.tok, self.geometry, self.response_length = tokenizer, geometry, response_length
        self.pad = tokenizer.ids.eot if eot_padding else tokenizer.ids.eos
        self._prompt = lru_cache(maxsize=None)(tokenizer.encode_prompt)

    def response(self, answer: str) -> tuple[int, ...]:
        ids = self.tok.encode(answer) + [self.tok.ids.eot]
        assert len(ids) <= self.response_length, (answer, ids)
        return tuple(ids + [self.pad] * (self.response_length - len(ids)))

    def example(self, s: Scene, text: bool = True, layout: str = ANYRES) -> Example:
        """The scene's example; without text, no questions (the vision stage needs none). layout PAD:
        the frame seen as one padded view, as each camera of a rig is (training and diagnosis only:
        a one-image request is AnyRes)."""
        image = prepare_image(s.image, self.geometry, layout)
        qs = tuple(questions(s)) if text else ()
        return Example(
            s.seed,
            image.pixel_values,
            (image.layout,),
            qs,
            tuple(self._prompt(q.text) for q in qs),
            tuple(self.response(q.answer) for q in qs),
            token_labels(s, image.layout, self.geometry.side),
        )

    def examples(self, seeds, text: bool = True, layout: str = ANYRES) -> list[Example]:
        return [self.example(scene(int(seed)), text, layout) for seed in seeds]

    def rig_example(self, r: RigScene, kinds: tuple[str, ...] | None = None) -> Example:
        """A camera rig's example: one padded view per camera (runtime.cameras), its questions
        (kinds: per camera, which it asks; scenes.rig_questions)."""
        names = tuple(r.cameras)
        images = [prepare_image(s.image, self.geometry, PAD) for s in r.cameras.values()]
        qs = tuple(rig_questions(r, kinds))
        return Example(
            r.seed,
            np.concatenate([im.pixel_values for im in images]),
            tuple(im.layout for im in images),
            qs,
            tuple(self.tok.encode_prompt(q.text, list(names)) for q in qs),
            tuple(self.response(q.answer) for q in qs),
            np.concatenate([token_labels(s, im.layout, self.geometry.side) for s, im in zip(r.cameras.values(), images)]),
            names,
        )

    def rig_examples(self, seeds, kinds=None) -> list[Example]:
        """kinds: None (the held-out rule) or a function rig -> its per-camera kinds."""
        return [self.rig_example(r, kinds(r) if kinds else None) for r in map(rig, map(int, seeds))]


def training_seeds(run_seed: int, first: int, count: int) -> np.ndarray:
    """The scenes a run sees, in order: a run-specific stretch of the training range."""
    start = 1_000_000 * (run_seed % 9)
    return np.arange(start + first, start + first + count)
