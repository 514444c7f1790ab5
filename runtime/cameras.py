"""Several cameras per request: named images, their preprocessing and where they sit in the sequence.

A request holds one image (the AnyRes path, as the bundle was built) or several named ones:

    pipe.generate({"front": "f.jpg", "left": "l.jpg"}, "Is there a pedestrian on the left?", ...)
    python -m runtime --image front=f.jpg --image left=l.jpg --prompt "..."

Several images follow LLaDA-V's own convention (docs/cameras.md; its lmms-eval model file sets
image_aspect_ratio "pad" when a request has more than one image): each image is padded to a square
and becomes one view, 729 features + the image_newline, and the prompt holds one placeholder per
image; our chat turn names each camera on its own line ("front camera: <image>", runtime.tokens).
The sequence is [prefix | image 0 | text | image 1 | ... | suffix | response] (SequenceLayout).
"""

from __future__ import annotations

from runtime.anyres import PAD, ImageGeometry
from runtime.errors import LladaVError
from runtime.preprocess import ImageInput, prepare_image
from runtime.pruning import SequenceLayout
from runtime.tokens import IMAGE_PLACEHOLDER, PromptIds


RIG_NAMES = ("front", "left", "right", "rear", "front-left", "front-right")  # a rig's default camera names


def rig_names(n: int) -> list[str]:
    """Names for a rig of n cameras (RIG_NAMES, then camera7, camera8, ...)."""
    return [RIG_NAMES[i] if i < len(RIG_NAMES) else f"camera{i + 1}" for i in range(n)]


def named_images(image) -> list[tuple[str, object]]:
    """A request's images as (name, source) pairs: one image (a path or a PIL image) -> [("", image)];
    a dict {name: image} or a list of (name, image) pairs -> those, every name checked."""
    if isinstance(image, dict):
        pairs = list(image.items())
    elif isinstance(image, (list, tuple)):
        pairs = list(image)
        if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            raise LladaVError(f"images: got a list of {[type(p).__name__ for p in pairs]}; expected (camera name, "
                              "image) pairs")
    else:
        return [("", image)]
    if not pairs:
        raise LladaVError("images: none given; expected one image, or named images (camera name -> image)")
    names = [str(n) for n, _ in pairs]
    for name in names:
        if not name.strip() or IMAGE_PLACEHOLDER in name or "\n" in name or "=" in name:
            raise LladaVError(f"camera name {name!r}: expected a non-empty name on one line, without "
                              f"{IMAGE_PLACEHOLDER!r} or '=' (e.g. front, left)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LladaVError(f"camera name(s) {twice}: given twice; expected each camera once")
    return [(str(n), src) for n, src in pairs]


def parse_image_args(values: list[str]) -> object:
    """--image values -> what Pipeline.generate takes: one path, or [(camera, path), ...] from
    `name=path` values (several images must all be named)."""
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    unnamed = [v for v in values if "=" not in v]
    if unnamed:
        raise LladaVError(f"--image {unnamed[0]!r}: several images need a camera name each; expected NAME=PATH "
                          "(e.g. --image front=f.jpg --image left=l.jpg)")
    return [tuple(v.split("=", 1)) for v in values]


def prepare_images(views: list[tuple[str, object]], geometry: ImageGeometry, layout: str) -> list[ImageInput]:
    """One image in the bundle's `layout` (AnyRes or single), or several, each one padded view."""
    if len(views) == 1:
        return [prepare_image(views[0][1], geometry, layout)]
    out = []
    for name, source in views:
        try:
            out.append(prepare_image(source, geometry, PAD))
        except LladaVError as exc:  # which camera's image it was
            raise LladaVError(f"camera {name!r}: {exc}") from None
    return out


def request_layout(prompt: PromptIds, images: list[ImageInput], n_response: int) -> SequenceLayout:
    """Where the prompt's text, each image's visual tokens and the response sit in the sequence."""
    if prompt.n_images != len(images):
        raise LladaVError(f"prompt: {prompt.n_images} image placeholder(s) for {len(images)} image(s); expected "
                          "one per image")
    sizes = tuple(im.layout.num_visual_tokens for im in images)
    several = len(images) > 1
    return SequenceLayout(len(prompt.prefix), sum(sizes), len(prompt.suffix), n_response,
                          sizes if several else (), tuple(len(b) for b in prompt.between),
                          joined_fill([im.layout for im in images]))


def joined_fill(layouts) -> tuple[int, ...]:
    """The fill tokens (TileLayout.fill) of images laid out one after another, as visual indices of the
    whole request."""
    out, start = [], 0
    for layout in layouts:
        out += [start + i for i in layout.fill]
        start += layout.num_visual_tokens
    return tuple(out)
