"""The LLaDA masked-diffusion loop over the response, independent of how logits are computed.

`denoise(forward, settings, ids)` calls `forward(response_ids) -> logits (G, vocab)` once per
denoising step and applies LLaDA's unmasking rule (docs/generation.md, LLaDA `generate.py`,
LLaDA-V `generate_with_embeds`): semi-autoregressive blocks, a fixed number of tokens unmasked
per step, the most confident first, special tokens never generated, stop at `<|eot_id|>`.
With a threshold, Fast-dLLM's parallel rule replaces the fixed count (docs/caching.md).
The PyTorch reference and every runtime backend share this loop, so they differ only in
`forward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.errors import LladaVError, expect
from runtime.tokens import TokenIds

REMASKING = ("low_confidence", "random")


@dataclass(frozen=True)
class GenerationSettings:
    """LLaDA sampling settings. LLaDA-V evaluates with temperature 0 (docs/generation.md)."""

    steps: int = 32
    gen_length: int = 32
    block_length: int = 32
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    stop_at_eot: bool = True
    seed: int = 0
    # Fast-dLLM's parallel decoding: in the current block, unmask every masked position whose
    # confidence exceeds it, at least one per step, instead of the fixed count (0: off)
    threshold: float = 0.0

    def validate(self) -> "GenerationSettings":
        for name in ("steps", "gen_length", "block_length"):
            value = getattr(self, name)
            expect(isinstance(value, int) and value >= 1, f"{name}: got {value!r}; expected an integer >= 1")
        expect(
            self.gen_length % self.block_length == 0,
            f"block_length: got {self.block_length}; expected a divisor of gen_length={self.gen_length}",
        )
        expect(
            self.steps % self.num_blocks == 0,
            f"steps: got {self.steps}; expected a multiple of the number of blocks "
            f"gen_length/block_length={self.num_blocks}",
        )
        expect(self.steps <= self.gen_length, f"steps: got {self.steps}; expected <= gen_length={self.gen_length}")
        expect(self.temperature >= 0, f"temperature: got {self.temperature}; expected >= 0")
        expect(self.cfg_scale >= 0, f"cfg_scale: got {self.cfg_scale}; expected >= 0")
        expect(self.remasking in REMASKING, f"remasking: got {self.remasking!r}; expected one of {REMASKING}")
        expect(0 <= self.threshold < 1, f"threshold: got {self.threshold!r}; expected a probability in [0, 1) (0: off)")
        expect(self.threshold == 0 or self.remasking == "low_confidence",
               f"threshold: {self.threshold} needs remasking 'low_confidence' (a probability to compare); got "
               f"{self.remasking!r}")
        return self

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


@dataclass
class DenoiseResult:
    response: np.ndarray  # (G,) int64; positions after a stop stay masked
    answer: np.ndarray  # the response up to (not including) the first <|eot_id|>
    stop: int | None  # index of the first <|eot_id|> in the response, if any
    transfers: list[int] = field(default_factory=list)  # tokens unmasked at each step run
    scheduled: list[int] = field(default_factory=list)  # the schedule's count at each step run


def transfer_counts(n_masked: int, steps: int) -> list[int]:
    """n // steps tokens per step, one more in the first n % steps steps."""
    base, extra = divmod(n_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def probability_of(logits: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """softmax(logits)[x0] per row: exp(l[x0] - max) / sum(exp(l - max)), the sum in float64.

    One pass of float32 exponentials over the vocabulary instead of a float64 log-softmax matrix
    (LLaDA-V takes its softmax in float64; the sum here is accumulated in float64).
    """
    top = logits.max(axis=-1)
    denom = np.exp(logits - top[:, None]).sum(axis=-1, dtype=np.float64)
    picked = logits[np.arange(logits.shape[0]), x0].astype(np.float64)
    return np.exp(picked - top) / denom


def propose(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator):
    """Candidate tokens x0 and their confidence for each row of `logits` (rows, vocab).

    Temperature > 0 samples with Gumbel noise: LLaDA's argmax(exp(l) / (-log u)^T) written as
    argmax(l - T * log(-log u)), the same argmax without float64 overflow.
    """
    if settings.temperature > 0:
        u = rng.random(logits.shape)
        x0 = np.argmax(logits.astype(np.float64) - settings.temperature * np.log(-np.log(u)), axis=-1)
    else:
        x0 = np.argmax(logits, axis=-1)
    if settings.remasking == "low_confidence":
        confidence = probability_of(logits, x0)
    else:
        confidence = rng.random(x0.shape[0])
    return x0.astype(np.int64), confidence


def most_confident(confidence: np.ndarray, eligible: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most confident eligible positions; ties go to the lower index."""
    candidates = np.flatnonzero(eligible)
    order = np.argsort(-confidence[candidates], kind="stable")
    return candidates[order[:k]]


def suppressed_rows(logits: np.ndarray, rows: np.ndarray, ids: TokenIds) -> np.ndarray:
    """A float32 copy of the given (masked) rows with BOS, EOS and the header ids at -inf
    (LLaDA-V generate_with_embeds); only rows that may be unmasked are copied."""
    out = np.array(logits[rows], dtype=np.float32)
    banned = [t for t in ids.never_generated if t < out.shape[-1]]
    out[:, banned] = -np.inf
    return out


def above_threshold(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Indices whose confidence exceeds the threshold; the most confident one if none does."""
    hits = np.flatnonzero(confidence > threshold)
    return hits if hits.size else np.array([int(np.argmax(confidence))])


def denoise(forward, settings: GenerationSettings, ids: TokenIds, on_step=None) -> DenoiseResult:
    """Run the masked-diffusion loop; `forward(response_ids)` returns the response logits (rows
    outside the current block may be anything: they are never read). A forward with a
    `start_block(start, end)` method hears of each block before its first step (KV caching).
    `on_step(step, steps, unmasked, masked_left)` is called after every step (progress); with a
    threshold, `steps` is the most the loop may take (one token per step)."""
    settings.validate()
    rng = np.random.default_rng(settings.seed)
    g, bl = settings.gen_length, settings.block_length
    x = np.full(g, ids.mask, dtype=np.int64)
    stop = None
    result = DenoiseResult(x, x, None)
    for block in range(settings.num_blocks):
        start, end = block * bl, (block + 1) * bl
        if stop is not None and stop <= start:
            break
        n_masked = int(np.sum(x[start:end] == ids.mask))
        counts = [0] * n_masked if settings.threshold else transfer_counts(n_masked, settings.steps_per_block)
        if hasattr(forward, "start_block"):
            forward.start_block(start, end)
        for k in counts:
            masked = x == ids.mask
            limit = end if stop is None else min(stop, end)
            if not masked[start:limit].any():
                break  # the block (or everything before the stop) is filled: end it early
            logits = forward(x.copy())
            if logits.shape != (g, logits.shape[-1]):
                raise LladaVError(f"forward: returned logits of shape {logits.shape}; expected ({g}, vocab)")
            rows = np.flatnonzero(masked & (np.arange(g) < limit))  # the positions this step may unmask
            x0, confidence = propose(suppressed_rows(logits, rows, ids), settings, rng)
            if settings.threshold:
                picked = above_threshold(confidence, settings.threshold)
            else:
                picked = most_confident(confidence, np.ones(rows.size, bool), k)
            chosen = rows[picked]
            x[chosen] = x0[picked]
            result.transfers.append(len(chosen))
            result.scheduled.append(k if not settings.threshold else len(chosen))
            if settings.stop_at_eot:
                stop = first_eot(x, ids.eot, stop)
            if on_step is not None:
                on_step(len(result.transfers), g if settings.threshold else settings.steps, len(chosen),
                        int(np.sum(x == ids.mask)))
    result.response, result.stop = x, stop
    result.answer = x[:stop] if stop is not None else x
    return result


def first_eot(x: np.ndarray, eot: int, stop: int | None) -> int | None:
    hits = np.flatnonzero(x == eot)
    if hits.size == 0:
        return stop
    return int(hits[0]) if stop is None else min(stop, int(hits[0]))
