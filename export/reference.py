"""The PyTorch reference generator: LLaDA-V masked diffusion with persistent visual-token pruning.

The first denoising step runs layers [0, K) over the full sequence, scores the visual tokens by
the attention of the chosen query rows at layer K-1, keeps V - floor(V*P/100) of them, and runs
layers [K, L) on the reduced sequence. Every later step runs all L layers on the reduced
sequence; only the response embeddings change between steps. With P = 0 every token is kept
and the loop equals the unpruned one exactly. The ONNX export and every runtime backend must
reproduce this generator token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from export.model import LladaV
from runtime.errors import expect
from runtime.preprocess import ImageInput
from runtime.pruning import (
    PruneSettings,
    SequenceLayout,
    keep_at_random,
    keep_by_score,
    kept_positions,
    query_rows,
    reduced_position_ids,
)
from runtime.schedule import DenoiseResult, GenerationSettings, denoise
from runtime.tokens import PromptIds, TokenIds


@dataclass
class GenerationResult:
    denoise: DenoiseResult
    layout: SequenceLayout
    kept_visual: np.ndarray  # indices into the V visual tokens, ascending
    saliency: np.ndarray | None  # (V,) scores at layer K-1 of step 1, if computed
    seq_lens: list[int] = field(default_factory=list)  # tokens after layer K of each forward

    @property
    def answer_ids(self) -> list[int]:
        return [int(t) for t in self.denoise.answer]


def prompt_embeddings(model: LladaV, prompt: PromptIds, image: ImageInput, n_response: int):
    """(N_prompt, D) embeddings [prefix | visual | suffix] and the sequence layout."""
    visual = model.visual_tokens(torch.from_numpy(image.pixel_values), image.layout)
    prefix = model.embed(torch.tensor(prompt.prefix, dtype=torch.long))
    suffix = model.embed(torch.tensor(prompt.suffix, dtype=torch.long))
    layout = SequenceLayout(len(prompt.prefix), visual.shape[0], len(prompt.suffix), n_response)
    return torch.cat([prefix, visual, suffix]), layout


class ReferenceForward:
    """`forward(response_ids) -> logits (G, vocab)` for one generation, pruning at its first call."""

    def __init__(self, model, prompt, layout, prune, cfg_scale, mask_id):
        self.model, self.layout, self.prune, self.cfg_scale = model, layout, prune, cfg_scale
        self.mask_id = mask_id
        self.prompt = prompt  # (N_prompt, D), reduced after step 1
        self.mask_embed = model.embed(torch.tensor([mask_id]))[0]
        self.pos = torch.arange(layout.total)[None]
        self.kept_visual = np.arange(layout.n_visual)
        self.saliency = None
        self.seq_lens: list[int] = []
        self.first = True

    def _batch(self, response: torch.Tensor) -> torch.Tensor:
        """(B, N, D): the conditional sequence and, with CFG, the one whose prompt is all masks."""
        h = torch.cat([self.prompt, response])[None]
        if self.cfg_scale > 0:
            un = torch.cat([self.mask_embed.expand_as(self.prompt), response])[None]
            h = torch.cat([h, un])
        return h

    @torch.inference_mode()
    def __call__(self, response_ids: np.ndarray) -> np.ndarray:
        response = self.model.embed(torch.from_numpy(response_ids))
        h = self._batch(response)
        pos = self.pos.expand(h.shape[0], -1)
        L = self.model.cfg.n_layers
        if self.first and self.prune is not None:
            h, pos = self._first_step(h, pos, response_ids)
            self.first = False
        else:
            h, _ = self.model.run_layers(h, pos, 0, L)
        self.seq_lens.append(h.shape[1])
        g = self.layout.n_response
        logits = self.model.logits(h, torch.arange(h.shape[1] - g, h.shape[1])).float()
        if self.cfg_scale > 0:
            logits = logits[1] + (self.cfg_scale + 1) * (logits[0] - logits[1])
        else:
            logits = logits[0]
        return logits.numpy()

    def _first_step(self, h, pos, response_ids):
        """Layers [0, K) on the full sequence, keep by saliency, layers [K, L) on the rest."""
        k, p, lay = self.prune.k, self.prune.p, self.layout
        rows = None
        if not self.prune.random:
            rows = torch.from_numpy(query_rows(lay, self.prune.query, response_ids == self.mask_id))
        h, saliency = self.model.run_layers(h, pos, 0, k, score_rows=rows)
        if self.prune.random:
            keep = keep_at_random(lay.n_visual, p, self.prune.seed)
        else:
            self.saliency = saliency[0, lay.visual].float().numpy()
            keep = keep_by_score(self.saliency, p)
        kept = kept_positions(lay, keep)
        self.kept_visual = keep
        self.pos = torch.from_numpy(reduced_position_ids(kept, self.prune.positions))[None]
        self.prompt = self.prompt[torch.from_numpy(kept[: kept.shape[0] - lay.n_response])]
        h = h[:, torch.from_numpy(kept)]
        pos = self.pos.expand(h.shape[0], -1)
        h, _ = self.model.run_layers(h, pos, k, self.model.cfg.n_layers)
        return h, pos


def generate(
    model: LladaV,
    ids: TokenIds,
    prompt: PromptIds,
    image: ImageInput,
    gen: GenerationSettings,
    prune: PruneSettings | None,
) -> GenerationResult:
    """Generate an answer; `prune=None` is the unpruned baseline."""
    gen.validate()
    if prune is not None:
        prune.validate(model.cfg.n_layers)
    with torch.inference_mode():
        embeds, layout = prompt_embeddings(model, prompt, image, gen.gen_length)
    expect(
        layout.total <= model.cfg.decoder.max_positions,
        f"sequence: {layout.total} tokens (prompt {layout.n_prompt} incl. {layout.n_visual} visual, "
        f"response {layout.n_response}); expected at most max_position_embeddings={model.cfg.decoder.max_positions}",
    )
    forward = ReferenceForward(model, embeds, layout, prune, gen.cfg_scale, ids.mask)
    result = denoise(forward, gen, ids)
    return GenerationResult(result, layout, forward.kept_visual, forward.saliency, forward.seq_lens)
