"""Drive recordings: camera frames out of a ROS bag, decoded to RGB (docs/replay.md).

A `Recording` owns one opened bag (rosbag2 in MCAP or SQLite3, or ROS 1 .bag files), read with the
`rosbags` library (pure Python, no ROS install; imported here only, when a recording is opened).
It says which topics carry camera images, checks the ones a replay names, and streams their
frames in recording order; a damaged bag ends the stream with an error that says how far it got.
`decode_image` turns a `sensor_msgs/msg/Image` (raw, in the common encodings) or
`sensor_msgs/msg/CompressedImage` (JPEG, PNG) into the RGB image the pipeline takes.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from runtime.errors import LladaVError
from runtime.preprocess import IMAGE_DATA_ERRORS, check_frame_size, open_image, to_rgb8

RAW, COMPRESSED = "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (RAW, COMPRESSED)
# raw encodings -> (bytes per pixel, how the channels become RGB); sensor_msgs/image_encodings.hpp's names
RAW_ENCODINGS = {
    "rgb8": (3, "rgb"), "bgr8": (3, "bgr"), "rgba8": (4, "rgb"), "bgra8": (4, "bgr"),
    "mono8": (1, "mono"), "8UC1": (1, "mono"), "8UC3": (3, "bgr"),  # 8UC3: OpenCV's (cv_bridge's) channel order
    "mono16": (2, "mono16"), "16UC1": (2, "mono16"),
    "bayer_rggb8": (1, "RGGB"), "bayer_bggr8": (1, "BGGR"), "bayer_gbrg8": (1, "GBRG"), "bayer_grbg8": (1, "GRBG"),
    "yuv422": (2, "uyvy"), "uyvy": (2, "uyvy"), "yuv422_yuy2": (2, "yuyv"), "yuyv": (2, "yuyv"),
}


class UnreadableFrame(LladaVError):
    """One message's data cannot be decoded (a corrupt JPEG): that frame, not the topic, is bad."""


@dataclass(frozen=True)
class Frame:
    """One camera message: when it was taken (its header stamp; the recording time when the header
    has none) and when it was recorded, both in ns, and the message, decoded only when asked."""

    camera: str
    topic: str
    msgtype: str
    stamp_ns: int
    log_ns: int
    msg: object

    def image(self) -> Image.Image:
        return decode_image(self.msg, self.msgtype, f"topic {self.topic!r} at {self.stamp_ns} ns")


def decode_image(msg, msgtype: str, where: str) -> Image.Image:
    """A camera message -> an RGB PIL image. where: names the message in errors."""
    if msgtype == COMPRESSED:
        return _decode_compressed(msg, where)
    if msgtype != RAW:
        raise LladaVError(f"{where}: a {msgtype} message; expected {RAW} or {COMPRESSED}")
    encoding = str(msg.encoding)
    if encoding not in RAW_ENCODINGS:
        raise LladaVError(f"{where}: image encoding {encoding!r}; expected a camera encoding, one of "
                          f"{', '.join(RAW_ENCODINGS)}")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    check_frame_size((w, h), where)
    if h == 0 or w == 0:
        raise LladaVError(f"{where}: a {w}x{h} image; expected a non-empty one")
    bpp, order = RAW_ENCODINGS[encoding]
    data = np.frombuffer(memoryview(msg.data), np.uint8)
    if step < w * bpp or data.size < step * h:
        raise LladaVError(f"{where}: {encoding} {w}x{h} with step {step} needs {w * bpp}+ bytes per row and "
                          f"{step * h} bytes; the message holds {data.size} bytes")
    rows = data[: step * h].reshape(h, step)[:, : w * bpp]
    return Image.fromarray(_to_rgb(rows, w, bpp, order, bool(msg.is_bigendian)), "RGB")


def _to_rgb(rows: np.ndarray, w: int, bpp: int, order: str, bigendian: bool) -> np.ndarray:
    """(H, W*bpp) bytes -> (H, W, 3) uint8 RGB."""
    h = rows.shape[0]
    if order == "mono":
        return np.repeat(rows[:, :, None], 3, axis=2)
    if order == "mono16":
        values = rows.copy().view(">u2" if bigendian else "<u2").reshape(h, w)
        gray = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)  # as preprocess.to_rgb8 scales 16-bit files
        return np.repeat(gray[:, :, None], 3, axis=2)
    if order in ("rgb", "bgr"):
        px = rows.reshape(h, w, bpp)[:, :, :3]
        return np.ascontiguousarray(px if order == "rgb" else px[:, :, ::-1])
    if order in ("uyvy", "yuyv"):
        return _yuv422(rows.reshape(h, w // 2, 4) if w % 2 == 0 else rows[:, : (w - 1) * 2].reshape(h, -1, 4), order, w)
    return _debayer(rows, order)


def _yuv422(quads: np.ndarray, order: str, w: int) -> np.ndarray:
    """4:2:2 (two pixels share U and V) -> RGB, BT.601 limited range as cameras send it."""
    q = quads.astype(np.float32)
    if order == "uyvy":
        u, y0, v, y1 = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    else:
        y0, u, y1, v = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    y = np.stack([y0, y1], axis=-1).reshape(q.shape[0], -1)  # (H, 2 * pairs)
    u, v = np.repeat(u, 2, axis=1) - 128.0, np.repeat(v, 2, axis=1) - 128.0
    c = (y - 16.0) * 1.164
    rgb = np.stack([c + 1.596 * v, c - 0.392 * u - 0.813 * v, c + 2.017 * u], axis=-1)
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out if out.shape[1] == w else np.concatenate([out, out[:, -1:]], axis=1)  # odd width: repeat the last


def _debayer(rows: np.ndarray, pattern: str) -> np.ndarray:
    """A Bayer mosaic -> RGB by 2x2 cells (each cell's R, the mean of its two Gs, its B), then back to
    full size: enough for a 384-px model view, with no colour fringes. pattern: the cell's colours
    row by row (RGGB, BGGR, GBRG, GRBG)."""
    h, w = rows.shape[0] // 2 * 2, rows.shape[1] // 2 * 2
    m = rows[:h, :w].astype(np.float32)
    sites = [m[0::2, 0::2], m[0::2, 1::2], m[1::2, 0::2], m[1::2, 1::2]]  # the cell's positions, row by row
    red = sites[pattern.index("R")]
    blue = sites[pattern.index("B")]
    green = sum(site for site, colour in zip(sites, pattern) if colour == "G") / 2
    rgb = np.stack([red, green, blue], axis=-1)
    small = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return np.asarray(small.resize((rows.shape[1], rows.shape[0]), Image.BILINEAR))


def _decode_compressed(msg, where: str) -> Image.Image:
    fmt = str(msg.format)
    if "compressedDepth" in fmt:
        raise LladaVError(f"{where}: format {fmt!r} is a depth image; expected a camera image (jpeg, png)")
    try:
        image = open_image(io.BytesIO(memoryview(msg.data).tobytes()), where)
    except IMAGE_DATA_ERRORS as exc:
        raise UnreadableFrame(f"{where}: compressed image (format {fmt!r}) unreadable ({exc}); expected JPEG or "
                              "PNG data") from None
    return to_rgb8(image)  # 16-bit PNGs scaled, not clipped


class Recording:
    """One opened bag (a rosbag2 directory or its storage file, or ROS 1 .bag files): its camera
    topics and their frames. Use as a context manager.

    rosbags reads it through its index. An MCAP whose index is missing (a recording cut short: power
    lost, the recorder killed) is read front to back instead (`mcap`'s stream reader), up to where
    it ends; `salvaged` says so."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise LladaVError(f"--bag {str(self.path)!r}: no such file or directory")
        try:
            self._source = _Indexed(self.path)
            self.salvaged = False
        except LladaVError:
            mcaps = _mcap_files(self.path)
            if not any(_cut_short(f) for f in mcaps):  # another fault: rosbags' own error says which
                raise
            self._source = _Salvage(self.path, mcaps)
            self.salvaged = True
        self.read = 0  # messages delivered so far

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._source.close()

    @property
    def start_ns(self) -> int:
        return self._source.start_ns

    def topics(self) -> dict[str, str]:
        """topic -> message type, every topic."""
        return dict(self._source.topics)

    def count(self, topic: str) -> int:
        """How many messages the topic holds."""
        return self._source.counts.get(topic, 0)

    def image_topics(self) -> dict[str, str]:
        return {t: m for t, m in self.topics().items() if m in IMAGE_TYPES}

    def check_cameras(self, cameras: dict[str, str]) -> None:
        """cameras: name -> topic; each topic present and carrying images."""
        have, images = self.topics(), self.image_topics()
        listed = ", ".join(f"{t} ({m.rsplit('/', 1)[-1]})" for t, m in sorted(images.items())) or "none"
        for name, topic in cameras.items():
            if topic not in have:
                raise LladaVError(f"--camera {name}={topic}: no topic {topic!r} in {str(self.path)!r}; its image "
                                  f"topics: {listed}")
            if have[topic] not in IMAGE_TYPES:
                raise LladaVError(f"--camera {name}={topic}: the topic carries {have[topic]}; expected "
                                  f"{' or '.join(IMAGE_TYPES)} (image topics here: {listed})")
            if not self.count(topic):
                raise LladaVError(f"--camera {name}={topic}: the topic holds no messages in {str(self.path)!r}")

    def check_first_frames(self, cameras: dict[str, str]) -> None:
        """Decode each camera's first frame: an encoding that is no camera image is an error before any
        engine loads (one corrupt frame is not: the replay skips its time)."""
        for name, topic in cameras.items():
            frames = self.frames({name: topic})
            try:
                next(frames).image()
            except (UnreadableFrame, StopIteration):
                pass
            finally:
                frames.close()
        self.read = 0

    def frames(self, cameras: dict[str, str], start_ns: int | None = None, stop_ns: int | None = None
               ) -> Iterator[Frame]:
        """Every message of the named cameras' topics recorded in [start_ns, stop_ns), in recording
        order. A damaged bag raises LladaVError after the last good message, saying where."""
        by_topic = {topic: name for name, topic in cameras.items()}
        assert len(by_topic) == len(cameras), "one topic per camera"
        messages = self._source.messages(set(by_topic), start_ns, stop_ns)
        try:
            yield from self._frames(messages, by_topic)
        finally:
            messages.close()  # a replay stopped early lets go of the file

    def _frames(self, messages, by_topic: dict[str, str]) -> Iterator[Frame]:
        last = None
        while True:
            try:
                topic, msgtype, log_ns, msg = next(messages)
            except StopIteration:
                return
            except Exception as exc:  # a truncated or corrupt file: rosbags, mcap, sqlite, lz4/zstd, struct errors
                where = (f"after {self.read} camera messages (the last good one on {last[0]} recorded at {last[1]} ns)"
                         if last else "before its first camera message")
                what = str(exc) if isinstance(exc, _Cut) else f"{type(exc).__name__}: {exc}"
                raise LladaVError(f"--bag {str(self.path)!r}: damaged {where}: {what}") from None
            self.read += 1
            last = (topic, log_ns)
            stamp = msg.header.stamp
            stamp_ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
            yield Frame(by_topic[topic], topic, msgtype, stamp_ns or int(log_ns), int(log_ns), msg)


def _rosbags():
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError:
        raise LladaVError("reading drive recordings needs the rosbags library: pip install 'lladav-edge[replay]' "
                          "(or pip install rosbags mcap)") from None
    # ROS 2 Humble's standard types: for bags whose writer embedded no message definitions
    return AnyReader, get_typestore(Stores.ROS2_HUMBLE)


def _mcap_files(path: Path) -> list[Path]:
    """The MCAP files of a bag in recording order (rosbag2 numbers its splits: drive_0, drive_1, ...)."""
    if path.is_file():
        return [path] if path.suffix == ".mcap" else []
    return sorted(path.glob("*.mcap"), key=lambda f: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", f.name)])


MCAP_MAGIC = b"\x89MCAP0\r\n"


def _cut_short(f: Path) -> bool:
    """An MCAP that starts as one and does not end with the magic: its recorder never wrote the index."""
    try:
        with open(f, "rb") as stream:
            head = stream.read(len(MCAP_MAGIC))
            stream.seek(max(0, f.stat().st_size - len(MCAP_MAGIC)))
            return head == MCAP_MAGIC and stream.read() != MCAP_MAGIC
    except OSError:
        return False


class _Indexed:
    """A bag read through its index by rosbags' AnyReader (rosbag2 MCAP or SQLite3, ROS 1)."""

    def __init__(self, path: Path):
        AnyReader, store = _rosbags()
        bags = sorted(path.glob("*.bag")) if path.is_dir() and not (path / "metadata.yaml").is_file() else []
        try:
            self.reader = AnyReader(bags or [path], default_typestore=store)
            self.reader.open()
        except Exception as exc:  # rosbags raises its own errors and, on damaged files, others
            raise LladaVError(f"--bag {str(path)!r}: not a readable ROS bag ({type(exc).__name__}: {exc}); expected "
                              "a rosbag2 directory (metadata.yaml with .mcap or .db3 files), one .mcap or .db3 file, "
                              "or ROS 1 .bag files") from None
        self.topics = {c.topic: c.msgtype for c in self.reader.connections}
        self.counts = {t: info.msgcount for t, info in self.reader.topics.items()}
        self.start_ns = int(self.reader.start_time)

    def messages(self, topics: set[str], start_ns, stop_ns):
        conns = [c for c in self.reader.connections if c.topic in topics]
        if not conns:  # rosbags reads every topic when given none
            return
        for conn, log_ns, raw in self.reader.messages(connections=conns, start=start_ns, stop=stop_ns):
            yield conn.topic, conn.msgtype, log_ns, self.reader.deserialize(raw, conn.msgtype)

    def close(self) -> None:
        self.reader.close()


class _Salvage:
    """MCAP files read front to back without their index: what a recording cut short still holds.
    One pass at open finds the topics, their counts and where the data ends; messages() reads up to
    there and raises the damage it met if it lies inside the stretch asked for."""

    def __init__(self, path: Path, files: list[Path]):
        _, self.store = _rosbags()
        try:
            from mcap.records import Channel, Message, Schema
            from mcap.stream_reader import StreamReader
        except ImportError:
            raise LladaVError(f"--bag {str(path)!r}: its MCAP index is missing (a recording cut short?); reading it "
                              "front to back needs the mcap library: pip install 'lladav-edge[replay]'") from None
        self.path, self.files, self._reader = path, files, StreamReader
        self._kinds = (Channel, Message, Schema)
        self.topics, self.counts, self.start_ns = {}, {}, None
        for topic, msgtype, log_ns, _ in self._records(None, None, None):
            self.topics.setdefault(topic, msgtype)
            self.counts[topic] = self.counts.get(topic, 0) + 1
            self.start_ns = log_ns if self.start_ns is None else min(self.start_ns, log_ns)
        if self.start_ns is None:
            raise LladaVError(f"--bag {str(path)!r}: not a readable ROS bag (its MCAP index is missing, and no message "
                              f"could be read front to back: {self.damage})")

    def _records(self, topics: set[str] | None, start_ns, stop_ns):
        """(topic, msgtype, log_ns, message) of the messages up to the damage: every topic's (topics
        None: not deserialized), or those topics' recorded in [start_ns, stop_ns), deserialized. The
        damage (or None) and the last message's time are left in self.damage, self.last_ns."""
        Channel, Message, Schema = self._kinds
        self.damage, self.last_ns = None, None
        for f in self.files:
            schemas, channels = {}, {}  # ids are per file
            try:
                with open(f, "rb") as stream:
                    for rec in self._reader(stream, validate_crcs=True).records:
                        if isinstance(rec, Schema):
                            schemas[rec.id] = rec.name
                        elif isinstance(rec, Channel):
                            channels[rec.id] = (rec.topic, schemas.get(rec.schema_id, ""), rec.message_encoding)
                        elif isinstance(rec, Message) and rec.channel_id in channels:
                            self.last_ns = rec.log_time
                            topic, msgtype, encoding = channels[rec.channel_id]
                            if topics is None:
                                yield topic, msgtype, rec.log_time, None
                            elif (topic in topics and encoding == "cdr" and (start_ns is None or rec.log_time >= start_ns)
                                  and (stop_ns is None or rec.log_time < stop_ns)):
                                yield topic, msgtype, rec.log_time, self.store.deserialize_cdr(rec.data, msgtype)
            except Exception as exc:  # EndOfFile where the recording was cut, or a corrupt record
                self.damage = (f"{f.name} ends inside a record (cut short)" if type(exc).__name__ == "EndOfFile"
                               else f"{f.name}: {type(exc).__name__}: {exc}")
                return

    def messages(self, topics: set[str], start_ns, stop_ns):
        yield from self._records(topics, start_ns, stop_ns)
        if self.damage and (stop_ns is None or self.last_ns is None or self.last_ns < stop_ns):
            raise _Cut(self.damage)

    def close(self) -> None:
        pass


class _Cut(Exception):
    """Where a salvaged MCAP's data ends."""
