"""A recorded drive to replay: the miniature's camera rigs as frames in a rosbag2 (docs/replay.md).

    python -m miniature.drive --out drive_bag --seconds 6

Two cameras, recorded as drivers publish them: front at 10 Hz as sensor_msgs/msg/CompressedImage
(PNG), left at 5 Hz as raw sensor_msgs/msg/Image (rgb8), its frames 30 ms after the front's. The
drive passes a new camera rig (miniature.scenes.rig) every `scene_seconds`; each frame shows its
camera's scene of that moment. Header stamps are capture times, the recording times a few ms
later; `gap` drops the left camera's frames in a stretch of time, as a camera that stalls does.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from miniature.scenes import rig

T0 = 1_700_000_000 * 1_000_000_000  # the drive's first capture, ns (a wall-clock-like ROS time)
LATENCY_NS = 7_000_000  # capture -> recorded


@dataclass(frozen=True)
class Camera:
    name: str
    topic: str
    hz: float
    encoding: str  # "png" or "jpeg" (CompressedImage), or a raw encoding: rgb8, bgr8, mono8
    phase_s: float = 0.0


CAMERAS = (Camera("front", "/cam_front/image/compressed", 10.0, "png"),
           Camera("left", "/cam_left/image_raw", 5.0, "rgb8", 0.03))


@dataclass
class Drive:
    """What was written: per camera its frames as (stamp_ns, the PIL image)."""

    path: Path
    frames: dict[str, list[tuple[int, Image.Image]]] = field(default_factory=dict)
    rigs: list = field(default_factory=list)  # the rig shown in each scene_seconds stretch


def image_message(store, cam: Camera, image: Image.Image, stamp_ns: int):
    """A sensor_msgs message of the image: compressed (cam.encoding png/jpeg) or raw."""
    types = store.types
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](
        sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000), frame_id=cam.name)
    if cam.encoding in ("png", "jpeg"):
        buf = io.BytesIO()
        image.save(buf, format=cam.encoding.upper())
        return types["sensor_msgs/msg/CompressedImage"](header=header, format=cam.encoding,
                                                          data=np.frombuffer(buf.getvalue(), np.uint8))
    px = np.asarray(image.convert("RGB"))
    px = {"rgb8": px, "bgr8": px[:, :, ::-1], "mono8": np.asarray(image.convert("L"))}[cam.encoding]
    px = np.ascontiguousarray(px)
    return types["sensor_msgs/msg/Image"](header=header, height=image.height, width=image.width, encoding=cam.encoding,
                                          is_bigendian=0, step=px.strides[0], data=px.reshape(-1))


def write_drive(out, seconds: float = 6.0, scene_seconds: float = 2.0, cameras=CAMERAS, storage: str = "mcap",
                gap: tuple[float, float] | None = None, first_rig: int = 1_000_000) -> Drive:
    """Write the drive as a new rosbag2 at `out` (MCAP or SQLite3); frames interleaved by recording time.
    The rigs come from the held-out stretch (first_rig on)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    drive = Drive(Path(out))
    scenes = int(np.ceil(seconds / scene_seconds))
    drive.rigs = [rig(first_rig + 2 * i + 1) for i in range(scenes)]  # odd seeds: three-camera rigs
    messages = []
    for cam in cameras:
        drive.frames[cam.name] = []
        for i in range(int(round(seconds * cam.hz))):
            t = cam.phase_s + i / cam.hz
            if gap and cam is not cameras[0] and gap[0] <= t < gap[1]:
                continue
            image = list(drive.rigs[int(t // scene_seconds)].cameras.values())[cameras.index(cam)].image
            stamp = T0 + round(t * 1e9)
            drive.frames[cam.name].append((stamp, image))
            messages.append((stamp + LATENCY_NS, cam, image_message(store, cam, image, stamp)))
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    with Writer(drive.path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for cam in cameras:
            msgtype = "sensor_msgs/msg/CompressedImage" if cam.encoding in ("png", "jpeg") else "sensor_msgs/msg/Image"
            conns[cam.name] = (writer.add_connection(cam.topic, msgtype, typestore=store), msgtype)
        for log_ns, cam, msg in sorted(messages, key=lambda m: m[0]):
            conn, msgtype = conns[cam.name]
            writer.write(conn, log_ns, store.serialize_cdr(msg, msgtype))
    return drive


def main(argv=None) -> int:
    from runtime.cli_args import at_boundary
    from runtime.errors import expect

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the new bag's directory (must not exist)")
    ap.add_argument("--seconds", type=float, default=6.0, help="the drive's length")
    ap.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    args = ap.parse_args(argv)

    def run():
        expect(not args.out.exists(), f"--out {str(args.out)!r}: exists; expected a new directory")
        expect(args.seconds > 0, f"--seconds {args.seconds}: expected > 0")
        drive = write_drive(args.out, args.seconds, storage=args.storage)
        counts = ", ".join(f"{c.name} {len(drive.frames[c.name])} frames on {c.topic}" for c in CAMERAS)
        print(f"wrote {args.out}: {counts}")

    status, _ = at_boundary(run, ap)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
