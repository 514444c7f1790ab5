"""The denoising loop over the split subgraphs, with step-1 pruning: the part that runs on the car.

What each step computes is `runtime.steps.StepPlan`'s, the plan the reference generator follows
too; this module does the tensor work. Vision runs once. Step 1 runs decoder_pre on the full
sequence, keeps the visual tokens the plan's rule chooses (from decoder_pre's saliency, and for the
duplicate rule the similarity graph's pivot similarities, computed where decoder_pre left its
hidden states), gathers hidden states and position ids, and runs decoder_post on the reduced
sequence. Every later step runs both halves on the reduced sequence; only the response rows of
the input change. With a KV cache (`runtime.caching`, docs/caching.md) refreshes keep every
layer's keys and values and the steps between them recompute only the block's rows (dual) or the
block and what follows (prefix). The unmasking rule is `runtime.schedule.denoise`, shared with
the reference generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from runtime.anyres import TileLayout
from runtime.bundle import CACHED_PROFILE, Bundle, Manifest
from runtime.caching import CacheSettings, CacheWindow
from runtime.errors import expect
from runtime.merge import merge_tiles
from runtime.cameras import named_images, prepare_images, request_layout
from runtime.preprocess import ImageInput
from runtime.pruning import PruneSettings, SequenceLayout
from runtime.backends import make_runners
from runtime.schedule import DenoiseResult, GenerationSettings, denoise
from runtime.steps import FIRST, FULL, StepPlan
from runtime.tokens import PromptIds


@dataclass
class StepTrace:
    step: int
    seq_len: int  # tokens entering decoder_post (after pruning in step 1)
    rows: int  # rows the step computed: seq_len on a refresh or uncached step, fewer on a cached one
    pre_ms: float  # decoder_pre, and in step 1 the similarity graph (the duplicate rule)
    post_ms: float
    other_ms: float  # embedding, gathers, unmasking rule: time outside the backends


@dataclass
class RuntimeResult:
    text: str
    answer_ids: list[int]
    denoise: DenoiseResult
    layout: SequenceLayout
    tile_layout: TileLayout
    kept_visual: np.ndarray
    saliency: np.ndarray | None
    vision_ms: float
    steps: list[StepTrace] = field(default_factory=list)
    total_ms: float = 0.0
    cameras: list[str] = field(default_factory=list)  # the images' names ([""]: one unnamed image)
    tile_layouts: list[TileLayout] = field(default_factory=list)  # per image (tile_layout: the first's)


def sized_for(settings: dict) -> str:
    """What a bundle whose engines were sized for one camera frame adds to a too-large-image error."""
    size = settings.get("max_image")
    return f" (its engines were sized for {size[0]}x{size[1]} frames: --max-image)" if size else ""


class Pipeline:
    """A bundle (runtime.bundle.Bundle) with one backend's runners."""

    def __init__(self, bundle, backend: str = "onnxruntime", model_dir=None, device: str = "cpu",
                 expect_k: int | None = None, expect_model: str | None = None, verify: str = "sizes",
                 runner_factory=None, kv_cache: bool = True):
        """bundle: an opened Bundle, or its directory (opened here with verify, expect_k and expect_model).
        runner_factory(bundle) -> {subgraph: Runner} replaces the backend's own runners (the tests'
        recorded TensorRT backend, calib/'s recorders). kv_cache=False: generations run uncached only,
        and the TensorRT backend does not allocate the cached-step profile's buffers (the K/V cache:
        2.1-2.5 GB for the 8B)."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle(bundle, verify, expect_k, expect_model)
        self.bundle, self.manifest = bundle, bundle.manifest
        self.tokenizer, self.float_dtype = bundle.tokenizer, bundle.float_dtype
        self.embed, self.newline, self.geometry = bundle.embed, bundle.newline, bundle.geometry
        if runner_factory is None:
            self.runners = make_runners(backend, bundle, model_dir, device, kv_cache)
        else:
            self.runners = runner_factory(bundle)
        self.backend, self.kv_cache = backend, kv_cache

    def __enter__(self):
        for r in self.runners.values():
            r.activate()
        return self

    def __exit__(self, *exc):
        for r in self.runners.values():
            r.deactivate()

    # ------------------------------------------------------------ inputs

    def prepare(self, image, question: str, gen: GenerationSettings, prune: PruneSettings) -> "Request":
        """Tokenize, tile and check every length against the bundle's profiles before running anything.
        image: one image, or named ones (runtime.cameras). Needs no engine: a replay prepares the next
        request on another thread while the engines answer this one."""
        views = named_images(image)
        cameras = [name for name, _ in views]
        prompt = self.check_request(cameras if len(views) > 1 else None, question, gen, prune)
        images = prepare_images(views, self.geometry, self.manifest.profiles["settings"]["layout"])
        lay = request_layout(prompt, images, gen.gen_length)
        self._check_limits(prompt, images, lay, gen, prune)
        return Request(prompt, images, lay, cameras)

    def check_request(self, cameras: list[str] | None, question: str, gen: GenerationSettings,
                      prune: PruneSettings) -> PromptIds:
        """What can be checked before any image: the settings, the prompt for these cameras (None: one
        image) and the number of cameras. Returns the prompt's ids."""
        gen.validate()
        prune.validate(self.manifest.n_layers)
        prompt = self.tokenizer.encode_prompt(question, cameras)
        if cameras:
            self._check_cameras(cameras)
        return prompt

    def _check_cameras(self, cameras: list[str]) -> None:
        """More cameras than the vision engine takes views is an error before any image is read."""
        most = self.manifest.profiles["axes"]["tiles"][2]
        expect(len(cameras) <= most, f"images: {len(cameras)} cameras ({', '.join(cameras)}); the bundle's vision "
                                     f"engine takes at most {most} views per request (rebuild with --cameras {len(cameras)})")

    def _check_limits(self, prompt: PromptIds, images: list[ImageInput], lay: SequenceLayout,
                      gen: GenerationSettings, prune: PruneSettings) -> None:
        prof, axes = self.manifest.profiles["settings"], self.manifest.profiles["axes"]
        n_text, tiles = prompt.n_text, sum(im.layout.num_tiles for im in images)
        what = "image" if len(images) == 1 else f"{len(images)} images"
        batch = 2 if gen.cfg_scale > 0 else 1
        limits = [
            (n_text <= prof["max_text_tokens"], f"prompt: {n_text} text tokens; the bundle's profile allows "
                                                f"{prof['max_text_tokens']} (rebuild with --max-text-tokens)"),
            (gen.gen_length <= axes["rows"][2], f"gen_length: {gen.gen_length}; the bundle's profile allows "
                                               f"{axes['rows'][2]} (rebuild with --max-response)"),
            (tiles <= axes["tiles"][2], f"{what}: {tiles} tiles; the bundle allows {axes['tiles'][2]}{sized_for(prof)}"),
            (lay.total <= axes["seq"][2], f"sequence: {lay.total} tokens (prompt {n_text}, {what} "
                                          f"{lay.n_visual}, response {gen.gen_length}); the bundle's profile allows "
                                          f"{axes['seq'][2]}{sized_for(prof)}"),
            (batch <= axes["batch"][2], "cfg_scale > 0 needs batch 2; this bundle was built without --cfg"),
            (prune.rule != "duplicate" or prune.pivots <= axes["pivots"][2],
             f"pivots: {prune.pivots}; the bundle's similarity engine allows {axes['pivots'][2]} (rebuild with --max-pivots)"),
        ]
        for ok, message in limits:
            expect(ok, message)

    def prompt_embeddings(self, prompt: PromptIds, images):
        """(N_prompt, D) [prefix | visual | suffix] (several images: their segments with the text between
        them) and the vision time. images: an ImageInput or a list of them; one vision run for all."""
        images = images if isinstance(images, list) else [images]
        runner = self.runners["vision"]
        out = runner.infer({"pixel_values": np.concatenate([im.pixel_values for im in images]).astype(self.float_dtype)})
        feats, visuals, start = np.asarray(out["image_features"]), [], 0
        for im in images:
            visuals.append(merge_tiles(feats[start:start + im.layout.num_tiles], im.layout, self.newline))
            start += im.layout.num_tiles
        parts = [self.embed[list(seg)] if isinstance(seg, tuple) else visuals[seg].astype(self.float_dtype)
                 for seg in prompt.segments()]
        return np.concatenate(parts).astype(self.float_dtype), runner.last_ms()

    # ------------------------------------------------------------ generation

    def generate(self, image, question: str, gen: GenerationSettings, prune: PruneSettings,
                 on_step=None, cache: CacheSettings | None = None) -> RuntimeResult:
        """on_step(step, steps, unmasked, masked_left) after every denoising step (progress); cache:
        block KV caching (runtime.caching; None: uncached)."""
        start = time.perf_counter()
        return self.answer(self.prepare(image, question, gen, prune), gen, prune, on_step, cache, start)

    def answer(self, request: "Request", gen: GenerationSettings, prune: PruneSettings, on_step=None,
               cache: CacheSettings | None = None, start: float | None = None) -> RuntimeResult:
        """Run a prepared request (prepare, with the same gen and prune). total_ms counts from `start`
        (perf_counter seconds; default: now)."""
        start = time.perf_counter() if start is None else start
        cache = (cache or CacheSettings()).validate()
        expect(not cache.enabled or self.kv_cache,
               f"cache {cache.mode}: this pipeline was opened without KV-cache buffers (kv_cache=False; the runtime "
               "opens it so for --cache none)")
        prompt, images, lay = request.prompt, request.images, request.layout
        embeds, vision_ms = self.prompt_embeddings(prompt, images)
        forward = SplitForward(self, embeds, lay, prune, gen.cfg_scale, cache)
        result = denoise(forward, gen, self.tokenizer.ids, on_step)
        answer = [int(t) for t in result.answer]
        return RuntimeResult(self.tokenizer.decode(answer), answer, result, lay, images[0].layout, forward.kept_visual,
                             forward.saliency, vision_ms, forward.trace, (time.perf_counter() - start) * 1000,
                             request.cameras, [im.layout for im in images])


@dataclass(frozen=True)
class Request:
    """A prepared request (Pipeline.prepare): prompt ids, preprocessed images, the sequence layout."""

    prompt: PromptIds
    images: list  # [ImageInput], one per image
    layout: SequenceLayout
    cameras: list[str]  # the images' names ([""]: one unnamed image)


def empty_past(manifest: Manifest, name: str, batch: int, float_dtype) -> dict[str, np.ndarray]:
    """No cached keys and values (0 rows): the decoder half runs over the whole sequence it is given."""
    dims = manifest.model_dims()
    shape = (dims["Lpre" if name == "decoder_pre" else "Lpost"], batch, dims["H"], 0, dims["Dh"])
    return {"past_keys": np.zeros(shape, float_dtype), "past_values": np.zeros(shape, float_dtype)}


class KVCache:
    """What a cached step attends to, per decoder half (docs/caching.md). A refresh's present K/V
    stay where the backend left them (host arrays; on TensorRT the full profile's output buffers,
    which no run overwrites before the next refresh); the first cached step after it gathers the
    rows outside its window, which do not change until the next refresh, to where the half's
    cached profile reads its past K/V, and every cached step until the next refresh feeds them as
    they are. The window's own K/V are recomputed at every cached step and never read from the
    cache, so nothing is written back."""

    def __init__(self, pre, post):
        self.runners = {"decoder_pre": pre, "decoder_post": post}
        self.present: dict[str, tuple] = {}  # half -> (keys, values, sequence row of each of their rows or None)
        self.past: dict[str, dict] = {}  # half -> the current window's past K/V feeds

    def keep(self, half: str, out: dict, rows: np.ndarray | None = None) -> None:
        """A refresh's present K/V become the cache; `rows`: the reduced sequence's rows in them (step 1's
        layers < K ran on the full sequence: the kept rows), None when they are the reduced sequence."""
        self.present[half] = (out["present_keys"], out["present_values"], rows)
        self.past.pop(half, None)

    def past_for(self, half: str, rows: np.ndarray) -> dict:
        """The past K/V of a cached step whose window leaves `rows` (reduced-sequence rows) outside."""
        if half not in self.past:
            keys, values, row_map = self.present.pop(half)
            source = rows if row_map is None else row_map[rows]
            runner = self.runners[half]
            self.past[half] = {"past_keys": runner.gather_past(keys, source, "past_keys"),
                               "past_values": runner.gather_past(values, source, "past_values")}
        return self.past[half]


class SplitForward:
    """`forward(response_ids) -> logits (G, vocab)` over decoder_pre and decoder_post."""

    def __init__(self, pipe: Pipeline, prompt: np.ndarray, lay: SequenceLayout, prune: PruneSettings, cfg_scale: float,
                 cache: CacheSettings | None = None):
        self.pipe, self.lay = pipe, lay
        self.plan = StepPlan(lay, prune, cache, cfg_scale)  # what each step computes (runtime.steps)
        self.pre, self.post = pipe.runners["decoder_pre"], pipe.runners["decoder_post"]
        self.similarity = pipe.runners["similarity"]
        self.kv = KVCache(self.pre, self.post) if self.plan.cache.enabled else None
        self.mask = pipe.tokenizer.ids.mask
        self.prompt = prompt
        self.kept_visual = np.arange(lay.n_visual)
        self.saliency = None
        self.rule_ms = 0.0  # the similarity graph's time, counted into the step that ran it (step 1)
        self.inputs = None  # (B, n', D) after step 1, staged where decoder_pre reads it: only its last G rows change
        self.positions = self.score_rows = self.logit_rows = None  # staged after step 1
        self.host_positions = None  # (B, n') position ids of the reduced sequence, for cached steps' windows
        self.trace: list[StepTrace] = []
        # no cached K/V (0 rows): staged once where each half reads them
        self.no_past = {r.name: {n: r.stage(n, x) for n, x in empty_past(pipe.manifest, r.name, self.plan.batch,
                                                                         pipe.float_dtype).items()}
                        for r in (self.pre, self.post)}

    def _batch(self, prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
        h = np.concatenate([prompt, response])[None]
        if self.plan.batch > 1:  # the unconditional branch: every prompt token masked
            masked = np.broadcast_to(self.pipe.embed[self.mask], prompt.shape)
            h = np.concatenate([h, np.concatenate([masked, response])[None]])
        return np.ascontiguousarray(h, dtype=self.pipe.float_dtype)

    def start_block(self, start: int, end: int) -> None:
        self.plan.start_block(start, end)

    def __call__(self, response_ids: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        response = np.asarray(self.pipe.embed[response_ids], dtype=self.pipe.float_dtype)
        step = self.plan.next_step()
        if step.kind == FIRST:
            logits, rows = self._first_step(response_ids, response), None
        elif step.kind == FULL:  # only the response rows change: write them into the staged (device) input
            self.pre.write_rows(self.inputs, self.plan.n - self.lay.n_response, response)
            logits, rows = self._step(), None
        else:
            logits, rows = self._cached_step(response, step.window)
        n = self.plan.n  # rows None: the step computed all of them
        total = (time.perf_counter() - t0) * 1000
        pre, post = self.pre.last_ms() + self.rule_ms, self.post.last_ms()
        self.rule_ms = 0.0
        self.trace.append(StepTrace(len(self.trace) + 1, n, rows or n, pre, post, total - pre - post))
        return logits

    def _run_pre(self, h, pos, rows):
        return self.pre.infer({"inputs_embeds": h, "position_ids": pos, "score_rows": rows, **self.no_past["decoder_pre"]},
                              keep_on_device=True)

    def _run_post(self, hidden) -> np.ndarray:
        feeds = {"hidden_states": hidden, "position_ids": self.positions, "logit_rows": self.logit_rows,
                 **self.no_past["decoder_post"]}
        out = self.post.infer(feeds, keep_on_device=True)  # present K/V stay where they are
        self._keep_kv("decoder_post", out)
        return self.plan.guide(np.asarray(self.post.to_host(out["logits"])))

    def _keep_kv(self, half: str, out: dict, rows: np.ndarray | None = None) -> None:
        if self.kv is not None:
            self.kv.keep(half, out, rows)

    def _cached_step(self, response: np.ndarray, w: CacheWindow) -> tuple[np.ndarray, int]:
        """The window's rows against the cached K/V of the others, in the engines' cached profile.
        Returns (G, V) logits (zeros outside the rows computed) and the number of rows computed."""
        n, g = self.plan.n, self.lay.n_response
        local = w.compute - (n - g)  # the window lies inside the response (it starts at the block)
        batch = self.host_positions.shape[0]  # both CFG branches hold the same response rows
        h = np.ascontiguousarray(np.broadcast_to(response[local], (batch, local.size, response.shape[1])))
        pos = np.ascontiguousarray(self.host_positions[:, w.compute])
        pre = self.pre.infer({"inputs_embeds": h, "position_ids": pos, "score_rows": np.zeros(1, np.int64),
                              **self.kv.past_for("decoder_pre", w.past)}, keep_on_device=True, profile=CACHED_PROFILE)
        post = self.post.infer({"hidden_states": pre["hidden_states"], "position_ids": pos,
                                "logit_rows": np.arange(w.compute.size, dtype=np.int64),
                                **self.kv.past_for("decoder_post", w.past)}, keep_on_device=True, profile=CACHED_PROFILE)
        logits = self.plan.guide(np.asarray(self.post.to_host(post["logits"])))
        out = np.zeros((g, logits.shape[-1]), dtype=logits.dtype)
        out[local] = logits
        return out, int(w.compute.size)

    def _first_step(self, response_ids, response) -> np.ndarray:
        lay = self.lay
        h = self._batch(self.prompt, response)
        pos = np.broadcast_to(np.arange(lay.total, dtype=np.int64), h.shape[:2]).copy()
        rows = self.plan.score_rows(response_ids == self.mask)
        out = self._run_pre(h, pos, np.array([lay.total - 1], np.int64) if rows is None else rows)  # the graph needs a row
        pruned = self.plan.prune_visual(lambda: self._saliency(out), lambda p: self._similarity(out, p))
        self.kept_visual = pruned.keep
        self._keep_kv("decoder_pre", out, pruned.kept)
        hidden = out["hidden_states"]
        if pruned.keep.size < lay.n_visual:  # into decoder_post's own input (on the device for TensorRT)
            hidden = self.post.take_rows(hidden, pruned.kept, "hidden_states")
        self.prompt = np.ascontiguousarray(self.prompt[pruned.kept[: pruned.kept.size - lay.n_response]])
        self._stage_reduced(pruned.positions, h.shape[0], response)
        return self._run_post(hidden)

    def _saliency(self, out: dict) -> np.ndarray:
        self.saliency = np.asarray(self.pre.to_host(out["saliency"]))[0, self.lay.visual_rows].astype(np.float64)
        return self.saliency

    def _similarity(self, out: dict, pivots: np.ndarray) -> np.ndarray:
        """(pivots, V) from the similarity graph, on decoder_pre's hidden states where they are."""
        visual = self.lay.visual_rows
        sim = self.similarity.infer({"hidden_states": out["hidden_states"], "visual_rows": visual, "pivots": pivots},
                                    keep_on_device=True)
        host = np.asarray(self.similarity.to_host(sim["similarity"]))[0]
        self.rule_ms = self.similarity.last_ms()
        return host

    def _stage_reduced(self, positions: np.ndarray, batch: int, response: np.ndarray) -> None:
        """The reduced sequence's inputs, placed once where the decoders read them; later steps
        rewrite only the response rows of `inputs`. Both halves read the same position ids."""
        n, g = positions.size, self.lay.n_response
        self.host_positions = np.broadcast_to(positions, (batch, n)).copy()
        self.positions = self.pre.stage("position_ids", self.host_positions)
        self.score_rows = self.pre.stage("score_rows", np.array([n - 1], dtype=np.int64))  # saliency unused later
        self.logit_rows = self.post.stage("logit_rows", np.arange(n - g, n, dtype=np.int64))
        self.inputs = self.pre.stage("inputs_embeds", self._batch(self.prompt, response))

    def _step(self) -> np.ndarray:
        out = self._run_pre(self.inputs, self.positions, self.score_rows)
        self._keep_kv("decoder_pre", out)
        return self._run_post(out["hidden_states"])

