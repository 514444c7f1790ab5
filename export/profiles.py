"""Engine profiles: the min/opt/max of every dynamic axis, derived from the image layout and lengths.

Two optimization profiles per decoder engine (one graph, its weights held once; index = TensorRT's
profile index, runtime.bundle.FULL_PROFILE / CACHED_PROFILE):

    full    step 1, refreshes and uncached steps: no cached rows (past = 0). Its range covers the
            full step-1 sequence and the reduced one (P can change at run time; P=0 is the unpruned
            baseline); tuned (opt) at the reduced length, which every uncached step runs at.
    cached  a cached step (docs/caching.md): the window's rows (a block, or a block and what
            follows it: at most the response) against the other rows' cached keys and values;
            tuned at one block of `opt_block` rows against the rest of the reduced sequence.

The vision engine has the full profile only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from export.subgraphs import SubgraphSpec, model_dims
from runtime.anyres import ANYRES, LAYOUTS, SINGLE, max_visual_tokens, plan_tiles
from runtime.errors import expect
from runtime.pruning import DEFAULT_PIVOTS, pruned_count

@dataclass(frozen=True)
class ProfileSettings:
    """What the engines must accept: image layout and prompt/response lengths."""

    layout: str = ANYRES
    max_text_tokens: int = 256  # chat template + question, without the image
    opt_text_tokens: int = 96
    max_response: int = 128
    opt_response: int = 32
    opt_image: tuple[int, int] = (1920, 1080)  # the camera frame the engines are tuned for
    max_batch: int = 1  # 2 allows classifier-free guidance
    # the cached profile's opt rows: one response block (dual cache), at most max_response; None: 32, or
    # max_response when shorter (a block never exceeds the response)
    opt_block: int | None = None
    # the largest camera frame (anyres): tile and visual-token maxima from its plan instead of the worst
    # case over every AnyRes grid (37 tiles); frames whose plan needs more are refused at run time
    max_image: tuple[int, int] | None = None
    # the duplicate rule's pivots (runtime.pruning) the similarity engine accepts, at most
    max_pivots: int = 32
    # the most cameras one request may hold (runtime.cameras): the vision engine's tiles and the sequence
    # profiles also cover that many padded views of 729 tokens + the image_newline each
    cameras: int = 1

    @property
    def block_rows(self) -> int:
        """The cached profile's opt rows: opt_block, or 32 capped at max_response when not given."""
        return self.opt_block if self.opt_block is not None else min(32, self.max_response)

    @staticmethod
    def from_dict(d: dict) -> "ProfileSettings":
        """A manifest's `profiles.settings` back (frame sizes are lists there); keys it lacks take defaults."""
        d = dict(d)
        for key in ("opt_image", "max_image"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return ProfileSettings(**d)

    def validate(self) -> "ProfileSettings":
        expect(self.layout in LAYOUTS, f"layout: got {self.layout!r}; expected one of {LAYOUTS}")
        for lo, hi in (("opt_text_tokens", "max_text_tokens"), ("opt_response", "max_response")):
            a, b = getattr(self, lo), getattr(self, hi)
            expect(1 <= a <= b, f"{lo}={a}, {hi}={b}: expected 1 <= {lo} <= {hi}")
        expect(self.opt_block is None or 1 <= self.opt_block <= self.max_response,
               f"opt_block={self.opt_block}, max_response={self.max_response}: expected 1 <= opt_block <= max_response "
               "(the rows of one response block; a larger one was clamped silently before)")
        expect(isinstance(self.max_pivots, int) and self.max_pivots >= DEFAULT_PIVOTS,
               f"max_pivots: got {self.max_pivots!r}; expected an integer >= {DEFAULT_PIVOTS} (the default pivots)")
        expect(self.max_batch in (1, 2), f"max batch: got {self.max_batch}; expected 1, or 2 for CFG")
        expect(isinstance(self.cameras, int) and self.cameras >= 1,
               f"cameras: got {self.cameras!r}; expected an integer >= 1 (the most images per request)")
        expect(self.max_image is None or (len(self.max_image) == 2 and min(self.max_image) >= 1),
               f"max_image: got {self.max_image!r}; expected (width, height) in pixels")
        return self


def image_extent(cfg, settings: ProfileSettings) -> tuple[tuple[int, int], tuple[int, int]]:
    """((tiles, visual tokens) at the opt image, (tiles, visual tokens) at the maxima) for the layout:
    the maxima from max_image's plan, or the worst case over every AnyRes grid. A rig (cameras > 1):
    tuned at its `cameras` padded views (730 tokens each), its maxima at least those."""
    opt, most = one_image_extent(cfg, settings)
    if settings.cameras == 1:
        return opt, most
    rig = (settings.cameras, settings.cameras * (cfg.geometry.tokens_per_tile + 1))
    return rig, (max(most[0], rig[0]), max(most[1], rig[1]))


def one_image_extent(cfg, settings: ProfileSettings) -> tuple[tuple[int, int], tuple[int, int]]:
    g = cfg.geometry
    if settings.layout == SINGLE:
        return (1, g.tokens_per_tile), (1, g.tokens_per_tile)
    opt = plan_tiles(settings.opt_image, g, ANYRES)
    if settings.max_image:
        top = plan_tiles(settings.max_image, g, ANYRES)
        most = (top.num_tiles, top.num_visual_tokens)
    else:
        most = (1 + g.max_grid_tiles, max_visual_tokens(g, ANYRES))
    return (opt.num_tiles, opt.num_visual_tokens), most


def axis_ranges(cfg, settings: ProfileSettings, p: float) -> dict[str, tuple[int, int, int]]:
    """Named axis -> (min, opt, max) of the full profile."""
    (tiles_opt, v_opt), (tiles_max, v_max) = image_extent(cfg, settings)
    if settings.max_image:
        size = lambda wh: "x".join(map(str, wh))  # noqa: E731
        expect(v_opt <= v_max and tiles_opt <= tiles_max,
               f"opt_image {size(settings.opt_image)}: {v_opt} visual tokens in {tiles_opt} tiles; max_image "
               f"{size(settings.max_image)} allows {v_max} in {tiles_max} (tune for a frame the maxima admit)")
    full_opt = settings.opt_text_tokens + v_opt + settings.opt_response  # step 1's length at the opt image
    seq_max = settings.max_text_tokens + v_max + settings.max_response
    return {
        "tiles": (1, tiles_opt, tiles_max),
        "batch": (1, 1, settings.max_batch),
        "seq": (1, full_opt - pruned_count(v_opt, p), seq_max),  # tuned at the reduced length
        "query": (1, settings.opt_response, settings.max_text_tokens + settings.max_response),
        "rows": (1, settings.opt_response, settings.max_response),
        "past": (0, 0, 0),  # no cached K/V rows: those steps run the cached profile
        # the similarity graph: step 1's full sequence and its visual tokens (tuned at the opt image, whatever P)
        "full_seq": (1, full_opt, seq_max),
        "visual": (1, v_opt, v_max),
        "pivots": (1, DEFAULT_PIVOTS, settings.max_pivots),
    }


def cached_axis_ranges(full: dict, settings: ProfileSettings) -> dict[str, tuple[int, int, int]]:
    """Named axis -> (min, opt, max) of the cached profile, from the full profile's: `seq` rows
    recomputed (at most the response), `past` rows reused (at least one: the prompt), one score row
    (saliency unused)."""
    block = settings.block_rows
    return {**full,
            "seq": (1, block, settings.max_response),
            "query": (1, 1, 1),
            "rows": (1, block, settings.max_response),
            "past": (1, max(1, full["seq"][1] - block), full["seq"][2])}


def profile_ranges(cfg, settings: ProfileSettings, p: float) -> list[dict[str, tuple[int, int, int]]]:
    """[full, cached] axis ranges, in TensorRT's profile order."""
    full = axis_ranges(cfg, settings, p)
    return [full, cached_axis_ranges(full, settings)]


def full_sequence_opt(cfg, settings: ProfileSettings) -> int:
    """The step-1 sequence length at the opt image and lengths (inside the seq range): the full_seq axis's opt."""
    return axis_ranges(cfg, settings, 0.0)["full_seq"][1]


def input_shapes(spec: SubgraphSpec, cfg, ranges: list[dict], k: int | None = None) -> list[dict]:
    """Per optimization profile {input: {"min": shape, "opt": shape, "max": shape}} for one subgraph
    (k: the pruning layer); graphs without cached K/V inputs (vision) have the full profile only."""
    profiles = ranges if "past_keys" in spec.input_names else ranges[:1]
    return [profile_shapes(spec, cfg, r, k) for r in profiles]


def profile_shapes(spec: SubgraphSpec, cfg, ranges: dict, k: int | None) -> dict[str, dict[str, list[int]]]:
    out = {}
    for t in spec.inputs:
        out[t.name] = {}
        for i, which in enumerate(("min", "opt", "max")):
            dims = {**model_dims(cfg, k), **{a: r[i] for a, r in ranges.items()}}
            out[t.name][which] = list(t.resolve(dims, "float32")[1])
    return out


# Two sizes of every dynamic axis for validation checks: small, and larger (reduced-sequence-like).
# The first is the export's example: its past is not 0, so the exporter sees a real K/V axis.
VALIDATION_SIZES = ({"tiles": 1, "batch": 1, "seq": 48, "query": 8, "rows": 8, "past": 7, "full_seq": 48, "visual": 40,
                     "pivots": 8},
                    {"tiles": 2, "batch": 2, "seq": 96, "query": 3, "rows": 5, "past": 0, "full_seq": 96, "visual": 64,
                     "pivots": 3})


def validation_axes(ranges: dict) -> list[dict[str, int]]:
    """VALIDATION_SIZES clamped into one profile's ranges, so an engine can run them: with one tile
    (--layout single), a short --max-response or without --cfg, the sizes shrink to what it accepts.
    Query, logit and visual rows index the sequence, so they never exceed it; pivots index the visual rows."""
    small, large = ({a: min(max(v, ranges[a][0]), ranges[a][2]) for a, v in want.items()} for want in VALIDATION_SIZES)
    for a, (lo, _, hi) in ranges.items():
        if small[a] == large[a] and lo < hi:  # clamping merged them: still try two sizes of a dynamic axis
            small[a] = lo if small[a] != lo else hi
    for axes in (small, large):
        for a in ("query", "rows"):
            axes[a] = min(axes[a], axes["seq"])
        axes["visual"] = min(axes["visual"], axes["full_seq"])
        axes["pivots"] = min(axes["pivots"], axes["visual"])
    return [small, large]


def settings_dict(settings: ProfileSettings) -> dict:
    d = asdict(settings)
    d["opt_image"] = list(settings.opt_image)
    d["max_image"] = list(settings.max_image) if settings.max_image else None
    return d
