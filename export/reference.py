"""The PyTorch reference generator: LLaDA-V masked diffusion with persistent visual-token pruning.

The first denoising step runs layers [0, K) over the full sequence, scores the visual tokens by
the attention of the chosen query rows at layer K-1, keeps V - floor(V*P/100) of them, and runs
layers [K, L) on the reduced sequence. Every later step runs all L layers on the reduced
sequence; only the response embeddings change between steps. With P = 0 every token is kept
and the loop equals the unpruned one exactly. With a KV cache (runtime.caching, docs/caching.md)
a refresh keeps every layer's keys and values, and the steps between refreshes recompute only
the current block's rows (dual) or the block and the rows after it (prefix). The ONNX export and
every runtime backend must reproduce this generator token for token. What each step computes
(its kind, the rows that score, the tokens that survive, guidance) is runtime.steps.StepPlan's,
the plan the runtime's split forward follows too; this module does the torch work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from export.model import LladaV
from runtime.caching import CacheSettings, CacheWindow
from runtime.cameras import request_layout
from runtime.errors import expect
from runtime.preprocess import ImageInput
from runtime.pruning import PruneSettings, SequenceLayout
from runtime.schedule import DenoiseResult, GenerationSettings, denoise
from runtime.steps import FIRST, FULL, StepPlan
from runtime.tokens import PromptIds, TokenIds


@dataclass
class GenerationResult:
    denoise: DenoiseResult
    layout: SequenceLayout
    kept_visual: np.ndarray  # indices into the V visual tokens, ascending
    saliency: np.ndarray | None  # (V,) scores at layer K-1 of step 1, if computed
    seq_lens: list[int] = field(default_factory=list)  # tokens after layer K of each forward
    computed_rows: list[int] = field(default_factory=list)  # rows each forward recomputed (all on a refresh)

    @property
    def answer_ids(self) -> list[int]:
        return [int(t) for t in self.denoise.answer]


def prompt_embeddings(model: LladaV, prompt: PromptIds, images, n_response: int):
    """(N_prompt, D) embeddings [prefix | visual | suffix] (several images: their segments with the
    text between them) and the sequence layout. images: an ImageInput or a list of them, each run
    through the vision tower on its own."""
    images = images if isinstance(images, list) else [images]
    layout = request_layout(prompt, images, n_response)
    visuals = [model.visual_tokens(torch.from_numpy(im.pixel_values), im.layout) for im in images]
    parts = [model.embed(torch.tensor(seg, dtype=torch.long)) if isinstance(seg, tuple) else visuals[seg]
             for seg in prompt.segments()]
    return torch.cat(parts), layout


class ReferenceForward:
    """`forward(response_ids) -> logits (G, vocab)` for one generation, pruning at its first call."""

    def __init__(self, model, prompt, layout, prune, cfg_scale, mask_id, cache: CacheSettings | None = None):
        self.model, self.layout = model, layout
        self.plan = StepPlan(layout, prune, cache, cfg_scale)  # what each step computes (runtime.steps)
        self.kv = None  # [(k, v)] per layer over every row of the (reduced) sequence, (B, H, n, Dh)
        self.computed_rows: list[int] = []
        self.mask_id = mask_id
        self.prompt = prompt  # (N_prompt, D), reduced after step 1
        self.mask_embed = model.embed(torch.tensor([mask_id]))[0]
        self.pos = torch.arange(layout.total)[None]
        self.kept_visual = np.arange(layout.n_visual)
        self.saliency = None
        self.seq_lens: list[int] = []

    def _batch(self, response: torch.Tensor) -> torch.Tensor:
        """(B, N, D): the conditional sequence and, with CFG, the one whose prompt is all masks."""
        h = torch.cat([self.prompt, response])[None]
        if self.plan.batch > 1:
            un = torch.cat([self.mask_embed.expand_as(self.prompt), response])[None]
            h = torch.cat([h, un])
        return h

    def start_block(self, start: int, end: int) -> None:
        self.plan.start_block(start, end)

    @torch.inference_mode()
    def __call__(self, response_ids: np.ndarray) -> np.ndarray:
        response = self.model.embed(torch.from_numpy(response_ids))
        h = self._batch(response)
        pos = self.pos.expand(h.shape[0], -1)
        L = self.model.cfg.n_layers
        step = self.plan.next_step()
        if step.kind == FIRST:
            h, pos = self._first_step(h, pos, response_ids)
        elif step.kind == FULL:
            h, _, kv = self.model.run_layers_kv(h, pos, 0, L)
            self.kv = kv if self.plan.cache.enabled else None
        else:
            return self._cached_step(h, pos, step.window)
        self.seq_lens.append(h.shape[1])
        self.computed_rows.append(h.shape[1])
        return self._response_logits(h, np.arange(h.shape[1]), h.shape[1])

    def _response_logits(self, h, rows: np.ndarray, n: int) -> np.ndarray:
        """(G, vocab) logits for the response rows among `rows` (h holds exactly those rows); zeros
        for response rows not computed (a cached step reads only its block)."""
        g = self.layout.n_response
        at = np.flatnonzero(rows >= n - g)
        logits = self.model.logits(h, torch.from_numpy(at)).float()
        logits = self.plan.guide(logits)
        out = np.zeros((g, logits.shape[-1]), dtype=np.float32)
        out[rows[at] - (n - g)] = logits.numpy()
        return out

    def _cached_step(self, h, pos, w: CacheWindow) -> np.ndarray:
        """Recompute the window's rows against the cached keys and values of the others."""
        n = h.shape[1]
        compute, past = torch.from_numpy(w.compute), torch.from_numpy(w.past)
        cached = [(k[:, :, past], v[:, :, past]) for k, v in self.kv]
        out, _, _ = self.model.run_layers_kv(h[:, compute], pos[:, compute], 0, self.model.cfg.n_layers, past=cached)
        self.seq_lens.append(n)
        self.computed_rows.append(len(w.compute))
        return self._response_logits(out, w.compute, n)

    def _first_step(self, h, pos, response_ids):
        """Layers [0, K) on the full sequence, keep what the plan's rule keeps, layers [K, L) on the
        rest. The rule reads this model's own saliency and hidden states."""
        k, lay = self.plan.prune.k, self.layout
        rows = self.plan.score_rows(response_ids == self.mask_id)
        h, saliency, kv_pre = self.model.run_layers_kv(h, pos, 0, k,
                                                       score_rows=None if rows is None else torch.from_numpy(rows))
        if saliency is not None:
            self.saliency = saliency[0, torch.from_numpy(lay.visual_rows)].float().numpy()
        visual = h[0, torch.from_numpy(lay.visual_rows)]
        pruned = self.plan.prune_visual(lambda: self.saliency, lambda pivots: pivot_similarity(visual, pivots))
        kept = pruned.kept
        self.kept_visual = pruned.keep
        self.pos = torch.from_numpy(pruned.positions)[None]
        self.prompt = self.prompt[torch.from_numpy(kept[: kept.shape[0] - lay.n_response])]
        h = h[:, torch.from_numpy(kept)]
        pos = self.pos.expand(h.shape[0], -1)
        h, _, kv_post = self.model.run_layers_kv(h, pos, k, self.model.cfg.n_layers)
        if self.plan.cache.enabled:  # the first refresh: layers < K keep the kept rows' keys and values of the full pass
            rows = torch.from_numpy(kept)
            self.kv = [(kk[:, :, rows], vv[:, :, rows]) for kk, vv in kv_pre] + kv_post
        return h, pos


def pivot_similarity(visual: torch.Tensor, pivots: np.ndarray) -> np.ndarray:
    """(pivots, V) cosine similarities of the pivots' hidden states to every visual token's (V, D), in
    float64: the reference's own computation of what the exported `similarity` graph computes."""
    x = visual.double()
    return torch.nn.functional.cosine_similarity(x[torch.from_numpy(pivots)][:, None], x[None], dim=-1).numpy()


def generate(
    model: LladaV,
    ids: TokenIds,
    prompt: PromptIds,
    image: ImageInput | list[ImageInput],
    gen: GenerationSettings,
    prune: PruneSettings | None,
    cache: CacheSettings | None = None,
) -> GenerationResult:
    """Generate an answer; `prune=None` is the unpruned baseline, `cache=None` uncached. Several images
    (runtime.cameras.prepare_images): a list, and a prompt with one placeholder each."""
    gen.validate()
    cache = (cache or CacheSettings()).validate()
    if prune is not None:
        prune.validate(model.cfg.n_layers)
    with torch.inference_mode():
        embeds, layout = prompt_embeddings(model, prompt, image, gen.gen_length)
    expect(
        layout.total <= model.cfg.decoder.max_positions,
        f"sequence: {layout.total} tokens (prompt {layout.n_prompt} incl. {layout.n_visual} visual, "
        f"response {layout.n_response}); expected at most max_position_embeddings={model.cfg.decoder.max_positions}",
    )
    forward = ReferenceForward(model, embeds, layout, prune, gen.cfg_scale, ids.mask, cache)
    result = denoise(forward, gen, ids)
    return GenerationResult(result, layout, forward.kept_visual, forward.saliency, forward.seq_lens,
                            forward.computed_rows)
