"""Several cameras per request (runtime.cameras, docs/cameras.md): LLaDA-V's several-image convention
(one padded view of 729 features + the image_newline per image, one placeholder per image), the
sequence layout with several visual segments, per-camera budgets, the runtime against the reference
generator, and the errors a deployment engineer meets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from export.build import BuildRequest, build_bundle
from export.profiles import ProfileSettings
from export.reference import generate, prompt_embeddings
from runtime.anyres import ANYRES, PAD, ImageGeometry, plan_tiles
from runtime.cameras import named_images, parse_image_args, prepare_images, request_layout
from runtime.errors import LladaVError
from runtime.merge import merge_tiles
from runtime.pipeline import Pipeline
from runtime.preprocess import ImageInput, pad_to_square
from runtime.pruning import PruneSettings, SequenceLayout, keep_visual, kept_positions
from runtime.schedule import GenerationSettings
from tests.conftest import gradient_image, road_sketch

GEN = GenerationSettings(steps=8, gen_length=8, block_length=8)
RIG = ProfileSettings(layout="single", max_text_tokens=200, opt_text_tokens=100, max_response=16, opt_response=8,
                      cameras=3)


def views(n: int) -> dict:
    """n cameras that see different things."""
    frames = [road_sketch(640, 480), gradient_image(480, 320), Image.new("RGB", (300, 500), (200, 40, 40))]
    return dict(zip(("front", "left", "right"), frames[:n]))


@pytest.fixture(scope="module")
def rig_bundle(tiny_dir, tmp_path_factory):
    return build_bundle(BuildRequest(tiny_dir, tmp_path_factory.mktemp("rig") / "b", 15, 50, "fp32", RIG),
                        log=lambda m: None).out


def test_pad_is_llava_expand2square_then_one_view():
    """A 200x100 frame: centred on a 200x200 square of the mean colour (127), 729 + 1 tokens."""
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    sq = np.asarray(pad_to_square(img, ImageGeometry()))
    assert sq.shape == (200, 200, 3)
    assert (sq[:50] == 127).all() and (sq[150:] == 127).all() and (sq[50:150] == (255, 0, 0)).all()
    layout = plan_tiles((200, 100), ImageGeometry(), PAD)
    assert layout.num_tiles == 1 and layout.num_visual_tokens == 730
    feats, newline = np.random.default_rng(0).standard_normal((1, 729, 8)), np.arange(8.0)
    merged = merge_tiles(feats, layout, newline)
    assert merged.shape == (730, 8) and np.array_equal(merged[:729], feats[0]) and np.array_equal(merged[729], newline)


def test_layout_with_several_segments():
    lay = SequenceLayout(3, 7, 2, 4, (4, 3), (2,))  # [3 | 4 | 2 | 3 | 2 | 4]
    assert lay.total == 18 and [(s.start, s.stop) for s in lay.segments()] == [(3, 7), (9, 12)]
    assert lay.visual_rows.tolist() == [3, 4, 5, 6, 9, 10, 11]
    assert lay.prompt_text_positions().tolist() == [0, 1, 2, 7, 8, 12, 13]
    # visual tokens 1, 2 (camera 0) and 5 (camera 1) dropped
    assert kept_positions(lay, np.array([0, 3, 4, 6])).tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 11, *range(12, 18)]


def test_the_prompt_names_each_camera_and_counts_placeholders(tokenizer):
    prompt = tokenizer.encode_prompt("Is there a pedestrian?", ["front", "left"])
    assert prompt.n_images == 2 and tokenizer.decode(prompt.between[0]).strip() == "left camera:"
    assert tokenizer.decode(prompt.prefix).endswith("front camera: ")
    own = tokenizer.encode_prompt("rear <image> and side <image>: any cyclist?", ["rear", "side"])
    assert tokenizer.decode(own.between[0]) == " and side " and own.n_images == 2
    with pytest.raises(LladaVError, match=r"prompt: 1 '<image>' placeholder\(s\) for 2 images \(front, left\)"):
        tokenizer.encode_prompt("front <image> only", ["front", "left"])


def test_named_images_refuse_what_is_ambiguous():
    assert named_images("a.png") == [("", "a.png")]
    assert parse_image_args(["a.png"]) == "a.png"
    assert parse_image_args(["front=a.png", "left=b=c.png"]) == [("front", "a.png"), ("left", "b=c.png")]
    with pytest.raises(LladaVError, match=r"camera name\(s\) \['front'\]: given twice"):
        named_images([("front", "a.png"), ("front", "b.png")])
    with pytest.raises(LladaVError, match="--image 'b.png': several images need a camera name each"):
        parse_image_args(["front=a.png", "b.png"])
    with pytest.raises(LladaVError, match="camera name ' ': expected a non-empty name"):
        named_images({" ": "a.png"})


def test_per_camera_budget_keeps_every_camera():
    """Camera 1's tokens all score below camera 0's: the global budget (saliency) wipes it out, the
    per-camera one keeps V_i - floor(V_i * P / 100) of each."""
    scores = np.r_[np.linspace(10, 20, 20), np.linspace(0, 1, 10)]
    never = lambda *a: pytest.fail("not read")  # noqa: E731
    glob = keep_visual(PruneSettings(p=50, rule="saliency"), (20, 10), lambda: scores, never)
    per = keep_visual(PruneSettings(p=50, rule="saliency", budget="per_camera"), (20, 10), lambda: scores, never)
    assert glob.size == per.size == 15 and (glob < 20).all()
    assert (per < 20).sum() == 10 and (per >= 20).sum() == 5 and set(per[per >= 20]) == set(range(25, 30))
    rand = keep_visual(PruneSettings(p=50, rule="random", budget="per_camera"), (20, 10), never, never)
    assert (rand < 20).sum() == 10 and (rand >= 20).sum() == 5


@pytest.mark.parametrize("geometry", [ImageGeometry(), ImageGeometry(image_size=128, patch_size=16)])
@pytest.mark.parametrize("size", [(1920, 1080), (640, 360), (360, 640), (300, 200), (331, 500), (400, 400)])
def test_pad_fill_tokens_are_the_patches_that_show_only_the_fill(geometry, size):
    """Read from the pixels the vision tower gets (a noise frame, padded and resized by the runtime): every
    patch pad_fill_tokens names holds the mean colour alone, and it misses at most one row or column of
    such patches at each padded edge (the resize's reach)."""
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image = prepare_images([("front", frame), ("left", frame)], geometry, "single")[0]
    ps, side = geometry.patch_size, geometry.side
    fill_value = (int(geometry.mean[0] * 255) / 255 - geometry.mean[0]) / geometry.std[0]
    patches = image.pixel_values[0][:, :side * ps, :side * ps].reshape(3, side, ps, side, ps)
    pure = np.isclose(patches, fill_value, atol=1e-6).all(axis=(0, 2, 4)).reshape(-1)
    named = np.zeros(side * side, bool)
    named[list(image.layout.fill)] = True
    assert pure[named].all(), "a token named fill shows some of the frame"
    w, h = size
    padded_edges = 2 * (w != h)
    assert pure.sum() - named.sum() <= padded_edges * side, (pure.sum(), named.sum())
    assert named.sum() > 0 or w == h or max(w, h) / min(w, h) < 1.2


def test_fill_goes_first_whatever_the_rule():
    """Cameras of 10 tokens, fill 0-3 (camera 0) and 10-15 (camera 1), the fill the most salient: P50
    drops exactly the fill; P70 all of it and 4 frame tokens by the rule; per camera at P25 each drops
    2 of its own fill (the rule picks which); fill "rule" ranks it like any token (the ablation)."""
    fill = [0, 1, 2, 3, 10, 11, 12, 13, 14, 15]
    scores = np.r_[np.full(4, 9.0), np.linspace(0, 1, 6), np.full(6, 8.0), np.linspace(2, 3, 4)]
    sim = np.random.default_rng(1).random((20, 20))
    asked = []

    def similarity(pivots):
        asked.append(pivots.tolist())
        return sim[pivots]

    frame = np.setdiff1d(np.arange(20), fill)
    for rule in ("saliency", "duplicate", "random"):
        keep = lambda **kw: keep_visual(PruneSettings(rule=rule, **kw), (10, 10), lambda: scores, similarity, fill)
        assert keep(p=50).tolist() == frame.tolist()
        p70 = keep(p=70)
        assert p70.size == 6 and np.isin(p70, frame).all()
        per = keep(p=25, budget="per_camera")
        assert per.size == 16 and np.isin(frame, per).all() and np.isin([0, 1, 2, 3], per).sum() == 2
    assert not set(sum(asked, [])) & set(fill), "a fill token became a pivot"
    assert keep_visual(PruneSettings(p=25, rule="saliency", budget="per_camera"), (10, 10), lambda: scores,
                       similarity, fill).tolist() == [0, 1, *range(4, 14), *range(16, 20)]  # ties: lower index
    ranked = keep_visual(PruneSettings(p=50, rule="saliency", fill="rule"), (10, 10), lambda: scores, similarity, fill)
    assert np.array_equal(ranked, keep_visual(PruneSettings(p=50, rule="saliency"), (10, 10), lambda: scores,
                                              similarity))
    assert np.isin(fill, ranked).all()


def test_the_layout_names_each_views_fill(tokenizer):
    cams = views(3)
    images = prepare_images(named_images(cams), ImageGeometry(), "single")
    lay = request_layout(tokenizer.encode_prompt("Any cyclist?", list(cams)), images, 8)
    want = [730 * i + t for i, im in enumerate(images) for t in im.layout.fill]
    assert list(lay.fill) == want and all(len(im.layout.fill) > 0 for im in images)
    assert max(images[0].layout.fill) < 729 and 729 not in images[0].layout.fill  # never the image_newline


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("p", [0, 50])
def test_runtime_matches_the_reference_with_several_cameras(rig_bundle, tiny, tokenizer, n, p):
    """Tokens and kept set of the ONNX Runtime pipeline equal the reference generator's (fp32)."""
    model, ckpt = tiny
    cams = views(n)
    prune = PruneSettings(k=15, p=p)
    with Pipeline(rig_bundle) as pipe:
        got = pipe.generate(cams, "How many vehicles in all cameras?", GEN, prune)
    images = prepare_images(named_images(cams), ckpt.config.geometry, "single")
    prompt = tokenizer.encode_prompt("How many vehicles in all cameras?", list(cams))
    want = generate(model, tokenizer.ids, prompt, images, GEN, prune)
    assert got.layout == want.layout and got.layout.sizes == (730,) * n and got.cameras == list(cams)
    assert got.answer_ids == want.answer_ids and np.array_equal(got.kept_visual, want.kept_visual)
    assert got.kept_visual.size == 730 * n - (730 * n * p) // 100
    assert len(got.layout.fill) > 0 and (p == 0 or not np.isin(got.layout.fill, got.kept_visual).any())


def test_vision_runs_once_for_all_cameras_and_matches_each_image_alone(rig_bundle, tiny, tokenizer):
    model, ckpt = tiny
    cams = views(3)
    with Pipeline(rig_bundle) as pipe:
        req = pipe.prepare(cams, "Any cyclist?", GEN, PruneSettings(k=15, p=50))
        prompt, images, lay = req.prompt, req.images, req.layout
        embeds, _ = pipe.prompt_embeddings(prompt, images)
    with torch.inference_mode():
        ref, ref_lay = prompt_embeddings(model, prompt, images, GEN.gen_length)
    assert ref_lay == lay and embeds.shape == (lay.n_prompt, ref.shape[1])
    assert np.abs(ref.numpy() - embeds).max() < 1e-4
    for i, rows in enumerate(lay.segments()):  # each segment ends with the image_newline
        assert np.allclose(embeds[rows.stop - 1], model.model.image_newline.detach().numpy(), atol=1e-6), i


def test_clear_errors_for_a_rig(rig_bundle, runtime_bundles, tmp_path):
    with Pipeline(runtime_bundles[15]) as pipe:  # built for one image
        with pytest.raises(LladaVError, match=r"images: 2 cameras \(front, left\); the bundle's vision engine takes at "
                                              r"most 1 views per request \(rebuild with --cameras 2\)"):
            pipe.generate(views(2), "Any cyclist?", GEN, PruneSettings(k=15, p=50))
    with Pipeline(rig_bundle) as pipe:
        with pytest.raises(LladaVError, match=r"camera 'left': image .*missing.png'?: no such file"):
            pipe.generate({"front": views(1)["front"], "left": tmp_path / "missing.png"}, "Any?", GEN,
                          PruneSettings(k=15, p=50))
        with pytest.raises(LladaVError, match=r"prompt: 3 '<image>' placeholder\(s\) for 2 images"):
            pipe.generate(views(2), "<image> <image> <image> what?", GEN, PruneSettings(k=15, p=50))


def test_cli_runs_a_rig_and_draws_one_panel_per_camera(rig_bundle, tmp_path, capsys):
    from runtime.__main__ import main

    paths = []
    for name, img in views(2).items():
        paths.append(f"{name}={tmp_path / f'{name}.png'}")
        img.save(tmp_path / f"{name}.png")
    out_map = tmp_path / "map.png"
    argv = ["--bundle", str(rig_bundle), "--prompt", "Any cyclist?", "--gen-length", "8", "--p", "50",
            "--budget", "per_camera", "--json", "--quiet", "--map", str(out_map)]
    assert main(argv + [a for p in paths for a in ("--image", p)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cameras"] == {"front": 730, "left": 730} and len(out["kept_visual"]) == 730
    kept = np.array(out["kept_visual"])
    assert (kept < 730).sum() == 365 and (kept >= 730).sum() == 365  # per camera: half of each
    assert Image.open(out_map).width > 2 * 512  # two panels
    assert main(argv + ["--image", paths[0], "--image", paths[0]]) == 2
    assert "camera name(s) ['front']: given twice" in capsys.readouterr().err


def test_a_rig_bundle_is_sized_and_tuned_for_its_cameras(rig_bundle):
    from runtime.bundle import read_manifest

    m = read_manifest(rig_bundle)
    axes = m.profiles["axes"]
    assert axes["tiles"] == [1, 3, 3] and axes["visual"][1:] == [3 * 730, 3 * 730]
    assert axes["full_seq"][1] == RIG.opt_text_tokens + 3 * 730 + RIG.opt_response  # tuned at the rig
    assert axes["seq"][2] == RIG.max_text_tokens + 3 * 730 + RIG.max_response
    assert m.profiles["settings"]["cameras"] == 3


def test_the_jetson_plan_and_the_orin_projection_take_a_rig(rig_bundle, capsys):
    from bench.orin_fit import main as orin_fit
    from jetson import latency

    assert latency.main(["--bundle", str(rig_bundle), "--backend", "onnxruntime", "--dry-run", "--cameras", "2",
                         "--p", "0,50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 cameras of" in lines[0] and "(2 tiles, 1460 visual)" in lines[0]
    assert "# onnxruntime vision tiles=2" in lines
    runs = [line for line in lines if line.startswith("python -m runtime")]
    assert len(runs) == 2 and all("--image front=front.png --image left=left.png" in r for r in runs)
    assert latency.main(["--bundle", str(rig_bundle), "--backend", "onnxruntime", "--dry-run", "--cameras", "4"]) == 2
    assert "--cameras: got 4; expected 1..3" in capsys.readouterr().err
    assert orin_fit(["--cameras", "4"]) == 0
    out = capsys.readouterr().out
    assert "vision at 4 tiles" in out and "2920 visual + 50 text + 64 response tokens" in out


# ---------------------------------------------------------------- the miniature's camera rigs


def test_rigs_ask_about_a_named_camera_or_all_of_them():
    from miniature.scenes import (RIG_NUMBERS, RIG_SCENE_BASE, RIG_TEST_SEEDS, TEST_SEEDS, TRAIN_SEEDS, rig,
                                  rig_questions)

    assert RIG_SCENE_BASE > max(TEST_SEEDS) > max(TRAIN_SEEDS)  # a rig's scenes are none of the single-image ones
    sizes = set()
    for seed in RIG_TEST_SEEDS[:12]:
        r = rig(seed)
        sizes.add(len(r.cameras))
        qs = rig_questions(r)
        assert len(qs) == len(r.cameras) + 1 and [q.camera for q in qs[:-1]] == list(r.cameras)
        for q in qs[:-1]:
            s = r.cameras[q.camera]
            assert q.camera in q.text
            if q.kind == "cam_pedestrian":
                assert q.answer == (f"yes, on the {s.of('pedestrian')[0].side}" if s.of("pedestrian") else "no")
            else:
                assert q.answer == s.of("light")[0].color
        total = sum(len(s.of("vehicle")) for s in r.cameras.values())
        assert qs[-1].answer == RIG_NUMBERS[total] and len(qs[-1].about) == total
    assert sizes == {2, 3}


def test_a_rig_example_holds_each_camera_s_view_in_prompt_order():
    from miniature.data import Encoder
    from miniature.scenes import rig
    from miniature.train import batch_sequences, scene_visuals
    from export.checkpoint import load_model
    from miniature import embedded_checkpoint
    from runtime.tokens import TextTokenizer

    model, ckpt = load_model(embedded_checkpoint())
    tok = TextTokenizer(embedded_checkpoint())
    ex = Encoder(tok, ckpt.config.geometry, 32).rig_example(rig(3))  # three cameras
    per_view = ckpt.config.geometry.tokens_per_tile + 1
    assert ex.cameras == ("front", "left", "right") and ex.pixels.shape[0] == 3
    assert [la.mode for la in ex.layouts] == [PAD] * 3 and ex.labels.shape[0] == 3 * per_view
    with torch.no_grad():
        visuals = scene_visuals(model, [ex])
        responses = torch.tensor([r[:8] for r in ex.responses])
        groups = batch_sequences(model, [ex], visuals, responses)
    prompt = ex.prompts[0]
    lay = request_layout(prompt, [ImageInput(np.empty(0), la) for la in ex.layouts], 8)
    h = dict((i, x) for idx, hs in groups for i, x in zip(idx, hs))[0]
    assert h.shape[0] == lay.total
    for rows, visual in zip(lay.segments(), visuals[0]):
        assert torch.equal(h[rows], visual)


def test_object_cells_follow_the_image_onto_its_padded_square():
    from runtime.pruning_map import tokens_covering

    g = ImageGeometry(image_size=128, patch_size=16)  # 8 x 8 tokens
    layout = plan_tiles((640, 360), g, PAD)  # the frame sits in rows 140..499 of a 640 x 640 square
    whole = tokens_covering(layout, 8, (0, 0, 640, 360))
    assert whole.tolist() == list(range(8, 56))  # token rows 1..6 of 8: the padding's rows hold nothing
    assert tokens_covering(layout, 8, (0, 0, 80, 20)).tolist() == [8]  # top-left corner: square rows 140..159


def test_the_rig_fine_tune_checkpoints_and_resumes(tmp_path):
    """Stage 1 moves the vision side only (token labels); stage 2 the decoder too; a re-run resumes."""
    from miniature.rig_finetune import RigFinetune, RigFinetuneSettings

    settings = RigFinetuneSettings(vision_steps=1, vision_rigs_per_step=1, vision_scenes_per_step=1, steps=1,
                                   rigs_per_step=1, scenes_per_step=1, validation_rigs=2, validation_scenes=2,
                                   checkpoint_seconds=1e9)
    job = RigFinetune(settings, tmp_path / "run")
    start = {k: v.clone() for k, v in job.model.state_dict().items()}
    job.train_step()
    job.step += 1
    moved = {k for k, v in job.model.state_dict().items() if not torch.equal(start[k], v)}
    assert moved and all(".vision_tower." in k or "mm_projector" in k or "image_newline" in k for k in moved), moved
    job.train()
    assert job.step == 2 and job.log[-1]["step"] == 2 and "val_rigs" in job.log[-1]
    assert any(".layers." in k and not torch.equal(start[k], v) for k, v in job.model.state_dict().items())
    again = RigFinetune(settings, tmp_path / "run")
    assert again.step == 2 and all(torch.equal(v, job.model.state_dict()[k]) for k, v in again.model.state_dict().items())
    assert all(torch.equal(v, job.heads.state_dict()[k]) for k, v in again.heads.state_dict().items())
    with pytest.raises(LladaVError, match="holds a fine-tune with settings"):
        RigFinetune(RigFinetuneSettings(steps=2), tmp_path / "run")
    out = job.write(tmp_path / "ckpt")
    assert (out / "config.json").is_file() and (tmp_path / "run" / "training.json").is_file()


def test_a_decoder_only_focus_keeps_the_vision_side_and_asks_only_the_kinds_named(tmp_path):
    """freeze_vision: a stage-2 step moves decoder weights and nothing of the tower, projector or
    newline; rig_kinds: the rigs ask only those kinds; a vision stage with a frozen tower is refused."""
    from miniature.rig_finetune import RigFinetune, RigFinetuneSettings

    settings = RigFinetuneSettings(vision_steps=0, steps=1, rigs_per_step=2, scenes_per_step=0, freeze_vision=True,
                                   rig_kinds=("cam_light", "cam_count"), response_lengths=(8, 8),
                                   bf16_autocast=False, validation_rigs=2, validation_scenes=2)
    job = RigFinetune(settings, tmp_path / "run")
    assert {q.kind for ex in job.batch(0) for q in ex.questions} <= {"cam_light", "cam_count"}
    start = {k: v.clone() for k, v in job.model.state_dict().items()}
    job.train_step()
    moved = {k for k, v in job.model.state_dict().items() if not torch.equal(start[k], v)}
    assert any(".layers." in k for k in moved), moved
    assert not any(".vision_tower." in k or "mm_projector" in k or "image_newline" in k for k in moved), moved
    with pytest.raises(LladaVError, match="vision_steps=1"):
        RigFinetune(RigFinetuneSettings(vision_steps=1, freeze_vision=True), tmp_path / "other")


def test_the_invariance_loss_is_zero_where_the_other_cameras_show_the_named_scene(tmp_path):
    """counterparts: each camera question asked with every camera showing the scene it names (same
    prompt ids, same answer, every view the named camera's pixels). The invariance loss of the
    starting model against itself is zero on those counterparts and positive on the real rigs, where
    the other cameras show other scenes."""
    from miniature.rig_finetune import RigFinetune, RigFinetuneSettings, counterparts
    from miniature.scenes import rig
    from miniature.train import probed_sft_loss, scene_visuals

    settings = RigFinetuneSettings(vision_steps=0, steps=1, rigs_per_step=2, scenes_per_step=1, freeze_vision=True,
                                   invariance_weight=1.0, invariance_layers=(4, 32), response_lengths=(8, 8),
                                   bf16_autocast=False)
    job = RigFinetune(settings, tmp_path / "run")
    batch = job.batch(0)
    idx, twins = counterparts(batch)
    asked = [(ex, q) for ex in batch for q in ex.questions]
    assert idx == [i for i, (_, q) in enumerate(asked) if getattr(q, "camera", None)] and len(idx) == 5
    for i, twin in zip(idx, twins):
        ex, q = asked[i]
        c = list(rig(ex.seed).cameras).index(q.camera)
        assert twin.prompts == (ex.prompts[ex.questions.index(q)],) and twin.questions[0].answer == q.answer
        assert all(np.array_equal(view, ex.pixels[c]) for view in twin.pixels), (ex.seed, q.camera)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, tapped, _, responses = probed_sft_loss(job.anchor, twins, scene_visuals(job.anchor, twins), 8,
                                                  job.tok.ids.mask, gen, (4, 32))
        itself = job.invariance(twins, tapped, responses)
        _, tapped, _, responses = probed_sft_loss(job.anchor, batch, scene_visuals(job.anchor, batch), 8,
                                                  job.tok.ids.mask, gen, (4, 32))
        real = job.invariance(batch, tapped, responses)
    assert float(itself) < 1e-10 < 1e-4 < float(real), (float(itself), float(real))


def test_the_camera_loss_labels_each_rigs_visual_rows_with_its_camera():
    """camera_rows marks exactly the rows where batch_sequences put each camera's tokens (found here by
    planting a distinct value per camera), with that camera's index; the loss is small for a head that
    reads the planted value and large for one that reads it wrong."""
    from miniature.data import IGNORE, Encoder
    from miniature.rig_finetune import camera_loss, camera_rows
    from miniature.scenes import RIG_CAMERAS
    from miniature.train import batch_sequences
    from export.checkpoint import load_model
    from miniature import embedded_checkpoint
    from runtime.tokens import TextTokenizer

    model, ckpt = load_model(embedded_checkpoint(), torch.float32)
    enc = Encoder(TextTokenizer(embedded_checkpoint()), ckpt.config.geometry, 32)
    batch = enc.rig_examples([0, 1]) + enc.examples([3])  # two and three cameras, then one single scene
    d = ckpt.config.decoder.d_model
    planted = [[torch.zeros(1, d).index_fill_(1, torch.tensor([j]), 100.0).expand(n, d) for j, n in
                enumerate(im.num_visual_tokens for im in ex.layouts)] for ex in batch]
    responses = torch.zeros(sum(len(ex.prompts) for ex in batch), 4, dtype=torch.long)
    rows = camera_rows(batch, planted)
    flat = [(ex, p) for ex in batch for p in ex.prompts]
    taps = []
    with torch.no_grad():
        for idx, h in batch_sequences(model, batch, planted, responses):
            for i, seq in zip(idx, h):
                ex, hit = flat[i][0], (seq[:, :3] == 100.0)
                want = torch.where(hit.any(1), hit.float().argmax(1), IGNORE)
                if ex.cameras:
                    want = torch.where(want >= 0, torch.tensor([RIG_CAMERAS.index(c) for c in ex.cameras])[want.clamp(0)], want)
                else:
                    want = torch.full_like(want, IGNORE)
                assert torch.equal(rows[i], want[: rows[i].shape[0]]), i
            taps.append((idx, h))
    assert {int(x) for r in rows for x in r.unique()} == {IGNORE, 0, 1, 2}
    reads = torch.nn.Linear(d, len(RIG_CAMERAS), bias=False)
    with torch.no_grad():
        reads.weight.copy_(torch.eye(len(RIG_CAMERAS), d) * 50.0)
        right = camera_loss(reads, taps, rows)
        reads.weight.copy_(torch.eye(len(RIG_CAMERAS), d).roll(1, 0) * 50.0)
        wrong = camera_loss(reads, taps, rows)
    assert right < 0.01 < 10 < wrong, (right, wrong)


def test_the_readout_diagnostics_show_every_camera_the_named_scene_and_a_frame_as_one_padded_view():
    """val_same's rigs: one question each, every camera's view the named camera's pixels, the named
    camera's answer; val_pad's scenes: one padded view of 8 x 8 tokens + newline, the six questions."""
    from export.model import PRESETS
    from miniature import embedded_checkpoint
    from miniature.data import Encoder
    from miniature.rig_finetune import same_scene_examples
    from miniature.scenes import rig, rig_questions
    from runtime.anyres import PAD
    from runtime.tokens import TextTokenizer

    enc = Encoder(TextTokenizer(embedded_checkpoint()), PRESETS["miniature"].geometry, 32)
    same = same_scene_examples(enc, [0, 1])
    asked = [(r, q) for r in (rig(0), rig(1)) for q in rig_questions(r)[:-1]]
    assert len(same) == len(asked) == 5
    for ex, (r, q) in zip(same, asked):
        assert [x.text for x in ex.questions] == [q.text] and ex.questions[0].answer == q.answer
        own = enc.rig_example(r).pixels[list(r.cameras).index(q.camera)]
        assert ex.cameras == tuple(r.cameras) and all(np.array_equal(view, own) for view in ex.pixels)
    pad = enc.examples([3], layout=PAD)[0]
    assert pad.layouts[0].mode == PAD and pad.layouts[0].num_visual_tokens == 65 and len(pad.questions) == 6
    assert enc.examples([3])[0].layouts[0].num_visual_tokens > 65


def test_the_route_loss_is_small_when_answers_attend_to_the_camera_named_and_large_otherwise():
    from miniature.data import IGNORE
    from miniature.rig_finetune import named_cameras, route_loss
    from miniature.scenes import rig, rig_questions

    r = rig(1)  # three cameras: front, left, right; then the question over all of them
    ex = type("Ex", (), {"questions": rig_questions(r)})()
    named = named_cameras([ex])
    assert named == [0, 1, 2, None]
    rows = torch.tensor([IGNORE] * 3 + [0] * 4 + [IGNORE] + [1] * 4 + [2] * 4 + [IGNORE] * 2)
    sal = torch.full((4, rows.shape[0]), 0.001)
    for j in range(3):  # question j's response rows look at camera j
        sal[j, rows == j] = 1.0
    right = route_loss([[([0, 1, 2, 3], sal)]], [rows] * 4, named)
    wrong = route_loss([[([0, 1, 2, 3], sal.roll(1, 0))]], [rows] * 4, named)
    assert right < 0.05 < 3.0 < wrong, (right, wrong)
    assert route_loss([[([3], sal[3:])]], [rows] * 4, named) == 0  # the question over every camera names none


def test_training_rigs_draw_their_camera_questions_and_the_held_out_rule_stays():
    from miniature.rig_finetune import draw_camera_kinds
    from miniature.scenes import NUMBERS, RIG_CAMERA_KINDS, RIG_NUMBERS, held_out_rigs, rig, rig_questions

    assert {q.kind for _, q in held_out_rigs()} == {"cam_pedestrian", "cam_light", "all_count"}
    drawn = [draw_camera_kinds(0, rig(s)) for s in range(40)]
    assert {k for kinds in drawn for k in kinds} == set(RIG_CAMERA_KINDS)
    told_apart = 0
    for s in range(40):  # contrastive: a camera's answer is no other camera's answer to the same question,
        r, n = rig(s), len(rig(s).cameras)  # wherever some question tells that camera apart
        answers = {k: [q.answer for q in rig_questions(r, (k,) * n)[:n]] for k in RIG_CAMERA_KINDS}
        for i, kind in enumerate(draw_camera_kinds(0, r, contrastive=True)):
            if any(a.count(a[i]) == 1 for a in answers.values()):
                assert answers[kind].count(answers[kind][i]) == 1, (s, i, kind)
                told_apart += 1
    assert told_apart > 60
    r = rig(5)
    counted = rig_questions(r, ("cam_count",) * len(r.cameras))
    per_camera = [len(s.of("vehicle")) for s in r.cameras.values()]
    assert [q.answer for q in counted] == [NUMBERS[n] for n in per_camera] + [RIG_NUMBERS[sum(per_camera)]]
    assert counted[1].text == "In the left camera, how many vehicles?"


def test_the_fine_tune_s_sampled_answers_are_the_reference_generator_s():
    """miniature.train.sampled_answers (the training's sampler on the Encoder's sequences) answers as
    export.reference.generate does on the request the runtime would build (prompt ids and views of
    its own), for a rig's questions and a single scene's."""
    from export.checkpoint import load_model
    from miniature import embedded_checkpoint
    from miniature.data import Encoder
    from miniature.scenes import rig, scene
    from miniature.train import sampled_answers
    from runtime.tokens import TextTokenizer

    model, ckpt = load_model(embedded_checkpoint())
    tokenizer = TextTokenizer(embedded_checkpoint())
    enc = Encoder(tokenizer, ckpt.config.geometry, 32)
    r, s = rig(4), scene(7)
    examples = [enc.rig_example(r), enc.example(s)]
    got = sampled_answers(model, examples, tokenizer, 8)
    gen = GenerationSettings(steps=8, gen_length=8, block_length=8)
    rig_images = prepare_images([(n, v.image) for n, v in r.cameras.items()], ckpt.config.geometry, ANYRES)
    want = [generate(model, tokenizer.ids, tokenizer.encode_prompt(q.text, list(r.cameras)), rig_images, gen,
                     None).answer_ids for q in examples[0].questions]
    scene_images = prepare_images([("image", s.image)], ckpt.config.geometry, ANYRES)
    want += [generate(model, tokenizer.ids, tokenizer.encode_prompt(q.text), scene_images, gen, None).answer_ids
             for q in examples[1].questions]
    assert len(got) == len(want) == len(examples[0].questions) + 6 and all(got)
    assert got == want


def test_a_token_drop_removes_visual_rows_only_after_its_layer_and_keeps_positions():
    """miniature.train.run_dropping on a stand-in decoder that records what each layer range saw:
    layers [0, K) see every row; layers [K, L) see every text and response row, and each sequence
    the same number fewer visual rows, at their original positions; max share 0 drops nothing."""
    from types import SimpleNamespace

    from miniature.train import TokenDrop, run_dropping

    seen = []

    def run_layers(h, pos, lo, hi):
        seen.append((lo, hi, pos.clone()))
        return h + 1, None

    model = SimpleNamespace(run_layers=run_layers, cfg=SimpleNamespace(n_layers=32))
    visual = [torch.tensor([False] * 3 + [True] * 20 + [False] * 5), torch.tensor([False] * 8 + [True] * 20)]
    pos = torch.arange(28)[None].expand(2, -1)
    for share, gen_seed in ((0.9, 0), (0.9, 1), (0.0, 0)):
        seen.clear()
        drop = TokenDrop(15, share, torch.Generator().manual_seed(gen_seed))
        out = run_dropping(model, torch.zeros(2, 28, 4), pos, visual, drop)
        (lo0, hi0, p0), (lo1, hi1, p1) = seen
        assert (lo0, hi0, lo1, hi1) == (0, 15, 15, 32) and torch.equal(p0, pos)
        assert out.shape == (2, p1.shape[1], 4) and torch.all(out == 2)
        for b in range(2):
            kept = set(p1[b].tolist())
            assert p1[b].tolist() == sorted(kept)  # original positions, in order: the response rows stay last
            assert {i for i in range(28) if not visual[b][i]} <= kept
        dropped = 28 - p1.shape[1]
        assert (dropped == 0) if share == 0 else (0 <= dropped <= 18)
    drops = set()
    for seed in range(8):  # the share is drawn per group
        seen.clear()
        run_dropping(model, torch.zeros(2, 28, 4), pos, visual, TokenDrop(15, 0.9, torch.Generator().manual_seed(seed)))
        drops.add(28 - seen[1][2].shape[1])
    assert len(drops) > 2


def test_the_rig_fine_tune_trains_through_a_token_drop_and_refuses_losses_that_read_dropped_rows(tmp_path):
    from miniature.rig_finetune import RigFinetune, RigFinetuneSettings

    settings = RigFinetuneSettings(vision_steps=0, steps=1, rigs_per_step=2, scenes_per_step=1, freeze_vision=True,
                                   token_drop=0.7, response_lengths=(8, 8), bf16_autocast=False,
                                   validation_rigs=2, validation_scenes=2)
    job = RigFinetune(settings, tmp_path / "run")
    start = {k: v.clone() for k, v in job.model.state_dict().items()}
    assert np.isfinite(job.train_step())
    assert any(".layers." in k and not torch.equal(start[k], v) for k, v in job.model.state_dict().items())
    with pytest.raises(LladaVError, match="token_drop=0.7"):
        RigFinetune(RigFinetuneSettings(vision_steps=0, token_drop=0.7, invariance_weight=1.0), tmp_path / "other")


def test_kind_weights_set_how_often_each_camera_question_is_drawn():
    from miniature.rig_finetune import draw_camera_kinds
    from miniature.scenes import RIG_CAMERA_KINDS, rig

    rigs = [rig(s) for s in range(60)]
    only = {k for r in rigs for k in draw_camera_kinds(0, r, weights=(1.0, 0.0, 0.0))}
    assert only == {RIG_CAMERA_KINDS[0]}
    drawn = [k for r in rigs for k in draw_camera_kinds(0, r, weights=(1.0, 0.0, 4.0))]
    assert set(drawn) == {RIG_CAMERA_KINDS[0], RIG_CAMERA_KINDS[2]}
    assert drawn.count(RIG_CAMERA_KINDS[2]) > 2 * drawn.count(RIG_CAMERA_KINDS[0])
    assert [draw_camera_kinds(0, r, weights=(2.0, 2.0, 2.0)) for r in rigs] == [draw_camera_kinds(0, r) for r in rigs]


def test_eot_padding_pads_responses_with_the_stop_token_the_sampler_may_write(tmp_path):
    """LLaDA-V's sampler bans <|endoftext|> at masked positions; with eot_padding the rig fine-tune's
    responses (rigs and rehearsed scenes) hold none of it, and a run saved before a setting existed
    resumes with that setting's default."""
    from dataclasses import replace

    from export.model import PRESETS
    from miniature import embedded_checkpoint
    from miniature.data import Encoder
    from miniature.rig_finetune import FIRST_COUNT_RIG, STATE, RigFinetune, RigFinetuneSettings
    from runtime.tokens import TextTokenizer

    tok = TextTokenizer(embedded_checkpoint())
    geometry = PRESETS["miniature"].geometry
    ids = tok.encode("no")
    assert Encoder(tok, geometry, 8).response("no") == tuple(ids + [tok.ids.eot] + [tok.ids.eos] * (7 - len(ids)))
    assert Encoder(tok, geometry, 8, eot_padding=True).response("no") == tuple(ids + [tok.ids.eot] * (8 - len(ids)))
    settings = RigFinetuneSettings(vision_steps=0, steps=1, rigs_per_step=2, scenes_per_step=1, freeze_vision=True,
                                   eot_padding=True, count_rigs_per_step=2, response_lengths=(8, 8),
                                   bf16_autocast=False, validation_rigs=2, validation_scenes=2, checkpoint_seconds=1e9)
    job = RigFinetune(settings, tmp_path / "run")
    batch = job.batch(0)
    responses = [r for ex in batch for r in ex.responses]
    assert len(responses) > 4 and all(tok.ids.eos not in r and r[-1] == tok.ids.eot for r in responses)
    counted = [ex for ex in batch if ex.cameras and ex.seed >= FIRST_COUNT_RIG]  # rigs asking only the count
    assert len(counted) == 2 and all([q.kind for q in ex.questions] == ["all_count"] for ex in counted)
    assert batch.index(counted[0]) == 2 and [q.kind for q in batch[0].questions][-1] == "all_count"
    job.save()
    state = torch.load(tmp_path / "run" / STATE, weights_only=False)
    del state["settings"]["kind_weights"]  # as saved before kind weights existed
    torch.save(state, tmp_path / "run" / STATE)
    assert RigFinetune(settings, tmp_path / "run").step == 0
    with pytest.raises(LladaVError, match="holds a fine-tune with settings"):
        RigFinetune(replace(settings, kind_weights=(2.0, 1.0, 1.0)), tmp_path / "run")


def test_a_wrong_answer_about_one_camera_is_told_apart_when_it_is_another_camera_s():
    from miniature.eval import other_camera_answer
    from miniature.scenes import LIGHTS, rig, rig_questions

    r = next(r for r in map(rig, range(100)) if len({s.of("light")[0].color for s in r.cameras.values()}) > 1)
    lights = [s.of("light")[0].color for s in r.cameras.values()]
    q = rig_questions(r, ("cam_light",) * len(lights))[0]  # about the front camera
    other = next(c for c in lights if c != lights[0])
    nobody = next(c for c in LIGHTS if c not in lights) if len(set(lights)) < 3 else None
    assert other_camera_answer(r, q, lights[0]) is None  # right
    assert other_camera_answer(r, q, other) is True
    if nobody:
        assert other_camera_answer(r, q, nobody) is False
    assert other_camera_answer(r, rig_questions(r)[-1], "zero") is None  # spans every camera


def test_the_harness_runs_the_camera_rows(tmp_path_factory):
    """--cameras: the held-out rigs under unpruned and the rules at P50/P70 with a global and a per-camera
    budget; each budget keeps its own count (per camera: V_i - floor(V_i * P / 100) of each camera)."""
    from export.profiles import ProfileSettings
    from miniature import embedded_checkpoint
    from miniature.eval import RIG_KINDS, main, rig_strategies
    from runtime.pruning import pruned_count

    root = tmp_path_factory.mktemp("minirig")
    profile = ProfileSettings(layout="single", max_text_tokens=128, opt_text_tokens=64, max_response=32, opt_response=8,
                              cameras=3)
    bundle = build_bundle(BuildRequest(embedded_checkpoint(), root / "k15", 15, 50, "fp32", profile),
                          log=lambda m: None).out
    out = root / "eval"
    assert main(["--bundle", str(bundle), "--cameras", "--limit", "7", "--out", str(out)]) == 0
    data = json.loads((out / "table.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == [s.name for s in rig_strategies()] and len(rows) == 11
    assert all(rows[n]["fill_kept"] == 0 for n in rows if " P" in n and "fill ranked" not in n)  # the fill goes first
    assert rows["K15 P50 duplicate global fill ranked"]["fill_kept"] > 0 and rows["unpruned"]["fill_kept"] == 1
    assert "| K15 P70 saliency per_camera |" in (out / "table.md").read_text()
    for name, recs in data["records"].items():
        assert {r["kind"] for r in recs} == set(RIG_KINDS), name
        row = rows[name]
        for r in recs:
            n = r["visual"] // 65  # the miniature's views: 8 x 8 tokens + the image_newline
            assert r["visual"] == 65 * n and n in (2, 3)
            dropped = n * pruned_count(65, row["p"]) if row["budget"] == "per_camera" else pruned_count(r["visual"], row["p"])
            assert r["kept"] == r["visual"] - dropped, name
            assert (r["other_camera"] is None) == (r["correct"] or r["kind"] == "all_count")
        wrong = [r["other_camera"] for r in recs if r["other_camera"] is not None]
        assert row["wrong_were_other_camera"] == (np.mean(wrong) if wrong else None)
    assert rows["unpruned"]["object_recall"] == 1.0 and rows["unpruned"]["flops_remaining"] == 1.0


@pytest.mark.parametrize("budget", ["global", "per_camera"])
def test_a_rule_drop_keeps_what_the_reference_generator_keeps_at_step_1(budget):
    """miniature.train.rule_kept_rows (the fine-tune's copy of step-1 pruning on the Encoder's sequences,
    the response masks whatever the training drew) keeps the visual tokens export.reference.generate
    keeps on the request the runtime would build: a rig's questions (padded views, the fill first) and
    a single scene's (AnyRes)."""
    from export.checkpoint import load_model
    from miniature import embedded_checkpoint
    from miniature.data import Encoder
    from miniature.scenes import rig, scene
    from miniature.train import batch_sequences, rule_kept_rows, scene_visuals, visual_rows
    from runtime.tokens import TextTokenizer

    model, ckpt = load_model(embedded_checkpoint())
    tokenizer = TextTokenizer(embedded_checkpoint())
    r, s = rig(4), scene(7)
    examples = [Encoder(tokenizer, ckpt.config.geometry, 32).rig_example(r).alone(0),
                Encoder(tokenizer, ckpt.config.geometry, 32).example(s).alone(2)]
    prune = PruneSettings(k=15, p=50, budget=budget)
    gen = GenerationSettings(steps=8, gen_length=8, block_length=8)
    views = [[(n, v.image) for n, v in r.cameras.items()], [("image", s.image)]]
    with torch.inference_mode():
        visuals = scene_visuals(model, examples)
        drawn = torch.tensor([[5, 9, 9, 9, 9, 9, 9, 9]] * 2)  # the responses as a training step might mask them
        rows_of = visual_rows(examples, visuals)
        for (idx, h), ex, cams in zip(batch_sequences(model, examples, visuals, drawn), examples, views):
            (j,) = idx
            pos = torch.arange(h.shape[1])[None]
            rows = rule_kept_rows(model, h, pos, [rows_of[j]], prune, tokenizer.ids.mask, 8)[0]
            vis = torch.nonzero(rows_of[j].mask).flatten()
            got = np.flatnonzero(np.isin(vis.numpy(), rows.numpy()))
            images = prepare_images(cams, ckpt.config.geometry, ANYRES)
            want = generate(model, tokenizer.ids, tokenizer.encode_prompt(ex.questions[0].text, list(r.cameras)
                                                                          if len(cams) > 1 else None),
                            images, gen, prune).kept_visual
            assert np.array_equal(got, want), (j, np.setdiff1d(got, want), np.setdiff1d(want, got))
            assert rows.numel() == h.shape[1] - (vis.numel() - want.size)  # text and response rows all kept
    assert len(rows_of[0].fill) > 0 and rows_of[1].fill == ()  # the rig's views have fill, the AnyRes scene none
    assert rows_of[0].sizes == (65, 65) and rows_of[0].mask.sum() == 130


def test_a_rule_drop_runs_the_kept_rows_from_layer_0_or_from_k(tmp_path):
    """run_rule_dropping: pruned groups run the kept rows (their original positions) through every layer
    (a later step) or, from layer K on, after layers [0, K) over every row (step 1); an unpruned draw
    runs every row; the fine-tune trains through it and refuses what cannot go with it."""
    from miniature.rig_finetune import RigFinetune, RigFinetuneSettings
    from miniature.train import (RuleDrop, batch_sequences, rule_kept_rows, run_rule_dropping, scene_visuals,
                                 visual_rows)

    job = RigFinetune(RigFinetuneSettings(vision_steps=0, steps=1, rigs_per_step=2, scenes_per_step=1,
                                          freeze_vision=True, rule_drop=1.0, response_lengths=(8, 8),
                                          bf16_autocast=False, validation_rigs=2, validation_scenes=2), tmp_path / "run")
    model, batch, mask = job.model.eval(), job.batch(0)[:1], job.tok.ids.mask
    with torch.inference_mode():
        visuals = scene_visuals(model, batch)
        responses = torch.full((len(batch[0].questions), 8), mask)
        (idx, h), = batch_sequences(model, batch, visuals, responses)[:1]
        pos = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
        vis = [visual_rows(batch, visuals)[i] for i in idx]
        for at_k, share in ((0.0, 1.0), (1.0, 1.0), (0.0, 0.0)):
            drop = RuleDrop(15, share, (50.0, 50.0), at_k, mask, torch.Generator().manual_seed(3))
            got = run_rule_dropping(model, h, pos, vis, drop, 8)
            prune, start = RuleDrop(15, share, (50.0, 50.0), at_k, mask, torch.Generator().manual_seed(3)).draw()
            if prune is None:
                want = model.run_layers(h, pos, 0, 32)[0][:, -8:]
            else:
                kept = rule_kept_rows(model, h, pos, vis, prune, mask, 8)
                full = model.run_layers(h, pos, 0, start)[0] if start else h
                want = torch.stack([model.run_layers(full[j:j + 1, rows], rows[None], start, 32)[0][0, -8:]
                                    for j, rows in enumerate(kept)])
                assert start == (15 if at_k else 0) and all(rows.numel() < h.shape[1] for rows in kept)
            assert torch.allclose(got, want, atol=1e-5), (at_k, share, (got - want).abs().max())
    job.model.train()
    start_state = {k: v.clone() for k, v in job.model.state_dict().items()}
    assert np.isfinite(job.train_step())
    assert any(".layers." in k and not torch.equal(start_state[k], v) for k, v in job.model.state_dict().items())
    with pytest.raises(LladaVError, match="rule_drop=0.5: the camera, route and invariance losses"):
        RigFinetune(RigFinetuneSettings(vision_steps=0, rule_drop=0.5, route_loss_weight=1.0), tmp_path / "a")
    with pytest.raises(LladaVError, match="expected one drop"):
        RigFinetune(RigFinetuneSettings(vision_steps=0, rule_drop=0.5, token_drop=0.5), tmp_path / "b")
