"""Train the miniature LLaDA-V on driving scenes with LLaDA's SFT objective.

    python -m miniature.train --seed 0      # reproduces miniature/checkpoint and prints the time

Four stages and two rounds. First the vision tower and projector alone learn what each visual token holds
(`miniature.data.token_labels`: light colour, speed limit, vehicle colour and lane, pedestrian
side) through a linear head that is not part of the model; a run without this stage saw 33.6k
questions and its features still did not tell the speed limit apart (docs/miniature.md). Then
the whole model trains with LLaDA's SFT loss, the token loss kept alongside: each optimizer step
draws B training scenes and asks all six questions of each, the vision tower runs once per scene,
the decoder over the 6*B sequences [prefix | visual | question | response]. Only response tokens
are masked (per sequence t ~ U(0, 1)), cross-entropy on the masked positions weighted by 1/t and
averaged over the response length. By its end the decoder answered the presence and position
questions and still gave one fixed answer to the light and the limit (docs/miniature.md), so stage 3
asks only those two (questions drawn by focus_weights), and stage 4 reviews all six at a lower
learning rate. Two rounds of the same follow (`rounds`): count and the vehicle ahead, then the
limit and the vehicle ahead, each a focus stage and a review. The run checkpoints its state every few minutes to `--run-dir`
and resumes from it, so a stopped run loses little; the log is a CSV there.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.checkpoint import config_to_json, write_checkpoint
from export.model import PRESETS, LladaV, merge_anyres
from export.tiny import tokenizer_files
from miniature import CHECKPOINT
from miniature.data import IGNORE, TOKEN_ATTRIBUTES, VALIDATION_SEEDS, Encoder, Example, training_seeds
from miniature.tokenizer import miniature_tokenizer
from runtime.cameras import joined_fill
from runtime.cli_args import at_boundary
from runtime.errors import LladaVError
from runtime.files import write_json
from runtime.pruning import BUDGETS, PruneSettings, keep_visual
from runtime.tokens import TextTokenizer

HERE = Path(__file__).resolve().parent
TRAINING = HERE / "training"  # the committed loss curve and log of the run that made the checkpoint
RUN_DIR = HERE.parent / "runs" / "miniature"
STATE = "train_state.pt"
LOG = "log.csv"


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    vision_steps: int = 1500  # stage 1: the vision tower and projector on token labels alone
    vision_scenes_per_step: int = 8
    token_loss_weight: float = 1.0  # stage 2: SFT loss + this x the token-label loss
    samples: int = 33_600  # stage 2: questions seen, six per scene
    scenes_per_step: int = 4
    bf16_autocast: bool = True  # stages 1 and 2: CPU bf16 matmuls, fp32 master weights (3 and 4 run in fp32)
    lr: float = 2e-3
    warmup_steps: int = 200
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    response_lengths: tuple[int, int] = (8, 32)  # per step, uniform: EOS padding of varying length, as
    # LLaDA's SFT pads to the batch's longest, so any gen_length in this range is in distribution
    focus_steps: int = 300  # stage 3: questions drawn by focus_weights
    focus_scenes_per_step: int = 12
    focus_questions_per_scene: int = 2  # distinct kinds per scene, drawn without replacement
    focus_weights: tuple[tuple[str, float], ...] = (("light", 1.0), ("limit", 1.0), ("ahead", 0.0),
                                                    ("count", 0.0), ("pedestrian", 0.0), ("lane", 0.0))
    focus_lr: float = 1e-3  # after warmup, constant: stage 4 decays
    focus_warmup_steps: int = 30
    focus_response_length: int = 8  # stage 3: no token loss, responses of this length
    review_steps: int = 200  # stage 4: stage 2's batches (all six questions per scene) at a lower learning rate
    review_lr: float = 3e-4
    review_warmup_steps: int = 10
    # then rounds of (kinds, focus steps, review steps): a focus stage asking only these kinds (equally
    # weighted), then a review like stage 4; stage names "focus 2", "review 2", ...
    rounds: tuple[tuple[tuple[str, ...], int, int], ...] = ((("count", "ahead"), 200, 200), (("limit", "ahead"), 200, 300))
    eval_every: int = 200  # steps
    validation_scenes: int = 40  # x6 questions, a one-pass accuracy monitor
    checkpoint_seconds: float = 300.0

    @property
    def sft_steps(self) -> int:
        return self.samples // (6 * self.scenes_per_step)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.stages())

    def stages(self) -> list[tuple[str, int, int]]:
        """(phase, first step, steps) of every stage in order: the four, then the rounds'."""
        plan = [("vision", self.vision_steps), ("sft", self.sft_steps), ("focus", self.focus_steps),
                ("review", self.review_steps)]
        for i, (_, focus, review) in enumerate(self.rounds, start=2):
            plan += [(f"focus {i}", focus), (f"review {i}", review)]
        out, first = [], 0
        for name, n in plan:
            out.append((name, first, n))
            first += n
        return out

    def phase(self, step: int) -> str:
        return next((name for name, first, n in self.stages() if step < first + n), self.stages()[-1][0])

    def stage_steps(self, phase: str) -> int:
        return next(n for name, _, n in self.stages() if name == phase)

    def stage_step(self, step: int) -> int:
        """The step's index within its stage."""
        return step - next(first for name, first, _ in self.stages() if name == self.phase(step))

    def scenes_per(self, phase: str) -> int:
        return {"vision": self.vision_scenes_per_step, "sft": self.scenes_per_step,
                "focus": self.focus_scenes_per_step, "review": self.scenes_per_step}[kind_of(phase)]

    def questions_per_scene(self, phase: str) -> int:
        return {"vision": 0, "sft": 6, "focus": self.focus_questions_per_scene, "review": 6}[kind_of(phase)]

    def _before(self, step: int, per_step) -> int:
        return sum(min(max(0, step - first), n) * per_step(name) for name, first, n in self.stages())

    def first_scene(self, step: int) -> int:
        """Index of the step's first scene in the run's stream: every step reads the next scenes."""
        return self._before(step, self.scenes_per)

    def questions_before(self, step: int) -> int:
        """Training questions seen in the steps before `step` (stage 1 asks none)."""
        return self._before(step, lambda name: self.scenes_per(name) * self.questions_per_scene(name))

    @property
    def stage_ends(self) -> set[int]:
        return {first + n for _, first, n in self.stages()}

    def focus_weights_of(self, phase: str) -> tuple[tuple[str, float], ...]:
        """A round's focus stage weighs its kinds equally; every other phase has focus_weights."""
        if kind_of(phase) != "focus" or phase == "focus":
            return self.focus_weights
        return tuple((k, 1.0) for k in self.rounds[int(phase.split()[1]) - 2][0])

    def focus_kinds(self, step: int) -> list[tuple[str, ...]]:
        """Per scene of a focus step, the kinds it asks: focus_questions_per_scene distinct kinds drawn
        with probability proportional to the stage's weights (focus_weights, or a round's kinds equally)."""
        weights = self.focus_weights_of(self.phase(step))
        names = [k for k, _ in weights]
        w = np.array([x for _, x in weights])
        rng = np.random.default_rng([self.seed, step, 3])
        return [tuple(str(k) for k in rng.choice(names, self.focus_questions_per_scene, replace=False, p=w / w.sum()))
                for _ in range(self.focus_scenes_per_step)]

    def lr_at(self, step: int) -> float:
        """Stages 1 and 3: linear warmup, then constant. Stages 2 and 4: warmup again (the decoder
        starts in stage 2), then cosine decay to final_lr_ratio of the stage's peak."""
        if step < self.vision_steps:
            return self.lr * min(1.0, (step + 1) / self.warmup_steps)
        phase, i = self.phase(step), self.stage_step(step)
        if kind_of(phase) == "focus":
            return self.focus_lr * min(1.0, (i + 1) / self.focus_warmup_steps)
        warmup, peak = {"sft": (self.warmup_steps, self.lr), "review": (self.review_warmup_steps, self.review_lr)}[kind_of(phase)]
        return warmup_cosine(i, self.stage_steps(phase), warmup, peak, self.final_lr_ratio)


def kind_of(phase: str) -> str:
    """A stage's kind: vision, sft, focus or review (rounds add "focus 2", "review 2", ...)."""
    return phase.split()[0]


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


# ---------------------------------------------------------------- model and loss


def init_weights(model: LladaV, seed: int) -> None:
    """N(0, 0.02) for the decoder and projector; the residual branches' output projections (o_proj,
    down_proj) start at zero, so the 32-layer decoder starts as the identity and every layer gets
    gradient from the first step (SkipInit/ReZero-style depth scaling). The SigLIP tower keeps its
    own (transformers') initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".vision_tower." in name or p.dim() < 2:
                continue
            std = 0.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        model.model.image_newline.copy_(torch.randn(model.model.image_newline.shape, generator=gen) * 0.02)


class TokenHeads(nn.Module):
    """Training-only linear heads: visual token features (V, D) -> a class per TOKEN_ATTRIBUTES
    attribute. Not part of the model or the checkpoint."""

    def __init__(self, d_model: int):
        super().__init__()
        self.sizes = [len(v) for v in TOKEN_ATTRIBUTES.values()]
        self.proj = nn.Linear(d_model, sum(self.sizes))

    def forward(self, visual: torch.Tensor) -> list[torch.Tensor]:
        return list(self.proj(visual).float().split(self.sizes, dim=-1))


def scene_visuals(model: LladaV, batch: list[Example]) -> list[list[torch.Tensor]]:
    """Per scene (or rig) its images' visual tokens [(V_i, D)]: the vision tower runs once over every
    tile of the batch."""
    pixels = torch.from_numpy(np.concatenate([ex.pixels for ex in batch]))
    feats = model.encode_tiles(pixels)  # (sum T, S*S, D)
    out, start = [], 0
    for ex in batch:
        images = []
        for layout in ex.layouts:
            images.append(merge_anyres(feats[start : start + layout.num_tiles], layout, model.model.image_newline))
            start += layout.num_tiles
        out.append(images)
    return out


def token_loss(heads: TokenHeads, batch: list[Example], visuals: list[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
    """Mean over attributes of the cross-entropy of every labelled visual token, and per attribute
    the accuracy on the tokens that hold an object of that kind."""
    labels = torch.from_numpy(np.concatenate([ex.labels for ex in batch]))  # (sum V, A)
    loss, acc = torch.zeros(()), []
    for a, logits in enumerate(heads(torch.cat([v for images in visuals for v in images]))):
        loss = loss + F.cross_entropy(logits, labels[:, a], ignore_index=IGNORE)
        holds = labels[:, a] > 0
        acc.append(float((logits.argmax(-1) == labels[:, a])[holds].float().mean()) if holds.any() else float("nan"))
    return loss / len(heads.sizes), acc


def batch_sequences(model: LladaV, batch: list[Example], visuals: list[torch.Tensor], responses: torch.Tensor):
    """Embeddings of every (scene, question) sequence, grouped by length so groups stack.

    responses (Q, G) are the response ids as the model sees them (masks included), Q = every
    question of every scene, in batch order. Returns [(question indices, h (n, N, D))] per length.
    """
    embed = model.embed
    groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
    qi = 0
    for ex, images in zip(batch, visuals):
        for prompt in ex.prompts:  # text and images in the prompt's order (runtime.tokens.PromptIds.segments)
            parts = [embed(torch.tensor(seg, dtype=torch.long)) if isinstance(seg, tuple) else images[seg]
                     for seg in prompt.segments()]
            h = torch.cat([*parts, embed(responses[qi])])
            groups.setdefault(h.shape[0], []).append((qi, h))
            qi += 1
    return [([i for i, _ in g], torch.stack([h for _, h in g])) for g in groups.values()]


def response_logits(model: LladaV, batch: list[Example], visuals: list[torch.Tensor], responses: torch.Tensor):
    """(Q, G, vocab) logits at the response rows of every sequence in the batch."""
    return probed_response_logits(model, batch, visuals, responses)[0]


@dataclass(frozen=True)
class TokenDrop:
    """A training-time stand-in for step-1 pruning (docs/cameras.md): after `layer` decoder layers,
    every sequence of a length group keeps its text and response rows and loses the same number of
    its visual rows, a share drawn from U(0, max_share) per group, the rows at random (no pruning
    rule's choice); the rest run on at their original positions."""

    layer: int
    max_share: float
    gen: torch.Generator


@dataclass(frozen=True)
class VisualRows:
    """One question's sequence as pruning sees it (what runtime.cameras.request_layout says of a request)."""

    mask: torch.Tensor  # (n_prompt,) True on the prompt's visual rows (the response rows follow)
    sizes: tuple[int, ...]  # each image's visual tokens, in the prompt's order
    fill: tuple[int, ...]  # the visual indices of its padded views' fill (runtime.anyres.pad_fill_tokens)


def visual_rows(batch: list[Example], visuals: list[torch.Tensor]) -> list[VisualRows]:
    """Per question (batch order), its VisualRows."""
    out = []
    for ex, images in zip(batch, visuals):
        for prompt in ex.prompts:
            segments = prompt.segments()  # text: token-id tuples; images: their indices
            mask = torch.cat([torch.zeros(len(seg), dtype=torch.bool) if isinstance(seg, tuple)
                              else torch.ones(images[seg].shape[0], dtype=torch.bool) for seg in segments])
            layouts = [ex.layouts[seg] for seg in segments if not isinstance(seg, tuple)]
            out.append(VisualRows(mask, tuple(lay.num_visual_tokens for lay in layouts), joined_fill(layouts)))
    return out


def run_dropping(model: LladaV, h: torch.Tensor, pos: torch.Tensor, visual: list[torch.Tensor], drop: TokenDrop):
    """Every decoder layer over h (n, N, D), dropping visual rows after drop.layer layers (TokenDrop);
    visual: the group's VisualRows masks. Returns h (n, N - dropped, D), rows in their order."""
    h, _ = model.run_layers(h, pos, 0, drop.layer)
    share = float(torch.rand((), generator=drop.gen)) * drop.max_share
    n_drop = int(min(int(m.sum()) for m in visual) * share)
    keep = []
    for m in visual:
        rows = torch.ones(h.shape[1], dtype=torch.bool)
        candidates = torch.nonzero(m).flatten()
        rows[candidates[torch.randperm(candidates.numel(), generator=drop.gen)[:n_drop]]] = False
        keep.append(torch.nonzero(rows).flatten())
    keep = torch.stack(keep)  # (n, N - n_drop), ascending: the response rows stay last
    h = torch.gather(h, 1, keep[..., None].expand(-1, -1, h.shape[-1]))
    return model.run_layers(h, torch.gather(pos, 1, keep), drop.layer, model.cfg.n_layers)[0]


@dataclass(frozen=True)
class RuleDrop:
    """Step-1 pruning as the runtime prunes, at training time (docs/cameras.md): a length group is pruned
    with probability `share`, at P ~ U(p_range) and a budget drawn from runtime.pruning.BUDGETS; each
    sequence keeps what the runtime's own rule keeps (runtime.pruning.keep_visual, the default rule, a
    padded view's fill first) scored as step 1 scores (rule_kept_rows), and runs on those rows from
    layer 0, as every later step does, or with probability `at_k` from layer K on, as step 1 does."""

    k: int
    share: float
    p_range: tuple[float, float]
    at_k: float
    mask_id: int
    gen: torch.Generator

    def draw(self) -> tuple[PruneSettings | None, int]:
        """This group's pruning (None: not pruned) and the layer the reduced rows start from."""
        u = torch.rand(4, generator=self.gen).tolist()
        if u[0] >= self.share:
            return None, 0
        lo, hi = self.p_range
        prune = PruneSettings(k=self.k, p=lo + (hi - lo) * u[1], budget=BUDGETS[int(u[2] * len(BUDGETS))])
        return prune, self.k if u[3] < self.at_k else 0


@torch.no_grad()
def rule_kept_rows(model: LladaV, h: torch.Tensor, pos: torch.Tensor, visual: list[VisualRows], prune: PruneSettings,
                   mask_id: int, g: int) -> list[torch.Tensor]:
    """Per sequence of h (n, N, D), the rows (ascending) step 1 keeps under prune: layers [0, K) over the
    prompt and an all-mask response of g rows, the saliency of the response rows at layer K-1 and the
    hidden states entering layer K, read by runtime.pruning.keep_visual. visual: the group's VisualRows."""
    from export.reference import pivot_similarity

    scored = h.clone()
    scored[:, -g:] = model.embed(torch.full((g,), mask_id, dtype=torch.long))
    states, saliency = model.run_layers(scored, pos, 0, prune.k, torch.arange(h.shape[1] - g, h.shape[1]))
    out = []
    for j, v in enumerate(visual):
        vis = torch.nonzero(v.mask).flatten()
        scores, tokens = saliency[j, vis].float().numpy(), states[j, vis]
        keep = keep_visual(prune, v.sizes, lambda: scores, lambda pivots: pivot_similarity(tokens, pivots), v.fill)
        rows = torch.ones(h.shape[1], dtype=torch.bool)  # v.mask covers the prompt; the response rows follow
        rows[vis] = False
        rows[vis[torch.from_numpy(keep)]] = True
        out.append(torch.nonzero(rows).flatten())
    return out


def run_rule_dropping(model: LladaV, h: torch.Tensor, pos: torch.Tensor, visual: list[VisualRows], drop: RuleDrop,
                      g: int) -> torch.Tensor:
    """Every decoder layer over h (n, N, D) under the group's RuleDrop draw; returns the g response rows'
    hidden states (n, g, D). Sequences keeping as many rows run together."""
    prune, start = drop.draw()
    if prune is None:
        return model.run_layers(h, pos, 0, model.cfg.n_layers)[0][:, -g:]
    kept = rule_kept_rows(model, h, pos, visual, prune, drop.mask_id, g)
    if start:
        h = model.run_layers(h, pos, 0, start)[0]
    by_count: dict[int, list[int]] = {}
    for j, rows in enumerate(kept):
        by_count.setdefault(rows.numel(), []).append(j)
    out = [None] * h.shape[0]
    for js in by_count.values():
        idx = torch.stack([kept[j] for j in js])
        hj = torch.gather(h[js], 1, idx[..., None].expand(-1, -1, h.shape[-1]))
        res = model.run_layers(hj, torch.gather(pos[js], 1, idx), start, model.cfg.n_layers)[0][:, -g:]
        for a, j in enumerate(js):
            out[j] = res[a]
    return torch.stack(out)


def probed_response_logits(model: LladaV, batch: list[Example], visuals: list[torch.Tensor], responses: torch.Tensor,
                           taps: tuple[int, ...] = (), scored: tuple[int, ...] = (),
                           drop: TokenDrop | RuleDrop | None = None):
    """response_logits, and what training-only losses read on the way (per length group, with the
    group's question indices): per layer count in `taps`, the hidden states after that many layers
    {count: [(idx, (n, N, D))]}; per layer in `scored`, the response rows' attention over the
    sequence, mean over heads and rows (export.model.attention_saliency) [[(idx, (n, N))] per layer].
    drop: visual rows dropped on the way (TokenDrop or RuleDrop; not with taps or scored)."""
    assert drop is None or not (taps or scored), "a token drop changes the rows the taps would read"
    g, n_layers = responses.shape[1], model.cfg.n_layers
    out = torch.empty(responses.shape[0], g, model.cfg.decoder.vocab_size)
    tapped, saliency = {t: [] for t in taps}, {i: [] for i in scored}
    visual = visual_rows(batch, visuals) if drop else None
    for idx, h in batch_sequences(model, batch, visuals, responses):
        pos = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
        if isinstance(drop, RuleDrop):
            h = run_rule_dropping(model, h, pos, [visual[i] for i in idx], drop, g)
        elif drop:
            h = run_dropping(model, h, pos, [visual[i].mask for i in idx], drop)
        elif not taps and not scored:
            h, _ = model.run_layers(h, pos, 0, n_layers)
        else:
            rows = torch.arange(h.shape[1] - g, h.shape[1])
            for i in range(n_layers):
                h, s = model.run_layers(h, pos, i, i + 1, rows if i in saliency else None)
                if i + 1 in tapped:
                    tapped[i + 1].append((idx, h))
                if s is not None:
                    saliency[i].append((idx, s))
        out = out.index_put((torch.tensor(idx),), model.logits(h[:, -g:]).float())
    return out, tapped, list(saliency.values())


def draw_masks(q: int, g: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence t ~ U(0, 1) and ceil(t*G) of its G response positions masked, chosen uniformly
    (at least one). Returns the realised ratio t' = masked/G, shape (Q, 1), and the mask (Q, G).

    LLaDA masks each token independently with probability t and weights by the drawn t; at our
    batch size (24) that estimator's variance (a few masked tokens weighted by 1/t for small t)
    dominated the gradient. Masking exactly ceil(t*G) positions and weighting by the realised
    ratio keeps E[loss] the same objective with a bounded weight (at most G)."""
    t = torch.rand(q, 1, generator=gen)
    n = torch.clamp(torch.ceil(t * g), min=1)  # (Q, 1)
    rank = torch.rand(q, g, generator=gen).argsort(dim=1).argsort(dim=1)  # a random permutation per row
    return n / g, rank < n


def masked_ce(logits: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """LLaDA's SFT loss: sum over masked response positions of CE / t, over the response length,
    averaged over sequences. logits (Q, G, vocab), target and masked (Q, G), t (Q, 1)."""
    ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (Q, G)
    return ((ce * masked / t).sum(1) / target.shape[1]).mean()


def sft_loss(model: LladaV, batch: list[Example], visuals: list[torch.Tensor], length: int, mask_id: int,
             gen: torch.Generator) -> torch.Tensor:
    """The SFT loss of the batch's responses cut to `length`; prompts are never masked."""
    return probed_sft_loss(model, batch, visuals, length, mask_id, gen)[0]


def probed_sft_loss(model: LladaV, batch: list[Example], visuals: list[torch.Tensor], length: int, mask_id: int,
                    gen: torch.Generator, taps: tuple[int, ...] = (), scored: tuple[int, ...] = (),
                    drop: TokenDrop | RuleDrop | None = None):
    """sft_loss, with the taps and saliency probed_response_logits reads on the way, and the response
    ids as the model saw them (Q, length), masks included: (loss, taps, saliency, responses)."""
    target = torch.tensor([r[:length] for ex in batch for r in ex.responses])  # (Q, G)
    t, masked = draw_masks(*target.shape, gen)
    responses = torch.where(masked, mask_id, target)
    logits, tapped, saliency = probed_response_logits(model, batch, visuals, responses, taps, scored, drop)
    return masked_ce(logits, target, masked, t), tapped, saliency, responses


# ---------------------------------------------------------------- monitoring


@torch.no_grad()
def one_pass_accuracy(model: LladaV, examples: list[Example], tok: TextTokenizer, length: int = 8) -> dict[str, float]:
    """Per question kind, the share answered exactly when the whole response is predicted in one
    pass from all masks (a cheap training monitor; the harness runs the real denoising loop)."""
    ids = tok.ids
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(examples), 4):
        batch = examples[i : i + 4]
        target = torch.tensor([r[:length] for ex in batch for r in ex.responses])
        pred = response_logits(model, batch, scene_visuals(model, batch), torch.full_like(target, ids.mask)).argmax(-1)
        asked = [q for ex in batch for q in ex.questions]
        for q, p, t in zip(asked, pred.tolist(), target.tolist()):
            hits.setdefault(q.report_kind, []).append(_until_stop(p, ids) == _until_stop(t, ids))
    return _by_kind(hits)


def sampled_answers(model: LladaV, examples: list[Example], tok: TextTokenizer, length: int = 8) -> list[list[int]]:
    """Per question (example after example), the answer ids of the real sampler
    (runtime.schedule.denoise: greedy, one token per step, stop at <|eot_id|>, EOS banned at
    masked positions as LLaDA-V's generate does) on the example's own sequence."""
    from runtime.schedule import GenerationSettings, denoise

    gen = GenerationSettings(steps=length, gen_length=length, block_length=length)
    out = []
    for ex in examples:
        visuals = scene_visuals(model, [ex])
        for i in range(len(ex.questions)):
            one = ex.alone(i)

            def forward(x: np.ndarray) -> np.ndarray:
                return response_logits(model, [one], visuals, torch.from_numpy(x)[None])[0].numpy()

            out.append([int(t) for t in denoise(forward, gen, tok.ids).answer])
    return out


def sampled_accuracy(model: LladaV, examples: list[Example], tok: TextTokenizer, length: int = 8) -> dict[str, float]:
    """Per question kind, the share sampled_answers gets exactly; one_pass_accuracy can overstate
    it: where the model hesitates between a short and a long answer, the short one's padding rows
    (EOS, banned) hand their confidence to the long one's tokens (docs/cameras.md)."""
    hits: dict[str, list[bool]] = {}
    asked = [(q, r) for ex in examples for q, r in zip(ex.questions, ex.responses)]
    for (q, response), answer in zip(asked, sampled_answers(model, examples, tok, length)):
        hits.setdefault(q.report_kind, []).append(answer == _until_stop(list(response), tok.ids))
    return _by_kind(hits)


def _by_kind(hits: dict[str, list[bool]]) -> dict[str, float]:
    """Per question kind (sorted) the share of hits, and over every question ('overall')."""
    acc = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    acc["overall"] = float(np.mean([h for v in hits.values() for h in v]))
    return acc


def _until_stop(ids_list: list[int], ids) -> list[int]:
    for n, i in enumerate(ids_list):
        if i in (ids.eot, ids.eos):
            return ids_list[:n]
    return ids_list


# ---------------------------------------------------------------- the run


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' and biases' vectors)."""
    params = list(params)
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def write_state(path: Path, identity: dict, model, heads, opt, step: int, elapsed: float, log: list) -> None:
    """A run's checkpointed state (identity: what a resume must match), through a temporary name."""
    state = {**identity, "model": model.state_dict(), "heads": heads.state_dict(), "optimizer": opt.state_dict(),
             "step": step, "elapsed": elapsed, "log": log}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore(state: dict, model, heads, opt) -> tuple[int, float, list]:
    """Load a checkpointed state (write_state's) into the run's objects; returns (step, elapsed, log)."""
    model.load_state_dict(state["model"])
    heads.load_state_dict(state["heads"])
    opt.load_state_dict(state["optimizer"])
    return state["step"], state["elapsed"], state["log"]


class Run:
    """One training run: model, optimizer, data, checkpointed state and log in run_dir."""

    def __init__(self, settings: TrainSettings, run_dir: Path):
        self.s, self.dir = settings, run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        tok_dir = self.dir / "tokenizer"
        files, self.token_ids = tokenizer_files(miniature_tokenizer())
        tok_dir.mkdir(exist_ok=True)
        for name, text in files.items():
            (tok_dir / name).write_text(text)
        self.tok_files = files
        self.tok = TextTokenizer(tok_dir)
        self.cfg = PRESETS["miniature"]
        torch.manual_seed(settings.seed)
        self.model = LladaV(self.cfg)
        init_weights(self.model, settings.seed)
        self.heads = TokenHeads(self.cfg.decoder.d_model)
        self.opt = adamw([*self.model.parameters(), *self.heads.parameters()], settings.lr, settings.weight_decay)
        self.encoder = Encoder(self.tok, self.cfg.geometry, settings.response_lengths[1])
        self.step, self.elapsed, self.log = 0, 0.0, []
        self._resume()

    def _resume(self) -> None:
        path = self.dir / STATE
        if not path.is_file():
            return
        state = torch.load(path, weights_only=False)
        if state["settings"] != dataclasses.asdict(self.s):
            raise LladaVError(
                f"run dir {str(self.dir)!r}: holds a run with settings {state['settings']}; expected "
                f"{dataclasses.asdict(self.s)} (use another --run-dir or delete it)"
            )
        self.step, self.elapsed, self.log = restore(state, self.model, self.heads, self.opt)
        print(f"resumed at step {self.step}/{self.s.steps} ({self.elapsed / 60:.1f} min trained)", flush=True)

    def save(self) -> None:
        write_state(self.dir / STATE, {"settings": dataclasses.asdict(self.s)}, self.model, self.heads, self.opt,
                    self.step, self.elapsed, self.log)
        header = "step,phase,samples,loss,token_loss,lr,minutes,val_overall\n"
        rows = "".join(f"{r['step']},{r['phase']},{r['samples']},{r['loss']:.5f},{r['token_loss']:.5f},{r['lr']:.6f},"
                       f"{r['minutes']:.2f},{r.get('val_overall', '')}\n" for r in self.log)
        (self.dir / LOG).write_text(header + rows)

    @property
    def phase(self) -> str:
        return self.s.phase(self.step)

    def batch(self) -> list[Example]:
        """The current step's training scenes, each asking the questions its stage asks; every
        stage reads the next scenes of the run's stretch of training seeds."""
        s, phase = self.s, self.phase
        seeds = training_seeds(s.seed, s.first_scene(self.step), s.scenes_per(phase))
        scenes = self.encoder.examples(seeds, text=phase != "vision")
        if kind_of(phase) != "focus":
            return scenes
        return [ex.asking(kinds) for ex, kinds in zip(scenes, s.focus_kinds(self.step))]

    def train_step(self) -> tuple[float, float]:
        """One optimizer step of the current stage: (SFT loss or 0, token-label loss)."""
        s = self.s
        for group in self.opt.param_groups:
            group["lr"] = s.lr_at(self.step)
        batch = self.batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16_autocast and self.phase in ("vision", "sft")):
            if self.phase == "vision":
                sft, (tokens, _) = torch.zeros(()), token_loss(self.heads, batch, scene_visuals(self.model, batch))
                loss = tokens
            else:
                gen = torch.Generator().manual_seed(s.seed * 1_000_003 + self.step)
                length = int(np.random.default_rng([s.seed, self.step]).integers(*s.response_lengths, endpoint=True))
                focus = kind_of(self.phase) == "focus"
                visuals = scene_visuals(self.model, batch)
                sft = sft_loss(self.model, batch, visuals, s.focus_response_length if focus else length,
                               self.tok.ids.mask, gen)
                tokens = torch.zeros(()) if focus else token_loss(self.heads, batch, visuals)[0]
                loss = sft + s.token_loss_weight * tokens
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.heads.parameters()], 1.0)
        self.opt.step()
        return float(sft.detach()), float(tokens.detach())


    def train(self) -> None:
        s = self.s
        validation = self.encoder.examples(VALIDATION_SEEDS[: s.validation_scenes])
        last_save, start, losses = time.time(), time.time() - self.elapsed, []
        while self.step < s.steps:
            self.model.train()
            phase = self.phase
            losses.append(self.train_step())
            self.step += 1
            self.elapsed = time.time() - start
            if self.step % 20 == 0 or self.step in s.stage_ends:
                sft, tokens = np.mean(losses, axis=0)
                row = {"step": self.step, "phase": phase, "samples": s.questions_before(self.step), "loss": float(sft),
                       "token_loss": float(tokens), "lr": s.lr_at(self.step - 1), "minutes": self.elapsed / 60}
                losses = []
                if (phase != "vision" and (self.step - s.vision_steps) % s.eval_every == 0) or self.step in s.stage_ends:
                    row.update(self.validate(validation, phase))
                self.log.append(row)
                print(f"step {self.step}/{s.steps} ({phase}) samples {row['samples']} loss {row['loss']:.4f} "
                      f"token loss {row['token_loss']:.4f} lr {row['lr']:.2e} {row['minutes']:.1f} min", flush=True)
            if time.time() - last_save > s.checkpoint_seconds or self.step == s.steps:
                self.save()
                last_save = time.time()

    @torch.no_grad()
    def validate(self, validation: list[Example], phase: str) -> dict:
        """Token-label accuracy on the validation scenes and, after stage 1, one-pass answer accuracy."""
        self.model.eval()
        _, acc = token_loss(self.heads, validation, scene_visuals(self.model, validation))
        out = {"token_acc": {a: round(x, 4) for a, x in zip(TOKEN_ATTRIBUTES, acc)}}
        print("  validation token accuracy: " + " ".join(f"{k} {v:.2f}" for k, v in out["token_acc"].items()), flush=True)
        if phase != "vision":
            answers = one_pass_accuracy(self.model, validation, self.tok)
            out["val_overall"] = round(answers["overall"], 4)
            out["val"] = {k: round(v, 4) for k, v in answers.items()}
            print("  validation (one pass): " + " ".join(f"{k} {v:.2f}" for k, v in answers.items()), flush=True)
        return out

    def write(self, out: Path) -> Path:
        """The trained weights in the Hugging Face layout (bf16, as LLaDA-V ships)."""
        state = {k: v.detach().to(torch.bfloat16) for k, v in self.model.state_dict().items()}
        return write_checkpoint(out, config_to_json(self.cfg, self.token_ids), state, self.tok_files)


def plot_loss(log: list[dict], path: Path, settings: TrainSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    log = [r for r in log if r["phase"] != "vision"]  # stage 1 trains the vision tower alone: no answers yet
    ax.plot([r["samples"] for r in log], [r["loss"] for r in log], lw=1, label="SFT loss (mean of 20 steps)")
    for n, (phase, _, _) in enumerate(settings.stages()[2:], start=3):
        kinds = [k for k, w in settings.focus_weights_of(phase) if w] if kind_of(phase) == "focus" else []
        label = f"stage {n}: " + (", ".join(kinds) + " only" if kinds else "review")
        first = next((r["samples"] for r in log if r["phase"] == phase), None)
        before = [r["samples"] for r in log if first is not None and r["samples"] < first]
        if before:
            ax.axvline(max(before), color="grey", ls=":", lw=1)
            ax.text(max(before), 0.03, label + " ", transform=ax.get_xaxis_transform(), fontsize=7, color="grey",
                    rotation=90, ha="right", va="bottom")
    ax.set_xlabel("training questions seen")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    val = [r for r in log if "val_overall" in r]
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["samples"] for r in val], [r["val_overall"] for r in val], "o-", color="C1", ms=3,
                 label="validation accuracy (one pass)")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("miniature LLaDA-V: SFT on driving scenes (stage 2 on)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m miniature.train", description=__doc__.split("\n\n")[0])
    d = TrainSettings()
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation, masking and scene order")
    p.add_argument("--vision-steps", type=int, default=d.vision_steps,
                   help=f"stage 1 steps of {d.vision_scenes_per_step} scenes: vision tower and projector on token labels")
    p.add_argument("--samples", type=int, default=d.samples, help="stage 2 (SFT) training questions, six per scene")
    p.add_argument("--focus-steps", type=int, default=d.focus_steps,
                   help=f"stage 3 steps of {d.focus_scenes_per_step} scenes x {d.focus_questions_per_scene} questions")
    p.add_argument("--scenes-per-step", type=int, default=d.scenes_per_step)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--run-dir", type=Path, default=RUN_DIR, help="checkpointed state and log (resumed if present)")
    p.add_argument("--out", type=Path, default=CHECKPOINT, help="where the trained checkpoint is written")
    p.add_argument("--report", type=Path, default=TRAINING, help="where loss.png and training.json go")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    settings = TrainSettings(seed=args.seed, vision_steps=args.vision_steps, samples=args.samples, focus_steps=args.focus_steps,
                             scenes_per_step=args.scenes_per_step, lr=args.lr)
    def train():
        run = Run(settings, args.run_dir)
        n_params = sum(p.numel() for p in run.model.parameters())
        print(f"miniature: {n_params / 1e6:.2f}M parameters; {settings.vision_steps} vision steps, "
              f"{settings.sft_steps} SFT steps, {settings.focus_steps} focus steps, {settings.review_steps} review steps"
              + "".join(f"; round {i}: {focus} steps on {', '.join(kinds)}, {review} review steps"
                        for i, (kinds, focus, review) in enumerate(settings.rounds, start=2)), flush=True)
        run.train()
        out = run.write(args.out)
        args.report.mkdir(parents=True, exist_ok=True)
        plot_loss(run.log, args.report / "loss.png", settings)
        write_json(args.report / "training.json", {"settings": dataclasses.asdict(settings),
                                                       "minutes": run.elapsed / 60, "log": run.log})
        return run, out

    status, got = at_boundary(train, interrupted="interrupted: the last checkpoint in the run dir resumes the run")
    if status is not None:
        return status
    run, out = got
    print(f"trained in {run.elapsed / 60:.1f} min; checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
