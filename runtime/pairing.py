"""Which frames answer which question time during a replay (docs/replay.md).

Question times come from the lead camera (the first one named): each of its frames, or one time
every `every_s` seconds from its first frame. Each question time is paired with the nearest frame
of every camera by capture stamp, within `tolerance_s`; a time where a camera has no frame that
close is skipped with the reason, never filled with a farther frame. Pairing streams: a time is
settled once every camera has a frame stamped after time + tolerance (a camera's stamps rise
through a recording), or its stream ended, or some camera is already `max_wait_s` past that (a
camera gone silent does not hold the replay back), and frames older than the next time's window
are let go, so a long drive holds a few frames per camera, not the drive. Frames that arrive out of
stamp order are placed by their stamps.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from runtime.errors import expect


@dataclass(frozen=True)
class Pairing:
    """every_s None: a question at each lead-camera frame. tolerance_s: the farthest a paired frame
    may be from the question time."""

    every_s: float | None = None
    tolerance_s: float = 0.1
    max_wait_s: float = 1.0  # how far past a time the other cameras may run before a silent one counts as missing

    def validate(self) -> "Pairing":
        expect(self.every_s is None or 0 < self.every_s < math.inf,
               f"every: {self.every_s} s; expected a finite period > 0 seconds")
        expect(0 <= self.tolerance_s < math.inf, f"tolerance: {self.tolerance_s} s; expected finite seconds >= 0")
        expect(0 <= self.max_wait_s < math.inf, f"max_wait: {self.max_wait_s} s; expected finite seconds >= 0")
        return self


@dataclass
class Paired:
    """One question time and, per camera, its frame; skipped: why not (a camera without a close frame)."""

    time_ns: int
    frames: dict = field(default_factory=dict)  # camera -> runtime.recording.Frame
    missing: dict = field(default_factory=dict)  # camera -> why it has no frame for this time

    @property
    def skipped(self) -> str | None:
        return "; ".join(f"{c}: {why}" for c, why in self.missing.items()) or None


class FramePairer:
    """Feed frames in recording order (add), take settled question times (settled), then finish()."""

    def __init__(self, cameras: list[str], pairing: Pairing):
        assert cameras, "at least one camera"
        self.cameras, self.lead = list(cameras), cameras[0]
        self.every_ns = None if pairing.every_s is None else round(pairing.every_s * 1e9)
        self.tol_ns = round(pairing.tolerance_s * 1e9)
        self.wait_ns = round(pairing.max_wait_s * 1e9)
        self.buffers: dict[str, list] = {c: [] for c in self.cameras}  # by stamp
        self.latest: dict[str, int | None] = {c: None for c in self.cameras}
        self.times: list[int] = []  # pending question times, ascending
        self.next_ns: int | None = None  # the next periodic time
        self.ended = False

    def add(self, frame) -> None:
        if frame.camera not in self.buffers:
            return
        bisect.insort(self.buffers[frame.camera], frame, key=lambda f: f.stamp_ns)
        latest = self.latest[frame.camera]
        self.latest[frame.camera] = frame.stamp_ns if latest is None else max(latest, frame.stamp_ns)
        if frame.camera == self.lead:
            self._schedule(frame.stamp_ns)

    def _schedule(self, stamp_ns: int) -> None:
        if self.every_ns is None:
            bisect.insort(self.times, stamp_ns)
            return
        if self.next_ns is None:
            self.next_ns = stamp_ns
        while self.next_ns <= stamp_ns:
            self.times.append(self.next_ns)
            self.next_ns += self.every_ns

    def finish(self) -> None:
        """The recording (or the selected stretch) ended: every pending time settles."""
        self.ended = True

    def settled(self):
        """Yield each pending question time that no later frame can change, paired or skipped."""
        while self.times and self._is_settled(self.times[0]):
            yield self._pair(self.times.pop(0))
        self._forget_before(self._horizon())

    def _horizon(self) -> int | None:
        """The earliest stamp a question time still to come can pair with: the next time's window, and
        never further back than max_wait behind the newest frame (a time that old settles at once)."""
        seen = [s for s in self.latest.values() if s is not None]
        if not seen:
            return None
        floor = max(seen) - self.tol_ns - self.wait_ns
        if self.times:
            return max(self.times[0] - self.tol_ns, floor)
        if self.next_ns is not None:
            return max(self.next_ns - self.tol_ns, floor)
        lead = self.latest[self.lead]  # every frame: later times are later lead frames
        return floor if lead is None else max(lead - self.tol_ns, floor)

    def _is_settled(self, t: int) -> bool:
        seen = [s for s in self.latest.values() if s is not None]
        return (self.ended or all(s is not None and s > t + self.tol_ns for s in self.latest.values())
                or max(seen) > t + self.tol_ns + self.wait_ns)

    def _pair(self, t: int) -> Paired:
        out = Paired(t)
        for c in self.cameras:
            best = min(self.buffers[c], key=lambda f: (abs(f.stamp_ns - t), f.stamp_ns), default=None)
            if best is None or abs(best.stamp_ns - t) > self.tol_ns:
                gap = "no frame" if best is None else f"nearest frame {abs(best.stamp_ns - t) / 1e9:.3f} s away"
                out.missing[c] = f"{gap} (tolerance {self.tol_ns / 1e9:g} s)"
            else:
                out.frames[c] = best
        if out.missing:
            out.frames = {}
        return out

    def _forget_before(self, t: int | None) -> None:
        """Let go of frames before t except the last one (the nearest from below, for the skip reason)."""
        if t is None:
            return
        for buf in self.buffers.values():
            drop = bisect.bisect_left(buf, t, key=lambda f: f.stamp_ns) - 1  # keep the last frame before t
            if drop > 0:
                del buf[:drop]
