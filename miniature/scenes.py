"""Driving scenes with known answers: the miniature LLaDA-V's task and the yardstick for pruning,
quantization and caching.

`scene(seed)` draws a camera-aspect road scene (sky, roadside clutter, a three-lane road with
markings, vehicles, a traffic light, maybe a pedestrian, a speed-limit sign) and knows every
object's box; `questions(scene)` asks the templated questions and computes their answers (a few
words each) and which objects each question is about (the harness measures how many of those
objects' visual tokens pruning keeps). Train and test scenes come from disjoint seed ranges.
Everything is deterministic in the seed (numpy's PCG64, PIL drawing).

Camera rigs (`rig(seed)`): two or three cameras (front, left, right), each its own scene, and
questions that name a camera ("In the left camera, is there a pedestrian?") or span them ("How
many vehicles in all cameras?"); their scenes' seeds lie apart from the single-image ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = (640, 360)
TRAIN_SEEDS = range(0, 10_000_000)
TEST_SEEDS = range(10_000_000, 10_000_000 + 120)  # 120 scenes x 6 question types = 720 held-out questions
COLORS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (30, 150, 50), "yellow": (230, 200, 30),
          "white": (235, 235, 235), "black": (25, 25, 25)}
LIGHTS = ("red", "yellow", "green")
LIMITS = (30, 50, 70, 90, 110)
NUMBERS = ("zero", "one", "two", "three", "four")
RIG_NUMBERS = (*NUMBERS, "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")  # all cameras' vehicles
LANES = ("left", "ego", "right")


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    @property
    def size(self) -> tuple[int, int]:
        return self.x1 - self.x0, self.y1 - self.y0

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1


@dataclass(frozen=True)
class Obj:
    kind: str  # vehicle, light, pedestrian, sign
    box: Box
    color: str | None = None  # vehicles: body colour; light: the lit lamp
    lane: str | None = None  # vehicles: left / ego / right
    side: str | None = None  # pedestrians: left / right
    value: int | None = None  # sign: the speed limit


@dataclass
class Scene:
    seed: int
    image: Image.Image
    objects: list[Obj] = field(default_factory=list)

    def of(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o.kind == kind]


@dataclass(frozen=True)
class Question:
    kind: str  # light, count, pedestrian, ahead, limit, left_free, right_free
    text: str
    answer: str
    about: tuple[int, ...]  # indices into scene.objects

    @property
    def report_kind(self) -> str:
        """The kind as tables report it: left_free and right_free are both 'lane'."""
        return "lane" if self.kind.endswith("_free") else self.kind


TEMPLATES = {
    "light": "What color is the traffic light?",
    "count": "How many vehicles are there?",
    "pedestrian": "Is there a pedestrian?",
    "ahead": "What color is the vehicle ahead?",
    "limit": "What is the speed limit?",
    "left_free": "Is the left lane free?",
    "right_free": "Is the right lane free?",
}


# ---------------------------------------------------------------- drawing


def _road(w: int, h: int):
    """Horizon y, and the road's left/right edge x at a given y (a trapezoid to the bottom)."""
    horizon = int(h * 0.42)

    def edges(y: float) -> tuple[float, float]:
        t = (y - horizon) / (h - horizon)
        return w * (0.44 - 0.44 * t), w * (0.56 + 0.44 * t)

    return horizon, edges


def _lane_x(lane: str, y: float, edges) -> float:
    left, right = edges(y)
    return left + (right - left) * {"left": 1 / 6, "ego": 3 / 6, "right": 5 / 6}[lane]


def _background(d: ImageDraw.ImageDraw, rng, w: int, h: int, horizon: int, edges) -> None:
    d.rectangle([0, 0, w, horizon], fill=tuple(int(v) for v in rng.integers([110, 150, 200], [150, 190, 240])))
    d.rectangle([0, horizon, w, h], fill=tuple(int(v) for v in rng.integers([70, 110, 50], [100, 150, 80])))
    for _ in range(int(rng.integers(4, 9))):  # roadside clutter: buildings and trees along the horizon
        x = int(rng.integers(0, w))
        bw, bh = int(rng.integers(20, 60)), int(rng.integers(15, 60))
        shade = int(rng.integers(90, 170))
        d.rectangle([x, horizon - bh, x + bw, horizon], fill=(shade, shade - 10, shade - 20))
    d.polygon([(edges(horizon)[0], horizon), (edges(horizon)[1], horizon), (w, h), (0, h)], fill=(75, 75, 80))
    for frac in (1 / 3, 2 / 3):  # lane markings, dashed, widening towards the camera
        for i in range(8):
            y0 = horizon + (h - horizon) * i / 8
            y1 = y0 + (h - horizon) / 16
            x0 = edges(y0)[0] + (edges(y0)[1] - edges(y0)[0]) * frac
            x1 = edges(y1)[0] + (edges(y1)[1] - edges(y1)[0]) * frac
            half = 1 + 3 * (y1 - horizon) / (h - horizon)
            d.polygon([(x0 - half, y0), (x0 + half, y0), (x1 + half, y1), (x1 - half, y1)], fill=(240, 240, 240))


def _vehicle(rng, lane: str, depth: float, h: int, horizon: int, edges) -> Obj:
    y_bottom = horizon + (h - horizon) * depth
    left, right = edges(y_bottom)
    width = (right - left) / 3 * 0.75
    height = width * 0.75
    cx = _lane_x(lane, y_bottom, edges)
    box = Box(int(cx - width / 2), int(y_bottom - height), int(cx + width / 2), int(y_bottom))
    return Obj("vehicle", box, color=str(rng.choice(list(COLORS))), lane=lane)


def _draw_vehicle(d, v: Obj) -> None:
    b = v.box
    width, height = b.size
    d.rectangle([b.x0, b.y0, b.x1, b.y1], fill=COLORS[v.color], outline=(10, 10, 10), width=2)
    d.rectangle([b.x0 + width * 0.15, b.y0 + height * 0.1, b.x1 - width * 0.15, b.y0 + height * 0.4],
                fill=(150, 190, 220))  # windscreen


def _light(d, rng, w: int, horizon: int) -> Obj:
    lit = str(rng.choice(LIGHTS))
    x = int(rng.choice([w * 0.22, w * 0.68])) + int(rng.integers(-20, 20))
    lamp = 26
    box = Box(x, horizon - 5 * lamp, x + 2 * lamp, horizon - 5 * lamp + 3 * lamp + 8)
    d.rectangle([box.x0 + lamp - 2, box.y1, box.x0 + lamp + 2, horizon + 30], fill=(60, 60, 60))  # pole
    d.rectangle([box.x0, box.y0, box.x1, box.y1], fill=(30, 30, 30))
    for i, name in enumerate(LIGHTS):
        cy = box.y0 + 4 + lamp // 2 + i * lamp
        on = {"red": (255, 40, 40), "yellow": (255, 210, 40), "green": (40, 230, 80)}[name]
        d.ellipse([box.x0 + 3, cy - lamp // 2 + 1, box.x1 - 3, cy + lamp // 2 - 1],
                  fill=on if name == lit else (70, 70, 70))
    return Obj("light", box, color=lit)


def _pedestrian(rng, side: str, w: int, h: int, horizon: int, edges) -> Obj:
    y_feet = int(horizon + (h - horizon) * rng.uniform(0.35, 0.8))
    left, right = edges(y_feet)
    height = int(50 + 70 * (y_feet - horizon) / (h - horizon))
    x = int(left - 35 if side == "left" else right + 35) + int(rng.integers(-10, 10))
    x = min(max(x, height // 4 + 1), w - height // 4 - 1)
    return Obj("pedestrian", Box(x - height // 4, y_feet - height, x + height // 4, y_feet), side=side)


def _draw_pedestrian(d, p: Obj, shirt: tuple[int, int, int]) -> None:
    b = p.box
    height = b.size[1]
    x = (b.x0 + b.x1) // 2
    d.rectangle([b.x0, b.y0 + height // 4, b.x1, b.y1], fill=shirt)
    d.ellipse([x - height // 8, b.y0, x + height // 8, b.y0 + height // 4], fill=(230, 190, 160))


def _overlap(a: Box, b: Box) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _sign(d, rng, w: int, horizon: int) -> Obj:
    limit = int(rng.choice(LIMITS))
    r = 40
    x = int(w * rng.choice([0.08, 0.9]))
    box = Box(x - r, horizon - 2 * r - 10, x + r, horizon - 10)
    d.rectangle([x - 2, box.y1, x + 2, horizon + 25], fill=(90, 90, 90))
    d.ellipse([box.x0, box.y0, box.x1, box.y1], fill=(220, 20, 20))
    d.ellipse([box.x0 + 6, box.y0 + 6, box.x1 - 6, box.y1 - 6], fill=(250, 250, 250))
    font = ImageFont.load_default(size=34)
    d.text((x, box.y0 + r), str(limit), fill=(0, 0, 0), font=font, anchor="mm")
    return Obj("sign", box, value=limit)


def scene(seed: int, size: tuple[int, int] = SIZE) -> Scene:
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    horizon, edges = _road(w, h)
    _background(d, rng, w, h, horizon, edges)
    out = Scene(seed, img)
    out.objects.append(_sign(d, rng, w, horizon))
    out.objects.append(_light(d, rng, w, horizon))
    movers: list[Obj] = []  # vehicles and a pedestrian: laid out without overlaps, then drawn far to near
    lanes = [str(x) for x in rng.choice(LANES, size=int(rng.integers(0, 5)))]
    for lane, depth in zip(lanes, rng.uniform(0.3, 0.9, size=len(lanes))):
        v = _vehicle(rng, lane, depth, h, horizon, edges)
        if not any(_overlap(v.box, o.box) for o in movers):
            movers.append(v)
    side = str(rng.choice(["none", "left", "right"]))
    shirt = tuple(int(v) for v in rng.integers(60, 230, size=3))
    if side != "none":
        for _ in range(8):  # a pedestrian nobody hides: not behind (or in front of) a vehicle
            ped = _pedestrian(rng, side, w, h, horizon, edges)
            if not any(_overlap(ped.box, o.box) for o in movers):
                movers.append(ped)
                break
    for o in sorted(movers, key=lambda o: o.box.y1):
        _draw_vehicle(d, o) if o.kind == "vehicle" else _draw_pedestrian(d, o, shirt)
    out.objects += movers
    return out


# ---------------------------------------------------------------- questions


def questions(s: Scene, kinds=("light", "count", "pedestrian", "ahead", "limit")) -> list[Question]:
    """The templated questions for a scene, with computed answers and the objects they are about.
    Lane questions rotate in by seed (left or right) so every scene asks six questions."""
    idx = {id(o): i for i, o in enumerate(s.objects)}
    vehicles = s.of("vehicle")
    out = []
    for kind in (*kinds, "left_free" if s.seed % 2 == 0 else "right_free"):
        if kind == "light":
            light = s.of("light")[0]
            out.append(Question(kind, TEMPLATES[kind], light.color, (idx[id(light)],)))
        elif kind == "count":
            out.append(Question(kind, TEMPLATES[kind], NUMBERS[len(vehicles)], tuple(idx[id(v)] for v in vehicles)))
        elif kind == "pedestrian":
            ped = s.of("pedestrian")
            answer = f"yes, on the {ped[0].side}" if ped else "no"
            out.append(Question(kind, TEMPLATES[kind], answer, tuple(idx[id(p)] for p in ped)))
        elif kind == "ahead":
            ego = sorted((v for v in vehicles if v.lane == "ego"), key=lambda v: -v.box.y1)  # nearest first
            out.append(Question(kind, TEMPLATES[kind], ego[0].color if ego else "none",
                                (idx[id(ego[0])],) if ego else ()))
        elif kind == "limit":
            sign = s.of("sign")[0]
            out.append(Question(kind, TEMPLATES[kind], str(sign.value), (idx[id(sign)],)))
        else:
            lane = kind.split("_")[0]
            there = [v for v in vehicles if v.lane == lane]
            out.append(Question(kind, TEMPLATES[kind], "no" if there else "yes", tuple(idx[id(v)] for v in there)))
    return out


def held_out_set() -> list[tuple[Scene, Question]]:
    """The fixed held-out set: every question of every test scene."""
    return [(s, q) for s in map(scene, TEST_SEEDS) for q in questions(s)]


# ---------------------------------------------------------------- camera rigs

RIG_CAMERAS = ("front", "left", "right")
RIG_TRAIN_SEEDS = range(0, 1_000_000)
RIG_TEST_SEEDS = range(1_000_000, 1_000_000 + 60)  # 60 rigs x (cameras + 1) questions, held out
RIG_SCENE_BASE = 50_000_000  # a rig's scenes: 4 seeds each from here, apart from TRAIN_SEEDS and TEST_SEEDS
RIG_TEMPLATES = {
    "cam_pedestrian": "In the {camera} camera, is there a pedestrian?",
    "cam_light": "In the {camera} camera, what color is the traffic light?",
    "cam_count": "In the {camera} camera, how many vehicles?",  # training only (miniature.rig_finetune)
    "all_count": "How many vehicles in all cameras?",
}
RIG_CAMERA_KINDS = ("cam_pedestrian", "cam_light", "cam_count")  # the questions naming one camera


@dataclass
class RigScene:
    seed: int
    cameras: dict[str, Scene]  # name -> what that camera sees, in RIG_CAMERAS order


@dataclass(frozen=True)
class RigQuestion:
    kind: str  # RIG_TEMPLATES' keys
    text: str
    answer: str
    camera: str | None  # the camera it names (None: every camera)
    about: tuple[tuple[int, int], ...]  # (camera index, object index) pairs

    @property
    def report_kind(self) -> str:
        return self.kind


def rig(seed: int, size: tuple[int, int] = SIZE) -> RigScene:
    """Two or three cameras (by seed), each an independent scene."""
    n = 2 + seed % 2
    scenes = [scene(RIG_SCENE_BASE + 4 * seed + i, size) for i in range(n)]
    return RigScene(seed, dict(zip(RIG_CAMERAS, scenes)))


def rig_questions(r: RigScene, kinds: tuple[str, ...] | None = None) -> list[RigQuestion]:
    """One question per camera naming it and one spanning every camera (their vehicles counted
    together). kinds: per camera, which camera question it asks (RIG_CAMERA_KINDS); by default the
    held-out rule, pedestrian or traffic light alternating by seed and camera. Training draws them
    (miniature.rig_finetune), the per-camera count included."""
    if kinds is None:
        kinds = tuple("cam_pedestrian" if (r.seed + i) % 2 == 0 else "cam_light" for i in range(len(r.cameras)))
    assert len(kinds) == len(r.cameras) and set(kinds) <= set(RIG_CAMERA_KINDS), kinds
    out = [_camera_question(kind, i, name, s) for i, ((name, s), kind) in enumerate(zip(r.cameras.items(), kinds))]
    vehicles = [(i, j) for i, s in enumerate(r.cameras.values()) for j, o in enumerate(s.objects) if o.kind == "vehicle"]
    out.append(RigQuestion("all_count", RIG_TEMPLATES["all_count"], RIG_NUMBERS[len(vehicles)], None, tuple(vehicles)))
    return out


def camera_answers(r: RigScene, kind: str) -> list[str]:
    """Each camera's answer to the same camera question (a RIG_CAMERA_KINDS kind), in camera order."""
    return [q.answer for q in rig_questions(r, (kind,) * len(r.cameras))[: len(r.cameras)]]


def _camera_question(kind: str, i: int, name: str, s: Scene) -> RigQuestion:
    idx = {id(o): j for j, o in enumerate(s.objects)}
    text = RIG_TEMPLATES[kind].format(camera=name)
    if kind == "cam_pedestrian":
        ped = s.of("pedestrian")
        return RigQuestion(kind, text, f"yes, on the {ped[0].side}" if ped else "no", name,
                           tuple((i, idx[id(p)]) for p in ped))
    if kind == "cam_light":
        light = s.of("light")[0]
        return RigQuestion(kind, text, light.color, name, ((i, idx[id(light)]),))
    vehicles = s.of("vehicle")
    return RigQuestion(kind, text, NUMBERS[len(vehicles)], name, tuple((i, idx[id(v)]) for v in vehicles))


def held_out_rigs() -> list[tuple[RigScene, RigQuestion]]:
    """The fixed held-out camera questions: every question of every test rig."""
    return [(r, q) for r in map(rig, RIG_TEST_SEEDS) for q in rig_questions(r)]
