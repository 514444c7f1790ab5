"""Teach the shipped miniature its cameras: a resumable fine-tune on camera rigs (docs/cameras.md).

    python -m miniature.rig_finetune --run-dir runs/rig-finetune --out runs/rig-finetune/checkpoint

Starts from the embedded checkpoint. Every step trains on `rigs_per_step` camera rigs (all their
questions: one per camera naming it, one spanning them; miniature.scenes.rig) and
`scenes_per_step` single-image scenes (all six questions), so the single-image skill is rehearsed
while the rigs are learned. LLaDA's SFT loss (miniature.train.sft_loss) at a response length drawn
per step, plus `token_loss_weight` x the token-label loss (miniature.train.token_loss: what each
visual token's cell holds, through training-only heads), which teaches the vision tower the padded
128-px views as the original run's first stages taught it AnyRes tiles; AdamW, linear warmup then
cosine decay. The state is checkpointed every
`checkpoint_seconds` (temporary name, then rename) and a re-run resumes it; the log records the
loss and one-pass accuracy on validation rigs and scenes that no step trains on. When done, the
weights are written as a checkpoint in the Hugging Face layout (bf16), the embedded one's config and
tokenizer beside them, with the run's record (training.json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from miniature import embedded_checkpoint
from miniature.data import IGNORE, VALIDATION_SEEDS, Encoder
from miniature.scenes import RIG_CAMERA_KINDS, RIG_CAMERAS, RIG_TEMPLATES, RigScene, camera_answers
from miniature.train import (RuleDrop, TokenDrop, TokenHeads, adamw, one_pass_accuracy, probed_response_logits, probed_sft_loss,
                             restore, sampled_accuracy, scene_visuals, token_loss, warmup_cosine, write_state)
from runtime.anyres import ANYRES, PAD
from runtime.errors import LladaVError

STATE = "rig_state.pt"
VALIDATION_RIGS = range(999_000, 999_000 + 24)  # in the training rigs' range, never reached by a run
FIRST_RIG, FIRST_SCENE = 0, 8_000_000  # the stretches the steps read (single scenes: apart from the first run's)
FIRST_VISION_RIG, FIRST_VISION_SCENE = 500_000, 8_500_000  # the vision stage's
FIRST_PAD_SCENE = 9_000_000  # stage 2's single scenes through one padded view
FIRST_COUNT_RIG = 600_000  # stage 2's rigs asking only the all-camera count


def draw_camera_kinds(run_seed: int, r: RigScene, contrastive: bool = False,
                      weights: tuple[float, ...] | None = None) -> tuple[str, ...]:
    """Stage 2's draw: per camera one of RIG_CAMERA_KINDS, fixed by the run's seed and the rig;
    uniformly, or in proportion to `weights` (one per kind, in RIG_CAMERA_KINDS order; the camera's
    scene does not enter the draw, so which kind is asked says nothing about the answer).
    contrastive: only among the kinds whose answer for this camera differs from every other
    camera's answer to the same kind (when one does), so answering needs the camera the question
    names: another camera's answer is wrong."""
    rng = np.random.default_rng([run_seed, r.seed, 11])
    answers = {k: camera_answers(r, k) for k in RIG_CAMERA_KINDS}
    w = dict(zip(RIG_CAMERA_KINDS, weights or (1.0,) * len(RIG_CAMERA_KINDS)))
    out = []
    for i in range(len(r.cameras)):
        unique = [k for k in RIG_CAMERA_KINDS if answers[k].count(answers[k][i]) == 1]
        pool = unique if contrastive and unique else list(RIG_CAMERA_KINDS)
        p = np.array([w[k] for k in pool], dtype=np.float64)
        uniform = bool(np.all(p == p[0]))  # as drawn before kind weights existed
        out.append(str(rng.choice(pool) if uniform else rng.choice(pool, p=p / p.sum())))
    return tuple(out)


class RigHeads(nn.Module):
    """Training-only heads, not part of the checkpoint: TokenHeads on the visual tokens, and a linear
    head reading which camera a visual row comes from out of the decoder's hidden state."""

    def __init__(self, d_model: int):
        super().__init__()
        self.tokens = TokenHeads(d_model)
        self.camera = nn.Linear(d_model, len(RIG_CAMERAS))  # on RMS-normed hidden states (camera_loss)


def camera_rows(batch: list, visuals: list) -> list[torch.Tensor]:
    """Per question of the batch (batch order), per sequence row: the index in RIG_CAMERAS of the
    camera a visual row comes from, IGNORE on text rows and on single-image scenes."""
    out = []
    for ex, images in zip(batch, visuals):
        for prompt in ex.prompts:
            parts = []
            for seg in prompt.segments():
                n = len(seg) if isinstance(seg, tuple) else images[seg].shape[0]
                label = RIG_CAMERAS.index(ex.cameras[seg]) if ex.cameras and not isinstance(seg, tuple) else IGNORE
                parts.append(torch.full((n,), label, dtype=torch.long))
            out.append(torch.cat(parts))
    return out


def camera_loss(head: nn.Linear, taps: list, rows: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the camera each visual row of a rig comes from, read from the hidden states
    after settings.camera_layer layers (probed_sft_loss's taps; the response rows carry no label). It asks
    the early layers to tell every visual token which camera it is, from the prompt's "front camera:"
    before its segment, so that a later layer can find the camera a question names by content."""
    logits, labels = [], []
    for idx, h in taps:
        n = h.shape[1]
        logits.append(head(F.rms_norm(h.float(), (h.shape[-1],), eps=1e-6)).flatten(0, 1))
        labels.append(torch.cat([F.pad(rows[i], (0, n - rows[i].shape[0]), value=IGNORE) for i in idx]))
    labels = torch.cat(labels)
    if not (labels != IGNORE).any():
        return torch.zeros(())
    return F.cross_entropy(torch.cat(logits), labels, ignore_index=IGNORE)


def same_scene(ex, k: int):
    """Question k of rig example ex (one naming a camera), asked alone, with every camera showing the
    view of the camera it names: the same prompt ids (so the same sequence rows) and answer, and which
    camera is read no longer matters. Derived from ex: the views, their layouts and token labels are
    the named camera's, repeated."""
    q = ex.questions[k]
    c = ex.cameras.index(q.camera)
    tiles = [layout.num_tiles for layout in ex.layouts]
    tokens = [layout.num_visual_tokens for layout in ex.layouts]
    n, t0, v0 = len(ex.layouts), sum(tiles[:c]), sum(tokens[:c])
    return dataclasses.replace(ex.alone(k), pixels=np.tile(ex.pixels[t0 : t0 + tiles[c]], (n, 1, 1, 1)),
                               layouts=(ex.layouts[c],) * n, labels=np.tile(ex.labels[v0 : v0 + tokens[c]], (n, 1)))


def same_scene_examples(encoder: Encoder, seeds) -> list:
    """Per camera question of each rig (the held-out rule), same_scene: accuracy here is reading the
    padded views alone."""
    return [same_scene(ex, k) for ex in encoder.rig_examples(seeds) for k, q in enumerate(ex.questions) if q.camera]


def counterparts(batch: list) -> tuple[list[int], list]:
    """For every question of the batch that names a camera: its index (batch order) and its
    same_scene example (one each)."""
    asked = [(ex, k) for ex in batch for k in range(len(ex.questions))]
    idx = [i for i, (ex, k) in enumerate(asked) if getattr(ex.questions[k], "camera", None)]
    return idx, [same_scene(*asked[i]) for i in idx]


def response_rows(taps: dict, g: int, q: int) -> dict[int, torch.Tensor]:
    """probed_response_logits' taps -> per layer count the response rows' hidden states (q, g, D) in
    question order."""
    out = {}
    for layer, groups in taps.items():
        rows = [None] * q
        for idx, h in groups:
            for j, i in enumerate(idx):
                rows[i] = h[j, -g:]
        out[layer] = torch.stack(rows)
    return out


def invariance_loss(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the response rows' squared distance from the teacher's, relative to the
    teacher's size (both {layer: (q, g, D)}, the same questions): the answer's computation should not
    depend on what the cameras the question does not name show."""
    return torch.stack([(student[k].float() - t.float()).pow(2).mean() / t.float().pow(2).mean()
                        for k, t in teacher.items()]).mean()


def named_cameras(batch: list) -> list[int | None]:
    """Per question of the batch (batch order), the index in RIG_CAMERAS of the camera it names (None:
    every camera, or a single scene)."""
    return [RIG_CAMERAS.index(q.camera) if getattr(q, "camera", None) else None for ex in batch for q in ex.questions]


def route_loss(saliency: list, rows: list[torch.Tensor], named: list[int | None]) -> torch.Tensor:
    """-log of the share of the response rows' attention on visual rows that lands on the camera the
    question names, mean over such questions and the layers measured. saliency: per layer
    [(question indices, (n, N) mean attention of the response rows over heads)] (rows, named: per
    question, camera_rows and named_cameras)."""
    losses = []
    for groups in saliency:
        for idx, sal in groups:
            for j, i in enumerate(idx):
                if named[i] is None:
                    continue
                r = rows[i]
                visual, own = sal[j, : r.shape[0]][r != IGNORE], sal[j, : r.shape[0]][r == named[i]]
                losses.append(-torch.log(own.sum() / visual.sum() + 1e-6))
    return torch.stack(losses).mean() if losses else torch.zeros(())


@dataclass(frozen=True)
class RigFinetuneSettings:
    seed: int = 0
    vision_steps: int = 400  # stage 1: the vision tower and projector on token labels alone
    vision_rigs_per_step: int = 8  # padded views
    vision_scenes_per_step: int = 4  # AnyRes tiles, rehearsed
    vision_lr: float = 1e-3  # after warmup, constant
    steps: int = 500  # stage 2: SFT on rigs and single scenes (+ the token-label loss)
    rigs_per_step: int = 6
    count_rigs_per_step: int = 0  # stage 2: + rigs asking only the all-camera count (their own stretch)
    scenes_per_step: int = 2
    pad_scenes_per_step: int = 0  # stage 2: + single scenes seen through one padded view (all six questions)
    drawn_kinds: bool = True  # stage 2: each camera asks a question drawn from RIG_CAMERA_KINDS
    rig_kinds: tuple[str, ...] = ()  # stage 2: the rigs ask only questions of these kinds (empty: all)
    freeze_vision: bool = False  # the tower, projector and image_newline stay the start's (no vision stage)
    contrastive: bool = False  # ... among those only its own answer to (draw_camera_kinds)
    kind_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # ... drawn in proportion to these (RIG_CAMERA_KINDS order)
    lr: float = 5e-4
    warmup_steps: int = 20
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    response_lengths: tuple[int, int] = (8, 16)
    eot_padding: bool = False  # responses padded with <|eot_id|>, not <|endoftext|> (which generation never writes)
    token_loss_weight: float = 1.0  # stage 2: SFT loss + this x the token-label loss (training-only heads)
    anchor_weight: float = 1.0  # both stages: + this x the single scenes' visual tokens' drift from the start's
    camera_loss_weight: float = 0.0  # stage 2: + this x camera_loss (which camera each visual row is from)
    camera_layer: int = 4  # ... read after this many decoder layers
    route_loss_weight: float = 0.0  # stage 2: + this x route_loss (answers attend to the camera named)
    route_layers: tuple[int, int] = (8, 24)  # ... in decoder layers [lo, hi)
    invariance_weight: float = 0.0  # stage 2: + this x invariance_loss against the start on counterparts
    invariance_layers: tuple[int, ...] = (8, 12, 16, 20, 24, 28, 32)  # ... after this many layers
    token_drop: float = 0.0  # stage 2: sequences drop U(0, this) of their visual rows (miniature.train.TokenDrop)
    drop_layer: int = 15  # ... after this many decoder layers (step-1 pruning's K)
    rule_drop: float = 0.0  # stage 2: this share of length groups pruned as the runtime prunes (RuleDrop), at K=drop_layer
    rule_drop_p: tuple[float, float] = (25.0, 75.0)  # ... at P drawn from this range
    rule_drop_at_k: float = 0.25  # ... running the reduced rows from layer K (step 1) this often, else from layer 0
    bf16_autocast: bool = True
    eval_every: int = 100
    validation_rigs: int = 24
    validation_scenes: int = 16
    checkpoint_seconds: float = 300.0


def check_drops(settings: RigFinetuneSettings) -> None:
    """A drop removes rows the camera, route and invariance losses read; the two drops exclude each other."""
    for name in ("token_drop", "rule_drop"):
        value = getattr(settings, name)
        if value and (settings.camera_loss_weight or settings.route_loss_weight or settings.invariance_weight):
            raise LladaVError(f"{name}={value}: the camera, route and invariance losses read rows a drop removes; "
                              "expected them at weight 0 with a drop")
    if settings.token_drop and settings.rule_drop:
        raise LladaVError(f"token_drop={settings.token_drop} and rule_drop={settings.rule_drop}: expected one drop")
    lo, hi = settings.rule_drop_p
    if not (0 <= lo <= hi < 100 and 0 <= settings.rule_drop <= 1):
        raise LladaVError(f"rule_drop={settings.rule_drop}, rule_drop_p={settings.rule_drop_p}: expected a share in "
                          "[0, 1] and 0 <= LO <= HI < 100")


class RigFinetune:
    """One fine-tune: the model, the optimizer, the data and the checkpointed state in run_dir."""

    def __init__(self, settings: RigFinetuneSettings, run_dir: Path, start: Path | None = None):
        from export.checkpoint import load_model
        from runtime.tokens import TextTokenizer

        self.s, self.dir = settings, Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.start = Path(start or embedded_checkpoint())
        self.model, self.ckpt = load_model(self.start, torch.float32)
        self.model.requires_grad_(True)  # loaded for inference
        if settings.freeze_vision:
            if settings.vision_steps:
                raise LladaVError(f"freeze_vision: the vision side cannot be frozen with a vision stage "
                                  f"(vision_steps={settings.vision_steps}); expected vision_steps=0")
            for part in (self.model.model.vision_tower, self.model.model.mm_projector):
                part.requires_grad_(False)
            self.model.model.image_newline.requires_grad_(False)
        check_drops(settings)
        self.tok = TextTokenizer(self.start)
        self.encoder = Encoder(self.tok, self.ckpt.config.geometry, 32, settings.eot_padding)
        self.heads = RigHeads(self.ckpt.config.decoder.d_model)
        self.anchor = copy.deepcopy(self.model).requires_grad_(False).eval()  # the start, frozen
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = adamw([*trained, *self.heads.parameters()], settings.lr, settings.weight_decay)
        self.step, self.elapsed, self.log = 0, 0.0, []
        self._resume()

    def _resume(self) -> None:
        path = self.dir / STATE
        if not path.is_file():
            return
        state = torch.load(path, weights_only=False)
        saved = {**dataclasses.asdict(RigFinetuneSettings()), **state["settings"]}  # settings added since: defaults
        if saved != dataclasses.asdict(self.s) or state["start"] != str(self.start):
            raise LladaVError(f"run dir {str(self.dir)!r}: holds a fine-tune with settings {state['settings']} from "
                              f"{state['start']}; expected {dataclasses.asdict(self.s)} from {self.start} (use another "
                              "--run-dir or delete it)")
        self.step, self.elapsed, self.log = restore(state, self.model, self.heads, self.opt)
        print(f"resumed at step {self.step}/{self.total_steps} ({self.elapsed / 60:.1f} min trained)", flush=True)

    def save(self) -> None:
        write_state(self.dir / STATE, {"settings": dataclasses.asdict(self.s), "start": str(self.start)}, self.model,
                    self.heads, self.opt, self.step, self.elapsed, self.log)

    @property
    def total_steps(self) -> int:
        return self.s.vision_steps + self.s.steps

    def lr_at(self, step: int) -> float:
        """Stage 1: linear warmup, then constant. Stage 2: warmup again, then cosine decay."""
        s = self.s
        if step < s.vision_steps:
            return s.vision_lr * min(1.0, (step + 1) / s.warmup_steps)
        return warmup_cosine(step - s.vision_steps, s.steps, s.warmup_steps, s.lr, s.final_lr_ratio)

    def batch(self, step: int) -> list:
        """The step's rigs and single scenes: every step reads the next ones of its stage's stretch."""
        s = self.s
        if step < s.vision_steps:
            rigs = np.arange(s.vision_rigs_per_step) + FIRST_VISION_RIG + step * s.vision_rigs_per_step
            scenes = np.arange(s.vision_scenes_per_step) + FIRST_VISION_SCENE + step * s.vision_scenes_per_step
            return self.encoder.rig_examples(rigs) + self.encoder.examples(scenes, text=False)
        i = step - s.vision_steps
        rigs = np.arange(s.rigs_per_step) + FIRST_RIG + i * s.rigs_per_step
        scenes = np.arange(s.scenes_per_step) + FIRST_SCENE + i * s.scenes_per_step
        pad = np.arange(s.pad_scenes_per_step) + FIRST_PAD_SCENE + i * s.pad_scenes_per_step
        counted = np.arange(s.count_rigs_per_step) + FIRST_COUNT_RIG + i * s.count_rigs_per_step
        kinds = (functools.partial(draw_camera_kinds, s.seed, contrastive=s.contrastive, weights=s.kind_weights)
                 if s.drawn_kinds else None)
        rig_examples = self.encoder.rig_examples(rigs, kinds)
        if s.rig_kinds:
            rig_examples = [ex.asking(s.rig_kinds) for ex in rig_examples]
        rig_examples += [ex.asking(("all_count",)) for ex in self.encoder.rig_examples(counted)]
        return rig_examples + self.encoder.examples(scenes) + self.encoder.examples(pad, layout=PAD)

    def train_step(self) -> float:
        s = self.s
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        batch = self.batch(self.step)
        self.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16_autocast):
            visuals = scene_visuals(self.model, batch)
            loss = s.anchor_weight * self.drift(batch, visuals) if s.anchor_weight else torch.zeros(())
            if self.step < s.vision_steps:
                loss = loss + token_loss(self.heads.tokens, batch, visuals)[0]
            else:
                gen = torch.Generator().manual_seed(s.seed * 1_000_003 + self.step)
                length = int(np.random.default_rng([s.seed, self.step, 7]).integers(*s.response_lengths, endpoint=True))
                taps = {s.camera_layer} if s.camera_loss_weight else set()
                taps |= set(s.invariance_layers) if s.invariance_weight else set()
                scored = tuple(range(*s.route_layers)) if s.route_loss_weight else ()
                drop = self.drop()
                sft, tapped, saliency, responses = probed_sft_loss(self.model, batch, visuals, length,
                                                                   self.tok.ids.mask, gen, tuple(sorted(taps)), scored,
                                                                   drop)
                loss = loss + sft
                rows = camera_rows(batch, visuals) if s.camera_loss_weight or scored else None
                if s.camera_loss_weight:
                    loss = loss + s.camera_loss_weight * camera_loss(self.heads.camera, tapped[s.camera_layer], rows)
                if scored:
                    loss = loss + s.route_loss_weight * route_loss(saliency, rows, named_cameras(batch))
                if s.invariance_weight:
                    loss = loss + s.invariance_weight * self.invariance(batch, tapped, responses)
                if s.token_loss_weight:
                    loss = loss + s.token_loss_weight * token_loss(self.heads.tokens, batch, visuals)[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())

    def drop(self) -> TokenDrop | RuleDrop | None:
        """This step's visual-row drop, if the settings ask for one (seeded by the step: resumable)."""
        s = self.s
        gen = torch.Generator().manual_seed(s.seed * 7_919 + self.step)
        if s.rule_drop:
            return RuleDrop(s.drop_layer, s.rule_drop, s.rule_drop_p, s.rule_drop_at_k, self.tok.ids.mask, gen)
        return TokenDrop(s.drop_layer, s.token_drop, gen) if s.token_drop else None

    def invariance(self, batch: list, tapped: dict, responses: torch.Tensor) -> torch.Tensor:
        """invariance_loss of the camera questions' response rows against the starting model's on
        their counterparts (every camera showing the named scene; the same masked responses)."""
        idx, twins = counterparts(batch)
        if not idx:
            return torch.zeros(())
        layers = self.s.invariance_layers
        with torch.no_grad():
            _, t_taps, _ = probed_response_logits(self.anchor, twins, scene_visuals(self.anchor, twins),
                                                  responses[idx], layers)
        q, g = responses.shape
        student = response_rows({k: tapped[k] for k in layers}, g, q)
        return invariance_loss({k: v[idx] for k, v in student.items()}, response_rows(t_taps, g, len(idx)))

    def drift(self, batch: list, visuals: list) -> torch.Tensor:
        """The single scenes' (AnyRes) visual tokens' squared distance from the starting model's,
        relative to their size: it keeps the single-image path the decoder was trained on while
        the tower learns the padded views."""
        single = [(ex, v) for ex, v in zip(batch, visuals) if ex.layouts[0].mode == ANYRES]
        if not single:
            return torch.zeros(())
        with torch.no_grad():
            start = scene_visuals(self.anchor, [ex for ex, _ in single])
        now, then = torch.cat([v[0] for _, v in single]).float(), torch.cat([v[0] for v in start]).float()
        return (now - then).pow(2).mean() / then.pow(2).mean()

    @torch.no_grad()
    def validate(self) -> dict:
        """One-pass accuracy on the validation rigs and scenes, and the real sampler's on the rigs
        (val_rigs_sampled: what the harness measures); and, to tell reading a padded view from
        routing a question to its camera, on the same rigs with every camera showing the scene the
        question names (val_same: routing cannot matter) and on the scenes seen through one padded
        view (val_pad)."""
        self.model.eval()
        rigs = VALIDATION_RIGS[: self.s.validation_rigs]
        scenes = VALIDATION_SEEDS[: self.s.validation_scenes]
        rig_examples = self.encoder.rig_examples(rigs)
        out = {"val_rigs": one_pass_accuracy(self.model, rig_examples, self.tok),
               "val_rigs_sampled": sampled_accuracy(self.model, rig_examples, self.tok),
               "val_single": one_pass_accuracy(self.model, self.encoder.examples(scenes), self.tok),
               "val_same": one_pass_accuracy(self.model, same_scene_examples(self.encoder, rigs), self.tok),
               "val_pad": one_pass_accuracy(self.model, self.encoder.examples(scenes, layout=PAD), self.tok)}
        return {name: {k: round(v, 4) for k, v in acc.items()} for name, acc in out.items()}

    def train(self) -> None:
        s, losses = self.s, []
        last_save, begin = time.time(), time.time() - self.elapsed
        if self.step == 0 and not self.log:
            self.log.append({"step": 0, **self.validate()})
            print(f"step 0: {self.log[-1]}", flush=True)
        while self.step < self.total_steps:
            losses.append(self.train_step())
            self.step += 1
            self.elapsed = time.time() - begin
            if self.step % 10 == 0 or self.step == self.total_steps:
                row = {"step": self.step, "loss": float(np.mean(losses)), "lr": self.lr_at(self.step - 1),
                       "minutes": self.elapsed / 60}
                losses = []
                if self.step % s.eval_every == 0 or self.step == self.total_steps:
                    row.update(self.validate())
                self.log.append(row)
                print(f"step {self.step}/{self.total_steps}: {row}", flush=True)
            if time.time() - last_save > s.checkpoint_seconds or self.step == self.total_steps:
                self.save()
                last_save = time.time()

    def write(self, out: Path) -> Path:
        """The weights (bf16, as LLaDA-V ships) beside the starting checkpoint's config and tokenizer,
        with the run's record."""
        from export.checkpoint import CONFIG, TOKENIZER_FILES, write_checkpoint
        from runtime.files import read_json, write_json

        files = {n: (self.start / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES if (self.start / n).is_file()}
        state = {k: v.detach().to(torch.bfloat16) for k, v in self.model.state_dict().items()}
        path = write_checkpoint(out, read_json(self.start / CONFIG, "config"), state, files)
        write_json(self.dir / "training.json", {"settings": dataclasses.asdict(self.s), "start": str(self.start),
                                                "minutes": self.elapsed / 60, "log": self.log})
        return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/rig-finetune"), help="state and log (resumed)")
    ap.add_argument("--out", type=Path, help="where the fine-tuned checkpoint goes (default: RUN_DIR/checkpoint)")
    ap.add_argument("--vision-steps", type=int, default=RigFinetuneSettings.vision_steps,
                    help="stage 1's steps: the vision tower on token labels alone (0: none)")
    ap.add_argument("--steps", type=int, default=RigFinetuneSettings.steps, help="stage 2's steps (SFT)")
    ap.add_argument("--scenes-per-step", type=int, default=RigFinetuneSettings.scenes_per_step,
                    help="stage 2's single-image scenes rehearsed per step")
    ap.add_argument("--pad-scenes-per-step", type=int, default=RigFinetuneSettings.pad_scenes_per_step,
                    help="stage 2's single-image scenes seen through one padded view per step (all six questions)")
    ap.add_argument("--contrastive", action="store_true",
                    help="stage 2: each camera asks only what its own answer differs in (draw_camera_kinds)")
    ap.add_argument("--kind-weights", type=float, nargs=len(RIG_CAMERA_KINDS), default=RigFinetuneSettings.kind_weights,
                    metavar="W", help="stage 2: how often each camera question kind is drawn, relative, in the order "
                    f"{' '.join(RIG_CAMERA_KINDS)}")
    ap.add_argument("--token-loss-weight", type=float, default=RigFinetuneSettings.token_loss_weight,
                    help="the token-label loss's weight (0: SFT only)")
    ap.add_argument("--camera-loss-weight", type=float, default=RigFinetuneSettings.camera_loss_weight,
                    help="stage 2: + this x the loss of telling each visual row's camera after --camera-layer layers")
    ap.add_argument("--camera-layer", type=int, default=RigFinetuneSettings.camera_layer)
    ap.add_argument("--route-loss-weight", type=float, default=RigFinetuneSettings.route_loss_weight,
                    help="stage 2: + this x the loss of answers attending to cameras other than the one named")
    ap.add_argument("--invariance-weight", type=float, default=RigFinetuneSettings.invariance_weight,
                    help="stage 2: + this x the distance of a camera question's answer rows from the starting model's "
                    "with every camera showing the named scene")
    add_drop_args(ap)
    ap.add_argument("--lr", type=float, default=RigFinetuneSettings.lr, help="stage 2's peak learning rate")
    ap.add_argument("--final-lr-ratio", type=float, default=RigFinetuneSettings.final_lr_ratio,
                    help="stage 2's cosine decays to this x --lr (1: constant after warmup)")
    ap.add_argument("--rigs-per-step", type=int, default=RigFinetuneSettings.rigs_per_step)
    ap.add_argument("--count-rigs-per-step", type=int, default=RigFinetuneSettings.count_rigs_per_step,
                    help="stage 2: + this many rigs per step asking only the all-camera count")
    ap.add_argument("--rig-kinds", nargs="+", default=list(RigFinetuneSettings.rig_kinds), choices=list(RIG_TEMPLATES),
                    help="stage 2: the rigs ask only these question kinds (default: all)")
    ap.add_argument("--response-length", type=int, help="stage 2: responses of this many tokens (default: drawn "
                    f"from {RigFinetuneSettings.response_lengths[0]}..{RigFinetuneSettings.response_lengths[1]})")
    ap.add_argument("--eot-padding", action="store_true",
                    help="pad responses with <|eot_id|> instead of <|endoftext|>, which LLaDA-V's sampler bans at masked "
                    "positions (docs/cameras.md)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="train the decoder only: the tower, projector and image_newline stay the start's")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast (at d=128 fp32 steps are faster)")
    ap.add_argument("--start", type=Path, help="the checkpoint to fine-tune (default: the embedded miniature)")
    return ap


def add_drop_args(ap: argparse.ArgumentParser) -> None:
    """Stage 2's visual-row drops: random rows (--token-drop) or the runtime's own pruning (--rule-drop)."""
    ap.add_argument("--token-drop", type=float, default=RigFinetuneSettings.token_drop,
                    help="stage 2: each length group drops a share U(0, this) of its visual rows at random after "
                    "--drop-layer decoder layers, as step-1 pruning does (0: off)")
    ap.add_argument("--drop-layer", type=int, default=RigFinetuneSettings.drop_layer)
    ap.add_argument("--rule-drop", type=float, default=RigFinetuneSettings.rule_drop,
                    help="stage 2: this share of length groups is pruned as the runtime prunes step 1 (its default rule, "
                    "the fill first) at K = --drop-layer, and runs on the kept rows from layer 0 (the later steps) "
                    "or K (0: off)")
    ap.add_argument("--rule-drop-p", type=float, nargs=2, metavar=("LO", "HI"), default=RigFinetuneSettings.rule_drop_p,
                    help="the rule drop's P, drawn uniformly from [LO, HI]")
    ap.add_argument("--rule-drop-at-k", type=float, default=RigFinetuneSettings.rule_drop_at_k,
                    help="how often a rule drop runs the kept rows from layer K (step 1) rather than from layer 0")


def settings_from(args: argparse.Namespace) -> RigFinetuneSettings:
    return RigFinetuneSettings(
        vision_steps=args.vision_steps, steps=args.steps, scenes_per_step=args.scenes_per_step,
        contrastive=args.contrastive, kind_weights=tuple(args.kind_weights),
        pad_scenes_per_step=args.pad_scenes_per_step, token_loss_weight=args.token_loss_weight,
        camera_loss_weight=args.camera_loss_weight, camera_layer=args.camera_layer, lr=args.lr,
        route_loss_weight=args.route_loss_weight, final_lr_ratio=args.final_lr_ratio, rigs_per_step=args.rigs_per_step,
        count_rigs_per_step=args.count_rigs_per_step, token_drop=args.token_drop, drop_layer=args.drop_layer,
        rule_drop=args.rule_drop, rule_drop_p=tuple(args.rule_drop_p), rule_drop_at_k=args.rule_drop_at_k,
        rig_kinds=tuple(args.rig_kinds), bf16_autocast=not args.fp32, eot_padding=args.eot_padding,
        freeze_vision=args.freeze_vision, invariance_weight=args.invariance_weight,
        response_lengths=((args.response_length,) * 2 if args.response_length
                          else RigFinetuneSettings.response_lengths))


def main(argv=None) -> int:
    from runtime.cli_args import at_boundary

    ap = build_parser()
    args = ap.parse_args(argv)

    def run():
        job = RigFinetune(settings_from(args), args.run_dir, args.start)
        job.train()
        out = job.write(args.out or args.run_dir / "checkpoint")
        print(f"wrote {out} and {args.run_dir / 'training.json'}", flush=True)

    status, _ = at_boundary(run, ap)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
