"""The miniature's task: scenes with known answers (miniature/scenes.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from miniature.scenes import LIGHTS, SIZE, TEST_SEEDS, TRAIN_SEEDS, held_out_set, questions, scene

GRAY_LAMP = np.array([70, 70, 70])


def test_scenes_are_deterministic_in_the_seed():
    a, b, c = scene(3), scene(3), scene(4)
    assert a.image.tobytes() == b.image.tobytes() and questions(a) == questions(b)
    assert a.image.tobytes() != c.image.tobytes() and a.image.size == SIZE


def test_answers_agree_with_the_pixels_and_the_layout():
    for seed in range(150):
        s = scene(seed)
        px = np.asarray(s.image).astype(int)
        qa = {q.kind: q for q in questions(s)}
        light = s.of("light")[0].box  # the lit lamp, read from the image: the one lamp that is not gray
        lamp, cx = light.size[0] // 2, (light.x0 + light.x1) // 2  # lamps of this diameter, stacked
        centres = [light.y0 + 4 + lamp // 2 + lamp * i for i in range(3)]
        lamps = [px[cy - 2: cy + 3, cx - 3: cx + 4].reshape(-1, 3).mean(0) for cy in centres]
        lit = [LIGHTS[i] for i, c in enumerate(lamps) if np.abs(c - GRAY_LAMP).max() > 60]
        assert lit == [qa["light"].answer], (seed, lamps)
        vehicles = s.of("vehicle")
        assert qa["count"].answer == ("zero", "one", "two", "three", "four")[len(vehicles)]
        for o in s.objects:  # inside the image, and large enough to cover several patches
            assert 0 <= o.box.x0 < o.box.x1 <= SIZE[0] and 0 <= o.box.y0 < o.box.y1 <= SIZE[1]
            assert min(o.box.size) >= 25, (seed, o)
        movers = [o for o in s.objects if o.kind in ("vehicle", "pedestrian")]
        for i, a in enumerate(movers):  # nothing hides anything the questions ask about
            for b in movers[i + 1:]:
                assert not (a.box.x0 < b.box.x1 and b.box.x0 < a.box.x1 and a.box.y0 < b.box.y1 and b.box.y0 < a.box.y1)
        peds = s.of("pedestrian")
        if peds:
            side = "left" if peds[0].box.center[0] < SIZE[0] / 2 else "right"
            assert qa["pedestrian"].answer == f"yes, on the {side}"
        else:
            assert qa["pedestrian"].answer == "no"
        ego = [v for v in vehicles if v.lane == "ego"]
        assert qa["ahead"].answer == (max(ego, key=lambda v: v.box.y1).color if ego else "none")
        for q in qa.values():
            assert all(0 <= i < len(s.objects) for i in q.about)


def test_held_out_set_is_disjoint_fixed_and_covers_every_answer():
    assert set(TEST_SEEDS).isdisjoint(TRAIN_SEEDS) and max(TRAIN_SEEDS) < min(TEST_SEEDS)
    held_out = held_out_set()
    assert len(held_out) >= 600
    kinds = Counter(q.kind for _, q in held_out)
    assert kinds["light"] == kinds["count"] == kinds["limit"] == len(TEST_SEEDS)
    answers = {k: Counter(q.answer for _, q in held_out if q.kind == k) for k in kinds}
    assert set(answers["light"]) == set(LIGHTS) and set(answers["limit"]) == {"30", "50", "70", "90", "110"}
    assert {"no", "yes, on the left", "yes, on the right"} == set(answers["pedestrian"])
    assert {"zero", "one", "two", "three"} <= set(answers["count"]) and "none" in answers["ahead"]
    assert set(answers["left_free"]) == set(answers["right_free"]) == {"yes", "no"}


def test_tokens_covering_an_object_match_an_independent_mask():
    """The harness's object recall: which visual tokens cover a box, against a pixel mask pooled onto
    each panel's token grid (numpy, independent of runtime.pruning_map's loop)."""
    from runtime.anyres import ImageGeometry, plan_tiles
    from runtime.pruning_map import object_recall, tokens_covering

    geometry = ImageGeometry()
    layout = plan_tiles(SIZE, geometry, "anyres")
    side = geometry.image_size // geometry.patch_size
    w, h = SIZE
    rows, cols = layout.merged
    for seed in (0, 1):
        for obj in scene(seed).objects:
            b = obj.box
            mask = np.zeros((h, w), bool)
            mask[b.y0:b.y1, b.x0:b.x1] = True
            want = []
            for n_rows, n_cols, offset, stride in ((side, side, 0, side), (rows, cols, side * side, cols + 1)):
                r_of = (np.floor((np.arange(h) + 0.5) * n_rows / h)).astype(int)  # pixel centre -> token row
                c_of = (np.floor((np.arange(w) + 0.5) * n_cols / w)).astype(int)
                hit = np.zeros((n_rows, n_cols), bool)
                ys, xs = np.nonzero(mask)
                hit[r_of[ys], c_of[xs]] = True
                want += [offset + r * stride + c for r, c in zip(*np.nonzero(hit))]
            got = tokens_covering(layout, side, (b.x0, b.y0, b.x1, b.y1))
            assert got.tolist() == sorted(want), (seed, obj.kind)
            assert got.max() < layout.num_visual_tokens and (got < side * side).any() and (got >= side * side).any()
            assert object_recall(got, np.arange(layout.num_visual_tokens)) == 1.0
            assert object_recall(got, np.setdiff1d(np.arange(layout.num_visual_tokens), got)) == 0.0
            assert object_recall(got, got[::2]) == got[::2].size / got.size
