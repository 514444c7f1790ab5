"""The engine runs one answer really makes, from a bundle's manifest (no TensorRT, no torch).

For an image size, a prompt, S steps and a response of G tokens, with V visual tokens, T text
tokens, n = T + V + G and n'(P) = n - floor(V * P / 100):

    vision        once, at the image's tile count
    decoder_pre   step 1 on the full sequence n (score rows: the G masked response rows; 1 row at P=0)
    similarity    step 1, the duplicate rule only: the pivots' similarities to the V visual tokens
    decoder_post  step 1 on the reduced sequence n'(P), logits for the G response rows
    decoder_pre   each later step on n'(P) (1 score row: its saliency is unused)
    decoder_post  each later step on n'(P)

so one answer costs  vision + pre(n) [+ similarity] + post(n') + (S - 1) * (pre(n') + post(n')).
With a dual KV cache (docs/caching.md; the response one block) the later steps recompute only the
G response rows against the other n'(P) - G rows' cached K/V:

    decoder_pre, decoder_post   each later step on G rows, past = n'(P) - G

so  vision + pre(n) + post(n') + (S - 1) * (pre_cached + post_cached).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.anyres import PAD, plan_tiles
from runtime.bundle import CACHED_PROFILE, FULL_PROFILE, Manifest
from runtime.errors import LladaVError
from runtime.pruning import DEFAULT_PIVOTS, pruned_count


@dataclass(frozen=True)
class Generation:
    """The sizes of one answer."""

    image: tuple[int, int]
    tiles: int
    visual: int
    text: int
    response: int
    steps: int
    cameras: int = 1  # frames of `image`'s size, one padded view each when several

    @property
    def full(self) -> int:
        return self.text + self.visual + self.response

    def reduced(self, p: float) -> int:
        return self.full - pruned_count(self.visual, p)


@dataclass(frozen=True)
class Case:
    """One engine at one set of input shapes."""

    subgraph: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (input, shape), in the graph's input order

    @property
    def label(self) -> str:
        dims = dict(self.shapes)
        if self.subgraph == "vision":
            return f"vision tiles={dims['pixel_values'][0]}"
        if self.subgraph == "similarity":
            return f"similarity seq={dims['hidden_states'][1]} visual={dims['visual_rows'][0]} pivots={dims['pivots'][0]}"
        rows = dims.get("score_rows", dims.get("logit_rows"))[0]
        past = dims["past_keys"][3] if "past_keys" in dims else 0
        return f"{self.subgraph} seq={dims['position_ids'][1]} rows={rows}" + (f" past={past}" if past else "")

    @property
    def profile(self) -> int:
        """The engine's optimization profile for these shapes: cached K/V rows only run in the cached one."""
        dims = dict(self.shapes)
        return CACHED_PROFILE if "past_keys" in dims and dims["past_keys"][3] > 0 else FULL_PROFILE


@dataclass(frozen=True)
class AnswerCases:
    """The cases one answer at one P runs, and how many times each."""

    p: float
    vision: Case
    pre_step1: Case
    post: Case  # every step, step 1 included
    pre_later: Case
    pre_cached: Case  # a later step with a dual cache: the response rows against the others' K/V
    post_cached: Case
    rule: Case | None = None  # step 1's similarity run (the duplicate rule, tokens dropped)

    @property
    def cases(self) -> tuple[Case, ...]:
        first = (self.vision, self.pre_step1) + ((self.rule,) if self.rule else ())
        return first + (self.post, self.pre_later, self.pre_cached, self.post_cached)

    def _step1_ms(self, ms: dict[Case, float]) -> float:
        return ms[self.vision] + ms[self.pre_step1] + (ms[self.rule] if self.rule else 0.0) + ms[self.post]

    def predicted_ms(self, ms: dict[Case, float], steps: int) -> float:
        return self._step1_ms(ms) + (steps - 1) * (ms[self.pre_later] + ms[self.post])

    def predicted_cached_ms(self, ms: dict[Case, float], steps: int) -> float:
        """The same answer with a dual cache: step 1 refreshes (and prunes), every later step is cached."""
        return self._step1_ms(ms) + (steps - 1) * (ms[self.pre_cached] + ms[self.post_cached])


def generation(manifest: Manifest, image: tuple[int, int], text_tokens: int, steps: int, response: int,
               cameras: int = 1) -> Generation:
    """One answer's sizes: one image in the bundle's layout, or `cameras` frames of that size, each one
    padded view (runtime.cameras)."""
    layout = manifest.profiles["settings"]["layout"] if cameras == 1 else PAD
    tiles = plan_tiles(image, manifest.image_geometry(), layout)
    return Generation(tuple(image), cameras * tiles.num_tiles, cameras * tiles.num_visual_tokens, text_tokens,
                      response, steps, cameras)


def answer_cases(manifest: Manifest, g: Generation, p: float, rule: str | None = None,
                 pivots: int = DEFAULT_PIVOTS) -> AnswerCases:
    """rule: the pruning rule (default: the bundle's); the duplicate rule adds step 1's similarity run."""
    dims, side = manifest.model_dims(), manifest.geometry["image_size"]
    rule = manifest.rule if rule is None else rule
    d = dims["D"]
    n, n_red = g.full, g.reduced(p)

    def decoder(name: str, seq: int, rows: int, past: int = 0) -> Case:
        first, rows_input = ("inputs_embeds", "score_rows") if name == "decoder_pre" else ("hidden_states", "logit_rows")
        kv = (dims["Lpre" if name == "decoder_pre" else "Lpost"], 1, dims["H"], past, dims["Dh"])
        return Case(name, ((first, (1, seq, d)), ("position_ids", (1, seq)), (rows_input, (rows,)),
                           ("past_keys", kv), ("past_values", kv)))

    return AnswerCases(
        p,
        Case("vision", (("pixel_values", (g.tiles, 3, side, side)),)),
        decoder("decoder_pre", n, g.response if pruned_count(g.visual, p) > 0 else 1),
        decoder("decoder_post", n_red, g.response),
        decoder("decoder_pre", n_red, 1),
        decoder("decoder_pre", g.response, 1, past=n_red - g.response),
        decoder("decoder_post", g.response, g.response, past=n_red - g.response),
        Case("similarity", (("hidden_states", (1, n, d)), ("visual_rows", (g.visual,)), ("pivots", (min(pivots, g.visual),))))
        if rule == "duplicate" and pruned_count(g.visual, p) > 0 else None,
    )


def unique_cases(answers: list[AnswerCases]) -> list[Case]:
    seen: dict[Case, None] = {}
    for a in answers:
        for c in a.cases:
            seen.setdefault(c, None)
    return list(seen)


def check_inside_profile(manifest: Manifest, case: Case) -> None:
    """A shape outside the engine's profile is an error before anything runs."""
    entry = manifest.subgraphs[case.subgraph]
    if case.profile >= len(entry.shapes):
        raise LladaVError(f"{case.subgraph}: a cached step needs the engine's cached-step profile; the bundle has "
                          f"{len(entry.shapes)} profile(s) (rebuild it)")
    for name, shape in case.shapes:
        lo, hi = entry.shapes[case.profile][name]["min"], entry.shapes[case.profile][name]["max"]
        if not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            raise LladaVError(f"{case.subgraph}: input '{name}' would be {shape} for this image and prompt; the "
                              f"bundle's profile {case.profile} allows {tuple(lo)} to {tuple(hi)} (a smaller --image-size, or "
                              "rebuild the bundle with larger maxima)")


def feeds(case: Case, float_dtype: np.dtype, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid inputs for a case: small random activations, positions 0..n-1, row indices inside the
    sequence (the response rows at its end). Random indices would read outside the sequence."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in case.shapes:
        if name == "position_ids":
            out[name] = np.broadcast_to(np.arange(shape[1], dtype=np.int64), shape).copy()
        elif name in ("score_rows", "logit_rows"):
            seq = dict(case.shapes)["position_ids"][1]
            out[name] = np.arange(seq - shape[0], seq, dtype=np.int64)
        elif name in ("visual_rows", "pivots"):  # the first rows stand for the visual ones: same work
            out[name] = np.arange(shape[0], dtype=np.int64)
        else:
            out[name] = (0.5 * rng.standard_normal(shape)).astype(float_dtype)
    return out
