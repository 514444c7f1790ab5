"""Replay a drive recording through a bundle: one answer per question time, with its latency.

    lladav-replay --bundle B --bag drive/ --camera front=/cam_front/image/compressed --prompt "Is there a pedestrian?"
    python -m runtime.replay --bundle B --bag drive/ --camera front=/f/image --camera left=/l/image \\
        --prompt "In the left camera, is there a pedestrian?" --every 0.5 --start 10 --end 40 --table

The bag is read with `rosbags` (runtime.recording); each question time (every frame of the first
camera, or --every SECONDS) is paired with the nearest frame of every camera within --tolerance
(runtime.pairing); times a camera has no frame that close are reported as skipped. One pipeline
answers them all (engines and sessions opened once). Every question time becomes one JSON line
(--out, default stdout): its stamp, the frames' stamps, the answer, the kept visual tokens and the
milliseconds per stage, the time outside the engines included. A summary follows on stderr
(--summary writes it as JSON). --answers-bag writes the answers as a std_msgs/msg/String topic
into a new bag beside the input, never into it. A damaged bag keeps the answers up to the damage;
Ctrl-C keeps what was answered. Details: docs/replay.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.cli_args import (add_backend_args, add_cache_args, add_generation_args, add_strategy_args, at_boundary,
                              cache_settings, generation_settings, prune_settings, quiet_on_broken_pipe)
from runtime.cli_args import parser as cli_parser
from runtime.errors import LladaVError, expect
from runtime.files import check_writable
from runtime.pairing import FramePairer, Paired, Pairing
from runtime.recording import UnreadableFrame

ANSWERS_TOPIC = "/lladav/answer"


@dataclass
class Question:
    """What every question time asks, and how."""

    prompt: str
    gen: object  # runtime.schedule.GenerationSettings
    prune: object  # runtime.pruning.PruneSettings
    cache: object  # runtime.caching.CacheSettings


@dataclass
class Prepared:
    """A question time's frames, decoded and prepared (on the worker thread), with their times."""

    request: object  # runtime.pipeline.Request
    decode_ms: float
    prepare_ms: float


def prepare(pipe, q: Question, paired: Paired) -> Prepared | UnreadableFrame:
    """Decode the paired frames and prepare the request: no engine, so it runs beside the engines."""
    start = time.perf_counter()
    try:
        images = [(name, frame.image()) for name, frame in paired.frames.items()]
    except UnreadableFrame as exc:
        return exc
    decoded = time.perf_counter()
    request = pipe.prepare(images[0][1] if len(images) == 1 else images, q.prompt, q.gen, q.prune)
    return Prepared(request, (decoded - start) * 1000, (time.perf_counter() - decoded) * 1000)


def answer_record(pipe, q: Question, paired: Paired, job, origin_ns: int, read_ms: float) -> dict:
    """Answer one paired question time from its prepare() job; its JSON line. read_ms: reading the
    bag for it; the wait is what of the worker's decoding and preparing the engines did not hide."""
    start = time.perf_counter()
    ready = job.result()
    if isinstance(ready, UnreadableFrame):
        return {**_when(paired, origin_ns), "skipped": f"unreadable frame: {ready}", "missing": []}
    wait_ms = (time.perf_counter() - start) * 1000
    result = pipe.answer(ready.request, q.gen, q.prune, None, q.cache)
    decoder = sum(s.pre_ms + s.post_ms for s in result.steps)
    runtime_other = result.total_ms - result.vision_ms - decoder
    ms = {"read": read_ms, "decode": ready.decode_ms, "prepare": ready.prepare_ms, "wait": wait_ms,
          "vision": result.vision_ms, "decoder": decoder, "runtime_other": runtime_other,
          "total": read_ms + wait_ms + result.total_ms}
    lead = next(iter(paired.frames.values()))
    return {**_when(paired, origin_ns), "recorded_ns": lead.log_ns,
            "frames": {name: {"stamp_ns": f.stamp_ns, "offset_ms": round((f.stamp_ns - paired.time_ns) / 1e6, 3)}
                       for name, f in paired.frames.items()},
            "answer": result.text, "kept_tokens": int(result.kept_visual.size),
            "visual_tokens": int(result.layout.n_visual),
            "ms": {k: round(v, 3) for k, v in ms.items()},
            "outside_engines_ms": round(read_ms + wait_ms + runtime_other, 3)}


def _when(paired: Paired, origin_ns: int) -> dict:
    return {"time_s": round((paired.time_ns - origin_ns) / 1e9, 6), "stamp_ns": paired.time_ns}


def settled_pairs(recording, cameras: dict[str, str], pairing: Pairing, start_ns=None, stop_ns=None):
    """Every question time of the stretch, paired or skipped, as the bag is read. A damaged bag
    settles what was read before the damage, then raises."""
    pairer = FramePairer(list(cameras), pairing.validate())
    try:
        for frame in recording.frames(cameras, start_ns, stop_ns):
            pairer.add(frame)
            yield from pairer.settled()
    except LladaVError:
        pairer.finish()
        yield from pairer.settled()
        raise
    pairer.finish()
    yield from pairer.settled()


def replay(pipe, recording, cameras: dict[str, str], q: Question, pairing: Pairing, start_ns=None, stop_ns=None):
    """Yield one record per question time, in order: an answer, or {"skipped": why}. While the engines
    answer one question time, a worker thread decodes and prepares the next one's frames."""
    pairs, origin, pending = settled_pairs(recording, cameras, pairing, start_ns, stop_ns), None, None

    def record(item) -> dict:
        paired, job, read_ms = item
        if job is None:
            return {**_when(paired, origin), "skipped": paired.skipped, "missing": list(paired.missing)}
        return answer_record(pipe, q, paired, job, origin, read_ms)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lladav-prepare") as worker:
        try:
            while True:
                clock = time.perf_counter()
                paired = next(pairs, None)
                if paired is None:
                    break
                read_ms = (time.perf_counter() - clock) * 1000
                origin = paired.time_ns if origin is None else origin
                job = None if paired.skipped else worker.submit(prepare, pipe, q, paired)
                if pending:
                    yield record(pending)
                pending = (paired, job, read_ms)
        except LladaVError:  # damaged here: the question time in hand is still answered, then the error
            if pending:
                yield record(pending)
            raise
        if pending:
            yield record(pending)


@dataclass
class Summary:
    """What a replay did, for the end of it."""

    answered: int = 0
    skipped: int = 0
    skipped_by_camera: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    total_ms: list = field(default_factory=list)
    outside_ms: list = field(default_factory=list)
    stopped: str | None = None  # interrupted, or the damage that ended it

    def add(self, record: dict) -> None:
        if "skipped" in record:
            self.skipped += 1
            self.skipped_by_camera.update(record["missing"] or ["unreadable frames"])
            return
        self.answered += 1
        self.answers[record["answer"]] += 1
        self.total_ms.append(record["ms"]["total"])
        self.outside_ms.append(record["outside_engines_ms"])

    def as_dict(self) -> dict:
        t = np.asarray(self.total_ms) if self.total_ms else None
        return {
            "answered": self.answered, "skipped": self.skipped, "skipped_by_camera": dict(self.skipped_by_camera),
            "answers": dict(self.answers.most_common()),
            "latency_ms": None if t is None else {"p50": round(float(np.percentile(t, 50)), 3),
                                                  "p90": round(float(np.percentile(t, 90)), 3),
                                                  "max": round(float(t.max()), 3)},
            "outside_engines_share": None if t is None else round(float(np.sum(self.outside_ms) / t.sum()), 4),
            "stopped": self.stopped,
        }

    def text(self) -> str:
        d = self.as_dict()
        lines = [f"replay: {d['answered']} answered, {d['skipped']} skipped"
                 + (f" ({', '.join(f'{c}: {n}' for c, n in d['skipped_by_camera'].items())} without a close frame)"
                    if d["skipped"] else "")]
        if d["latency_ms"]:
            lat = d["latency_ms"]
            lines.append(f"latency per answer: p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, max {lat['max']:.1f} ms; "
                         f"outside the engines {100 * d['outside_engines_share']:.1f}%")
            lines.append("answers: " + ", ".join(f"{a!r} x{n}" for a, n in list(d["answers"].items())[:10]))
        if d["stopped"]:
            lines.append("stopped early: " + (d["stopped"] if d["stopped"].startswith("interrupted") else "by the error "
                                              "below; the answers before it are kept"))
        return "\n".join(lines)


def table_row(record: dict, cameras: list[str]) -> str:
    """One fixed-width line of --table."""
    if "skipped" in record:
        return f"{record['time_s']:9.3f}  {'skipped':<10}  {record['skipped']}"
    offsets = " ".join(f"{record['frames'][c]['offset_ms']:+7.1f}" for c in cameras)
    return f"{record['time_s']:9.3f}  {offsets}  {record['ms']['total']:9.1f}  {record['answer']}"


def table_header(cameras: list[str]) -> str:
    return f"{'time_s':>9}  {' '.join(f'{c[:7]:>7}' for c in cameras)}  {'ms':>9}  answer"


# ------------------------------------------------------------------ the answers as a bag topic


def write_answers_bag(path: Path, answers: list[tuple[int, str]], topic: str) -> None:
    """A new rosbag2 (MCAP) holding the answers as std_msgs/msg/String, each at its lead frame's
    recording time (so a player shows it beside that frame); written under a temporary name, then
    renamed."""
    import shutil
    import tempfile

    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    String = store.types["std_msgs/msg/String"]
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent or "."))
    try:
        with Writer(work / path.name, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
            conn = writer.add_connection(topic, "std_msgs/msg/String", typestore=store)
            for log_ns, text in answers:
                writer.write(conn, log_ns, store.serialize_cdr(String(data=text), "std_msgs/msg/String"))
        os.replace(work / path.name, path)
    except Exception as exc:  # rosbags' WriterError, OSError: the answers are in the JSON lines still
        raise LladaVError(f"--answers-bag {str(path)!r}: not written ({type(exc).__name__}: {exc})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_answers_bag(path: Path, bag: Path) -> None:
    expect(not path.exists(), f"--answers-bag {str(path)!r}: exists; expected a new path (a replay never writes over "
                              "a bag)")
    expect(path.resolve() != bag.resolve() and bag.resolve() not in path.resolve().parents,
           f"--answers-bag {str(path)!r}: inside the input bag {str(bag)!r}; expected a path beside it")
    check_writable(path, "--answers-bag")  # its directory exists and takes a new entry


# ------------------------------------------------------------------ the command


def camera_topics(values: list[str]) -> dict[str, str]:
    """--camera NAME=TOPIC values -> {name: topic}, in order, each name once."""
    from runtime.cameras import named_images

    pairs = []
    for v in values:
        name, sep, topic = v.partition("=")
        expect(bool(sep) and name.strip() and topic.startswith("/"),
               f"--camera {v!r}: expected NAME=TOPIC with the topic's full name, e.g. front=/cam_front/image_raw")
        pairs.append((name.strip(), topic.strip()))
    cameras = dict(named_images(pairs))  # names checked as a request's camera names are
    topics = [t for _, t in pairs]
    twice = sorted({t for t in topics if topics.count(t) > 1})
    expect(not twice, f"--camera: topic(s) {twice} given for several cameras; expected one topic per camera")
    return cameras


def build_parser() -> argparse.ArgumentParser:
    ap = cli_parser(None if Path(sys.argv[0]).name == "lladav-replay" else "python -m runtime.replay", __doc__)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle directory from export/build_engines.py")
    ap.add_argument("--bag", type=Path, required=True, help="the recording: a rosbag2 directory, an .mcap or .db3 "
                                                            "file, or ROS 1 .bag files' directory")
    ap.add_argument("--camera", action="append", required=True, metavar="NAME=TOPIC",
                    help="a camera's image topic (sensor_msgs/msg/Image or CompressedImage); several: one each, the "
                         "first sets the question times")
    ap.add_argument("--prompt", required=True, help="the question asked at every question time")
    when = ap.add_mutually_exclusive_group()
    when.add_argument("--every", type=float, metavar="SECONDS", help="a question every SECONDS from the first camera's "
                                                                     "first frame")
    when.add_argument("--every-frame", action="store_true", help="a question at every frame of the first camera "
                                                                 "(the default)")
    ap.add_argument("--tolerance", type=float, default=0.1, metavar="SECONDS",
                    help="the farthest a camera's frame may be from the question time")
    ap.add_argument("--max-wait", type=float, default=Pairing.max_wait_s, metavar="SECONDS",
                    help="settle a question time once any camera is this far past it: a camera gone silent counts as "
                         "missing instead of holding the replay (and its memory) back")
    ap.add_argument("--start", type=float, default=0.0, metavar="SECONDS", help="skip the recording's first SECONDS")
    ap.add_argument("--end", type=float, metavar="SECONDS", help="stop SECONDS into the recording (default: its end)")
    ap.add_argument("--out", type=Path, help="write the JSON lines here (default: stdout, unless --table)")
    ap.add_argument("--table", action="store_true", help="print a table of answers on stdout")
    ap.add_argument("--summary", type=Path, help="also write the summary as JSON here")
    ap.add_argument("--answers-bag", type=Path, help="write the answers into a new bag here (MCAP), topic --answers-topic")
    ap.add_argument("--answers-topic", default=ANSWERS_TOPIC, help="the answers' topic (std_msgs/msg/String)")
    add_backend_args(ap)
    add_strategy_args(ap)
    add_generation_args(ap)
    add_cache_args(ap)
    ap.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return ap


class Progress:
    """One line on a terminal, rewritten per question time."""

    def __init__(self, stream, enabled: bool):
        self.stream, self.enabled, self.shown = stream, enabled and stream.isatty(), False

    def __call__(self, s: Summary, record: dict) -> None:
        if not self.enabled:
            return
        what = record.get("answer", "skipped")
        text = f"{s.answered} answered, {s.skipped} skipped; t={record['time_s']:.2f} s: {what}"[:100]
        print(f"\r{text:<100}", end="", file=self.stream, flush=True)
        self.shown = True

    def close(self) -> None:
        if self.shown:
            print(file=self.stream, flush=True)


def run(args: argparse.Namespace, summary: Summary) -> None:
    from runtime.pipeline import Pipeline
    from runtime.recording import Recording

    cameras = camera_topics(args.camera)
    pairing = Pairing(args.every, args.tolerance, args.max_wait).validate()
    expect(0 <= args.start < math.inf and (args.end is None or args.start < args.end < math.inf),
           f"--start {args.start} --end {args.end}: expected 0 <= start < end, finite seconds into the recording")
    if args.answers_bag:
        check_answers_bag(args.answers_bag, args.bag)
    for path, flag in ((args.out, "--out"), (args.summary, "--summary")):
        if path:
            check_writable(path, flag)
    gen, cache = generation_settings(args), cache_settings(args)
    with Recording(args.bag) as rec:
        rec.check_cameras(cameras)  # before minutes of loading engines
        rec.check_first_frames(cameras)
        if rec.salvaged and not args.quiet:
            print(f"warning: {str(args.bag)!r} has no MCAP index (a recording cut short?): reading it front to back, "
                  "up to where its data ends", file=sys.stderr)
        with Pipeline(args.bundle, args.backend, args.model, args.device, expect_k=args.k, verify=args.verify,
                      kv_cache=cache.enabled) as pipe:
            q = Question(args.prompt, gen, prune_settings(args, pipe.manifest), cache)
            pipe.check_request(list(cameras) if len(cameras) > 1 else None, q.prompt, gen, q.prune)
            start = rec.start_ns + round(args.start * 1e9)
            stop = None if args.end is None else rec.start_ns + round(args.end * 1e9)
            _replay_into_outputs(args, summary, replay(pipe, rec, cameras, q, pairing, start, stop), list(cameras))


def _replay_into_outputs(args: argparse.Namespace, summary: Summary, records, cameras: list[str]) -> None:
    """Stream the records to the JSON lines, the table and the progress line; on Ctrl-C or a damaged
    bag, stop there and keep everything so far (the JSON lines file goes under its name, the answers
    into --answers-bag)."""
    answers: list[tuple[int, str]] = []
    partial = args.out.with_name(args.out.name + ".partial") if args.out else None
    out, progress = None, Progress(sys.stderr, not args.quiet)
    try:
        out = open(partial, "w", encoding="utf-8") if partial else (None if args.table else sys.stdout)
        if args.table:
            print(table_header(cameras), flush=True)
        for record in records:
            summary.add(record)
            if "answer" in record:
                answers.append((record["recorded_ns"], record["answer"]))
            if out:
                out.write(json.dumps(record) + "\n")
                out.flush()
            if args.table:
                print(table_row(record, cameras), flush=True)
            progress(summary, record)
    except KeyboardInterrupt:
        summary.stopped = "interrupted (Ctrl-C)"
    except LladaVError as exc:
        summary.stopped = str(exc)
    finally:
        progress.close()
        if partial and out:
            out.close()
            os.replace(partial, args.out)
        if args.answers_bag:
            write_answers_bag(args.answers_bag, answers, args.answers_topic)


@quiet_on_broken_pipe
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    summary = Summary()
    status, _ = at_boundary(lambda: run(args, summary), ap)
    if status is None or summary.answered or summary.skipped or summary.stopped:
        print(summary.text(), file=sys.stderr)
        if args.summary:
            from runtime.files import write_json

            write_json(args.summary, summary.as_dict())
    if status is not None:
        return status
    if summary.stopped and summary.stopped.startswith("interrupted"):
        return 130
    if summary.stopped:
        print(f"error: {summary.stopped}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
