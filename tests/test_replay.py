"""Replaying drive recordings (runtime.replay, runtime.recording, runtime.pairing; docs/replay.md):
camera messages decoded in their encodings, frames paired by stamp, a two-camera bag replayed with
the engines loaded once and every answer equal to answering its frames one by one, and the errors
(not a bag, a missing topic, a damaged recording, Ctrl-C) that keep what was answered."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("rosbags", reason="the replay reads bags with rosbags (pip install 'lladav-edge[replay]')")

from rosbags.highlevel import AnyReader  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from export.build import BuildRequest, build_bundle  # noqa: E402
from export.profiles import ProfileSettings  # noqa: E402
from miniature.drive import CAMERAS, LATENCY_NS, Camera, image_message, write_drive  # noqa: E402
from runtime.errors import LladaVError  # noqa: E402
from runtime.pairing import FramePairer, Pairing  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.pruning import PruneSettings  # noqa: E402
from runtime.recording import Frame, Recording, decode_image  # noqa: E402
from runtime.replay import main  # noqa: E402
from runtime.schedule import GenerationSettings  # noqa: E402
from tests.conftest import road_sketch  # noqa: E402

STORE = get_typestore(Stores.ROS2_HUMBLE)
PROMPT = "In the left camera, is there a pedestrian?"
GEN = ["--gen-length", "8", "--steps", "8", "--quiet"]
TWO = ["--camera", "front=/cam_front/image/compressed", "--camera", "left=/cam_left/image_raw"]


@pytest.fixture(scope="module")
def rig_bundle(tmp_path_factory):
    """The miniature (128-px views: 65 tokens a camera) for two cameras, fp32."""
    from miniature import embedded_checkpoint

    profile = ProfileSettings(layout="anyres", max_text_tokens=200, opt_text_tokens=100, max_response=16,
                              opt_response=8, cameras=2)
    return build_bundle(BuildRequest(embedded_checkpoint(), tmp_path_factory.mktemp("replay") / "b", 15, 50, "fp32",
                                     profile), log=lambda m: None).out


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    """6 s: front 60 PNG frames at 10 Hz, left raw rgb8 at 5 Hz with no frames in [2.5, 3.3) s."""
    return write_drive(tmp_path_factory.mktemp("drive") / "bag", seconds=6.0, gap=(2.5, 3.3))


# ------------------------------------------------------------------ decoding


def raw(encoding: str, px: np.ndarray, step: int | None = None, bigendian: bool = False, width: int | None = None):
    h, w = px.shape[0], width or px.shape[1]
    data = px.reshape(h, -1)
    step = step or data.shape[1]
    rows = np.zeros((h, step), np.uint8)
    rows[:, : data.shape[1]] = data
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian), step=step,
                           data=rows.reshape(-1))


def test_raw_encodings_decode_to_the_same_rgb():
    rgb = np.asarray(road_sketch(64, 48))
    for enc, px in [("rgb8", rgb), ("bgr8", rgb[:, :, ::-1]), ("rgba8", np.dstack([rgb, np.full(rgb.shape[:2], 9)])),
                    ("bgra8", np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 9)]))]:
        msg = raw(enc, np.ascontiguousarray(px.astype(np.uint8)), step=px.shape[1] * px.shape[2] + 5)  # padded rows
        assert np.array_equal(np.asarray(decode_image(msg, "sensor_msgs/msg/Image", "t")), rgb), enc
    gray = rgb[:, :, 1]
    assert np.array_equal(np.asarray(decode_image(raw("mono8", gray), "sensor_msgs/msg/Image", "t"))[:, :, 0], gray)
    wide = gray.astype(np.uint16) * 256 + (255 - gray)  # high and low bytes differ: byte order matters
    want = np.rint(wide * (255 / 65535)).astype(np.uint8)  # 16-bit scaled to 8 as image files are
    for big in (False, True):
        bytes16 = wide.astype(">u2" if big else "<u2").view(np.uint8).reshape(wide.shape[0], -1)
        out = decode_image(raw("mono16", bytes16, bigendian=big, width=wide.shape[1]), "sensor_msgs/msg/Image", "t")
        assert np.array_equal(np.asarray(out)[:, :, 2], want)


def test_yuv_and_bayer_frames_keep_their_colours():
    # BT.601 limited range: Y=81, U=90, V=240 is red (255, 0, 0); Y=145, U=54, V=34 is green (0, 255, 0)
    for enc, quad in (("uyvy", [90, 81, 240, 145]), ("yuyv", [81, 90, 145, 240])):  # 2 pixels: Y0 red-ish, Y1 brighter
        for width in (8, 7):  # an odd width repeats its last pixel
            step = (width + 1) // 2 * 4 + 3  # padded rows
            rows = np.zeros((4, step), np.uint8)
            rows[:, : (width + 1) // 2 * 4] = np.tile(np.array(quad, np.uint8), (4, (width + 1) // 2))
            out = np.asarray(decode_image(SimpleNamespace(height=4, width=width, encoding=enc, is_bigendian=0,
                                                          step=step, data=rows.reshape(-1)), "sensor_msgs/msg/Image", "t"))
            assert out.shape == (4, width, 3) and (np.abs(out[:, 0].astype(int) - (255, 0, 0)) <= 2).all(), enc
            assert (out[:, 1].astype(int) > out[:, 0].astype(int)).all()  # Y1 = Y0 + 64 with the pair's U, V
    colour = {"R": 200, "G": 100, "B": 50}
    for pattern in ("RGGB", "BGGR", "GBRG", "GRBG"):
        mosaic = np.zeros((8, 8), np.uint8)
        for (dy, dx), c in zip(((0, 0), (0, 1), (1, 0), (1, 1)), pattern):
            mosaic[dy::2, dx::2] = colour[c]
        out = np.asarray(decode_image(raw(f"bayer_{pattern.lower()}8", mosaic, step=11), "sensor_msgs/msg/Image", "t"))
        assert out.shape == (8, 8, 3) and (out == (200, 100, 50)).all(), pattern


def test_compressed_frames_decode_as_pil_reads_their_bytes():
    img = road_sketch(80, 60)
    for fmt in ("png", "jpeg"):
        msg = image_message(STORE, Camera("c", "/c", 1.0, fmt), img, 0)
        expect = Image.open(io.BytesIO(msg.data.tobytes())).convert("RGB")
        assert np.array_equal(np.asarray(decode_image(msg, "sensor_msgs/msg/CompressedImage", "t")), np.asarray(expect))


def test_messages_that_are_not_camera_images_are_named():
    with pytest.raises(LladaVError, match=r"topic '/d' at 5 ns: image encoding '32FC1'; expected a camera encoding"):
        decode_image(raw("32FC1", np.zeros((2, 8), np.uint8)), "sensor_msgs/msg/Image", "topic '/d' at 5 ns")
    with pytest.raises(LladaVError, match=r"rgb8 4x2 with step 12 needs 12\+ bytes per row and 24 bytes; the message "
                                          r"holds 20 bytes"):
        decode_image(SimpleNamespace(height=2, width=4, encoding="rgb8", is_bigendian=0, step=12,
                                     data=np.zeros(20, np.uint8)), "sensor_msgs/msg/Image", "t")
    with pytest.raises(LladaVError, match="compressed image .format 'jpeg'. unreadable"):
        decode_image(SimpleNamespace(format="jpeg", data=np.frombuffer(b"not a jpeg", np.uint8)),
                     "sensor_msgs/msg/CompressedImage", "t")
    with pytest.raises(LladaVError, match="is a depth image"):
        decode_image(SimpleNamespace(format="16UC1; compressedDepth", data=np.zeros(4, np.uint8)),
                     "sensor_msgs/msg/CompressedImage", "t")


# ------------------------------------------------------------------ pairing


def frames(camera: str, seconds) -> list[Frame]:
    return [Frame(camera, "/" + camera, "", round(t * 1e9), round(t * 1e9), None) for t in seconds]


def pair_all(cameras, pairing, stream, most_held: int = 1000):
    pairer, out = FramePairer(cameras, pairing), []
    for f in sorted(stream, key=lambda f: f.log_ns):
        pairer.add(f)
        out += list(pairer.settled())
        assert all(len(b) <= most_held for b in pairer.buffers.values())
    pairer.finish()
    return out + list(pairer.settled())


def test_each_time_takes_every_camera_s_nearest_frame_within_tolerance():
    stream = frames("front", np.arange(0, 2, 0.1)) + frames("left", [0.02, 0.26, 0.51, 1.49, 1.71])
    out = pair_all(["front", "left"], Pairing(None, 0.05), stream)
    assert [round(p.time_ns / 1e9, 1) for p in out] == [round(t, 1) for t in np.arange(0, 2, 0.1)]
    lefts = {round(p.time_ns / 1e9, 1): round(p.frames["left"].stamp_ns / 1e9, 2) for p in out if not p.skipped}
    assert lefts == {0.0: 0.02, 0.3: 0.26, 0.5: 0.51, 1.5: 1.49, 1.7: 1.71}
    skipped = {round(p.time_ns / 1e9, 1): p.skipped for p in out if p.skipped}
    assert skipped[1.0] == "left: nearest frame 0.490 s away (tolerance 0.05 s)"
    assert len(skipped) == 15 and all(p.missing == {"left": p.missing["left"]} for p in out if p.skipped)


def test_frames_out_of_stamp_order_and_a_silent_camera():
    """A late-arriving older frame is placed by its stamp and still pairs; a camera that goes silent
    counts as missing once the others are max_wait past, instead of holding every frame back."""
    left = [Frame("left", "/left", "", stamp, log, None)  # 0.05 arrives after 0.2, while time 0.2 is pending
            for stamp, log in ((200_000_000, 210_000_000), (50_000_000, 220_000_000), (400_000_000, 410_000_000))]
    out = pair_all(["front", "left"], Pairing(None, 0.05), frames("front", [0.0, 0.2]) + left)
    assert [p.frames["left"].stamp_ns if p.frames else None for p in out] == [None, 200_000_000]
    silent = frames("front", np.arange(0, 20, 0.1)) + frames("left", [0.0, 0.1])
    out = pair_all(["front", "left"], Pairing(None, 0.05, max_wait_s=1.0), silent, most_held=14)
    assert len(out) == 200 and sum(not p.skipped for p in out) == 2


def test_periodic_times_start_at_the_lead_camera_s_first_frame():
    stream = frames("front", np.arange(0.05, 3, 0.1)) + frames("left", np.arange(0.0, 3, 0.25))
    # streams: what a pending time may still pair with, until the 4 Hz camera passes it (5 frames), not the drive
    out = pair_all(["front", "left"], Pairing(0.5, 0.13), stream, most_held=5)
    assert [p.time_ns for p in out] == [round(0.05e9) + i * 500_000_000 for i in range(6)]
    assert all(not p.skipped for p in out)
    assert "no frame" in pair_all(["front", "left"], Pairing(0.5, 0.1), frames("front", [0.0]))[0].skipped


# ------------------------------------------------------------------ the recording


def test_a_recording_lists_its_camera_topics_and_refuses_others(tmp_path, drive):
    with Recording(drive.path) as rec:
        assert rec.image_topics() == {"/cam_front/image/compressed": "sensor_msgs/msg/CompressedImage",
                                      "/cam_left/image_raw": "sensor_msgs/msg/Image"}
        with pytest.raises(LladaVError, match=r"--camera rear=/rear: no topic '/rear' in .*; its image topics: "
                                              r"/cam_front/image/compressed \(CompressedImage\), /cam_left/image_raw"):
            rec.check_cameras({"rear": "/rear"})
    bag = tmp_path / "text_topic"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as w:  # SQLite3 storage reads too
        conn = w.add_connection("/chatter", "std_msgs/msg/String", typestore=STORE)
        w.write(conn, 1, STORE.serialize_cdr(STORE.types["std_msgs/msg/String"](data="hi"), "std_msgs/msg/String"))
    with Recording(bag) as rec, pytest.raises(LladaVError, match=r"the topic carries std_msgs/msg/String; expected "
                                                                r"sensor_msgs/msg/Image or .*image topics here: none"):
        rec.check_cameras({"front": "/chatter"})
    (tmp_path / "notes.txt").write_text("not a bag")
    with pytest.raises(LladaVError, match="notes.txt': not a readable ROS bag"):
        Recording(tmp_path / "notes.txt")


def truncated(drive_path: Path, tmp_path: Path, fraction: float) -> Path:
    """The drive as a recorder killed mid-drive leaves it: the MCAP cut, its index never written."""
    out = tmp_path / "cut"
    out.mkdir()
    for f in drive_path.iterdir():
        data = f.read_bytes()
        (out / f.name).write_bytes(data[: int(len(data) * fraction)] if f.suffix == ".mcap" else data)
    return out


def test_a_recording_cut_short_reads_up_to_the_cut_and_says_where(tmp_path, drive):
    cut = truncated(drive.path, tmp_path, 0.5)
    got = []
    with Recording(drive.path) as rec:  # intact: every frame decodes to what was recorded, lossless
        for f in rec.frames({"front": "/cam_front/image/compressed", "left": "/cam_left/image_raw"}):
            assert np.array_equal(np.asarray(f.image()), np.asarray(dict(drive.frames[f.camera])[f.stamp_ns]))
    with Recording(cut) as rec:
        assert rec.salvaged
        with pytest.raises(LladaVError, match=r"damaged after \d+ camera messages \(the last good one on /cam_.* "
                                              r"recorded at \d+ ns\): bag.mcap ends inside a record \(cut short\)"):
            for f in rec.frames({"front": "/cam_front/image/compressed", "left": "/cam_left/image_raw"}):
                got.append((f.camera, f.stamp_ns, np.asarray(f.image())))
    every = sorted([(c, s, np.asarray(im)) for c, fr in drive.frames.items() for s, im in fr], key=lambda x: x[1])
    assert 20 < len(got) < len(every)
    for camera, stamp, px in got:  # what was read is what was recorded, lossless
        assert any(c == camera and s == stamp and np.array_equal(p, px) for c, s, p in every)


# ------------------------------------------------------------------ the replay


def per_frame_answers(bundle, drive, records) -> list[str]:
    """Answer each record's frames one by one with a pipeline of its own, from the images the drive
    was written from (not decoded from the bag)."""
    images = {c: dict(fr) for c, fr in drive.frames.items()}
    gen = GenerationSettings(steps=8, gen_length=8, block_length=8)
    with Pipeline(bundle) as pipe:
        prune = PruneSettings(pipe.manifest.k, pipe.manifest.p, rule=pipe.manifest.rule)
        return [pipe.generate([(c, images[c][f["stamp_ns"]]) for c, f in r["frames"].items()], PROMPT, gen,
                              prune).text for r in records]


def test_a_two_camera_drive_replays_with_the_engines_loaded_once(rig_bundle, drive, tmp_path, monkeypatch, capsys):
    opened = []
    real_init = Pipeline.__init__

    def counting(self, *a, **k):
        opened.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(Pipeline, "__init__", counting)
    out, answers_bag = tmp_path / "answers.jsonl", tmp_path / "answers_bag"
    status = main(["--bundle", str(rig_bundle), "--bag", str(drive.path), *TWO, "--prompt", PROMPT, *GEN,
                   "--out", str(out), "--summary", str(tmp_path / "summary.json"), "--answers-bag", str(answers_bag)])
    assert status == 0 and len(opened) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    front, left = (np.array([s for s, _ in drive.frames[c]]) for c in ("front", "left"))
    near = [np.abs(left - t).min() <= 100_000_000 for t in front]  # --tolerance 0.1 s
    assert len(front) == 60 and len(records) == 60 and sum(near) < 60  # the gap skips some
    assert [("answer" in r) for r in records] == near
    answered = [r for r in records if "answer" in r]
    assert [r["answer"] for r in answered] == per_frame_answers(rig_bundle, drive, answered)
    for r in answered:
        assert r["frames"]["front"]["stamp_ns"] == r["stamp_ns"] and r["kept_tokens"] < r["visual_tokens"]
        assert r["frames"]["left"]["stamp_ns"] == left[np.abs(left - r["stamp_ns"]).argmin()]  # the nearest
        assert r["recorded_ns"] == r["stamp_ns"] + LATENCY_NS
        ms = r["ms"]
        assert r["outside_engines_ms"] == pytest.approx(ms["read"] + ms["wait"] + ms["runtime_other"], abs=0.01)
        assert ms["total"] == pytest.approx(ms["read"] + ms["wait"] + ms["vision"] + ms["decoder"] + ms["runtime_other"],
                                            abs=0.01) and ms["decode"] > 0 and ms["prepare"] > 0
    assert all(r["skipped"].startswith("left: nearest frame") and r["missing"] == ["left"]
               for r in records if "skipped" in r)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["answered"] == sum(near) and summary["skipped"] == 60 - sum(near)
    assert summary["skipped_by_camera"] == {"left": 60 - sum(near)}
    assert sum(summary["answers"].values()) == sum(near) and summary["stopped"] is None
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p90"] <= summary["latency_ms"]["max"]
    assert f"replay: {sum(near)} answered, {60 - sum(near)} skipped" in capsys.readouterr().err
    with AnyReader([answers_bag]) as bag:  # the answers as a topic, at their question stamps
        written = [(t, bag.deserialize(raw, c.msgtype).data) for c, t, raw in bag.messages()]
    assert written == [(r["recorded_ns"], r["answer"]) for r in answered]  # beside their frames in a player
    again = main(["--bundle", str(rig_bundle), "--bag", str(drive.path), *TWO, "--prompt", PROMPT, *GEN,
                  "--answers-bag", str(answers_bag)])
    assert again == 2 and "exists; expected a new path" in capsys.readouterr().err


def test_ctrl_c_and_a_cut_recording_keep_what_was_answered(rig_bundle, drive, tmp_path, monkeypatch, capsys):
    calls = []
    real = Pipeline.answer

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Pipeline, "answer", interrupted)
    out, bag_out = tmp_path / "a.jsonl", tmp_path / "answers"
    status = main(["--bundle", str(rig_bundle), "--bag", str(drive.path), "--camera", CAMERAS[0].name + "=" +
                   CAMERAS[0].topic, "--prompt", "Is there a pedestrian?", *GEN, "--every", "0.5", "--out", str(out),
                   "--answers-bag", str(bag_out)])
    assert status == 130 and "stopped early: interrupted (Ctrl-C)" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 3 and not (tmp_path / "a.jsonl.partial").exists()
    with AnyReader([bag_out]) as bag:
        assert bag.message_count == 3
    monkeypatch.setattr(Pipeline, "answer", real)
    cut = truncated(drive.path, tmp_path, 0.5)
    status = main(["--bundle", str(rig_bundle), "--bag", str(cut), *TWO, "--prompt", PROMPT, *GEN, "--every", "0.5",
                   "--out", str(tmp_path / "cut.jsonl")])
    err = capsys.readouterr().err
    assert status == 2 and "error: --bag" in err and "(cut short)" in err and "the answers before it are kept" in err
    kept = [json.loads(line) for line in (tmp_path / "cut.jsonl").read_text().splitlines()]
    lead = []
    with Recording(cut) as rec, pytest.raises(LladaVError, match="cut short"):
        for f in rec.frames({"front": CAMERAS[0].topic}):
            lead.append(f.stamp_ns)
    # every time up to the last frame read is settled, none lost at the cut
    assert [r["stamp_ns"] for r in kept] == list(range(lead[0], lead[-1] + 1, 500_000_000))
    assert sum("answer" in r for r in kept) >= 4
    status = main(["--bundle", str(rig_bundle), "--bag", str(cut), *TWO, "--prompt", PROMPT, *GEN, "--every", "0.5",
                   "--end", "1.2", "--out", str(tmp_path / "early.jsonl")])
    assert status == 0, capsys.readouterr().err  # the stretch asked for lies before the cut
    assert len((tmp_path / "early.jsonl").read_text().splitlines()) == 3


def test_a_topic_of_depth_images_is_refused_before_the_engines_load(rig_bundle, tmp_path, monkeypatch, capsys):
    bag = tmp_path / "depth"
    depth = STORE.types["sensor_msgs/msg/Image"](
        header=STORE.types["std_msgs/msg/Header"](stamp=STORE.types["builtin_interfaces/msg/Time"](sec=1, nanosec=0),
                                                  frame_id="d"),
        height=2, width=2, encoding="32FC1", is_bigendian=0, step=8, data=np.zeros(16, np.uint8))
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection("/depth", "sensor_msgs/msg/Image", typestore=STORE)
        w.write(conn, 1_000_000_000, STORE.serialize_cdr(depth, "sensor_msgs/msg/Image"))
    monkeypatch.setattr(Pipeline, "__init__", lambda *a, **k: pytest.fail("engines loaded"))
    assert main(["--bundle", str(rig_bundle), "--bag", str(bag), "--camera", "front=/depth", "--prompt", "x"]) == 2
    assert "topic '/depth' at 1000000000 ns: image encoding '32FC1'; expected a camera encoding" in capsys.readouterr().err


def test_replay_arguments_are_checked_before_the_bag_is_read(rig_bundle, drive, tmp_path, capsys):
    base = ["--bundle", str(rig_bundle), "--prompt", PROMPT, *GEN]
    cases = [
        (["--bag", str(tmp_path / "nope"), *TWO], "--bag '.*nope': no such file or directory"),
        (["--bag", str(drive.path), "--camera", "front"], "--camera 'front': expected NAME=TOPIC"),
        (["--bag", str(drive.path), "--camera", "a=/x", "--camera", "a=/y"], r"camera name\(s\) \['a'\]: given twice"),
        (["--bag", str(drive.path), "--camera", "a=/x", "--camera", "b=/x"], r"topic\(s\) \['/x'\] given for several"),
        (["--bag", str(drive.path), *TWO, "--tolerance", "inf"], "expected finite seconds"),
        (["--bag", str(drive.path), *TWO, "--every", "0"], "every: 0.0 s; expected a finite period > 0"),
        (["--bag", str(drive.path), *TWO, "--start", "4", "--end", "2"], "--start 4.0 --end 2.0: expected 0 <= start"),
        (["--bag", str(drive.path), *TWO, "--answers-bag", str(drive.path / "x")], "inside the input bag"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert __import__("re").search(message, capsys.readouterr().err), message
