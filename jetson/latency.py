"""Profile a bundle at the shapes one answer really runs, and write a latency report.

    python jetson/latency.py --bundle B                       # on the Jetson: TensorRT, trtexec, tegrastats
    python jetson/latency.py --bundle B --backend onnxruntime # anywhere: ONNX Runtime on the CPU
    python jetson/latency.py --bundle B --dry-run             # print every command, run none

For an image size and a list of P: times each engine at its shapes (vision at the image's tile
count, decoder_pre on the full step-1 sequence, decoder_pre and decoder_post on each reduced
one), predicts one answer per P from those times, runs the runtime itself for the same image
and P, and writes report.md, report.json and report.png (default: B/profile-<backend>/).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


from jetson import device, tegrastats, trtexec
from jetson.plan import AnswerCases, Case, answer_cases, check_inside_profile, feeds, generation, unique_cases
from jetson.report import markdown, write_report
from runtime.bundle import Bundle, Manifest, resolve_dims
from runtime.cameras import rig_names
from runtime.cli_args import at_boundary, image_size, percent_list
from runtime.cli_args import parser as cli_parser
from runtime.errors import LladaVError, expect
from runtime.files import check_output_dir
from runtime.backends.trt import engine_path

BACKENDS = ("tensorrt", "onnxruntime")


@dataclass(frozen=True)
class LatencyRequest:
    bundle: Path
    backend: str = "tensorrt"
    image: tuple[int, int] | None = None  # default: the profile's opt image
    ps: tuple[float, ...] = (0, 50, 70)
    prompt: str = "Is the lane free?"
    steps: int | None = None  # default: the profile's opt response (G = S)
    out: Path | None = None
    dry_run: bool = False
    lock_clocks: bool = False
    build: bool = True
    iterations: int = 20  # onnxruntime: timed runs per case
    repeats: int = 3  # measured answers per P (the report takes their median)
    timing: trtexec.Timing = field(default_factory=trtexec.Timing)
    trtexec: str | None = None
    cameras: int = 1  # frames per request (runtime.cameras): a rig's answer


@dataclass
class Plan:
    bundle: Bundle
    generation: object
    answers: list[AnswerCases]
    cases: list[Case]
    engine_check: dict = field(default_factory=dict)  # TensorRT: subgraph -> worst check vs ONNX Runtime

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest


def make_plan(req: LatencyRequest) -> Plan:
    """Everything checked before any long run: the bundle, P, the shapes against the profiles."""
    bundle = Bundle(req.bundle)  # every file present and whole, the graphs' identities
    m = bundle.manifest
    for p in req.ps:
        expect(0 <= p < 100, f"--p: got {p:g}; expected percentages in [0, 100)")
    expect(req.steps is None or req.steps >= 1, f"--steps: got {req.steps}; expected an integer >= 1 (denoising steps)")
    expect(req.iterations >= 1, f"--iterations: got {req.iterations}; expected an integer >= 1 (timed runs per case)")
    most = m.profiles["axes"]["tiles"][2]
    expect(1 <= req.cameras <= most, f"--cameras: got {req.cameras}; expected 1..{most} (the bundle's vision engine "
                                     "takes that many views: rebuild it with --cameras)")
    expect(req.repeats >= 1, f"--repeats: got {req.repeats}; expected an integer >= 1 (measured answers per P)")
    settings = m.profiles["settings"]
    image = req.image or tuple(settings["opt_image"])
    prompt = bundle.tokenizer.encode_prompt(req.prompt, rig_names(req.cameras) if req.cameras > 1 else None)
    steps = req.steps if req.steps is not None else settings["opt_response"]
    g = generation(m, image, prompt.n_text, steps, steps, req.cameras)
    answers = [answer_cases(m, g, p) for p in req.ps]
    cases = unique_cases(answers)
    for case in cases:
        check_inside_profile(m, case)
    return Plan(bundle, g, answers, cases)


# ---------------------------------------------------------------- ONNX Runtime: times of the runners


def time_cases(runners: dict, a: AnswerCases, iterations: int, float_dtype, samples: dict[Case, list[float]]) -> None:
    """Host wall time of one answer's cases, run the way a generation runs them: decoder_pre and
    decoder_post alternate (later steps: pre(n'), post(n'); step 1: pre(n), post(n')), so neither
    finds its weights hot in cache from running itself back to back; vision alone; the duplicate rule's
    similarity run between step 1's halves."""
    inputs = {c: feeds(c, float_dtype) for c in a.cases}
    for c, f in inputs.items():
        runners[c.subgraph].infer(f, profile=c.profile)  # warm-up at this shape

    def timed(c: Case) -> None:
        runners[c.subgraph].infer(inputs[c], profile=c.profile)
        samples.setdefault(c, []).append(runners[c.subgraph].last_ms())

    for _ in range(iterations):
        timed(a.pre_later)
        timed(a.post)
    for _ in range(iterations):
        timed(a.pre_cached)
        timed(a.post_cached)
    for _ in range(max(3, iterations // 4)):
        for c in (a.vision, a.pre_step1, *([a.rule] if a.rule else []), a.post):  # the rule: step 1's similarity
            timed(c)


# ---------------------------------------------------------------- TensorRT: trtexec and tegrastats


def trtexec_path(req: LatencyRequest) -> str:
    path = req.trtexec or shutil.which("trtexec") or trtexec.TRTEXEC_ON_JETPACK
    if not req.dry_run:
        expect(Path(path).is_file() or shutil.which(path) is not None,
               f"trtexec: not found at {path} nor on PATH; JetPack puts it at {trtexec.TRTEXEC_ON_JETPACK} "
               "(or pass --trtexec)")
    return path


def case_stem(work: Path, plan: Plan, case: Case) -> Path:
    """The prefix of a case's trtexec and tegrastats files."""
    return work / f"case{plan.cases.index(case)}"


def tensorrt_commands(req: LatencyRequest, plan: Plan, work: Path,
                      power: bool = True) -> list[tuple[Case | None, str, list[str]]]:
    """(case, what, command) in order: the engine build if any engine is missing, then per case
    tegrastats start, the trtexec profile, tegrastats stop (tegrastats only with `power`: a Jetson)."""
    cmds = []
    engines = {n: engine_path(req.bundle, e) for n, e in plan.manifest.subgraphs.items()}
    missing = [n for n, path in engines.items() if not path.is_file()]
    if missing:
        expect(req.build, f"engines {missing} are missing in {req.bundle / 'engines'} and --no-build was given; "
                          f"build them with bash {req.bundle / 'jetson' / 'build_engines.sh'}")
        cmds.append((None, "build engines", ["bash", str(req.bundle / "jetson" / "build_engines.sh")]))
    exe = trtexec_path(req)
    for case in plan.cases:
        stem = case_stem(work, plan, case)
        profile = trtexec.profile_command(exe, engines[case.subgraph], case,
                                          trtexec.index_input_files(case, work / "inputs"),
                                          Path(f"{stem}.times.json"), Path(f"{stem}.profile.json"), req.timing)
        if power:
            cmds += [(case, "tegrastats", tegrastats.start_command(f"{stem}.tegrastats")), (case, "trtexec", profile),
                     (case, "tegrastats stop", tegrastats.stop_command())]
        else:
            cmds += [(case, "trtexec", profile), (case, "results", [])]
    return cmds


def time_tensorrt(req: LatencyRequest, plan: Plan, work: Path) -> dict[Case, dict]:
    from runtime.backends.trt import check_engines

    version = device.tensorrt_version()
    expect(version is not None, "backend tensorrt: the TensorRT Python package is not installed (JetPack installs it "
                                "with python3-libnvinfer); use --backend onnxruntime elsewhere")
    device.require_gpu()
    jetson = device.is_jetson()
    if not jetson:
        print("note: not a Jetson (no Jetson in /proc/device-tree/model): trtexec profiling works on any NVIDIA GPU; "
              "no tegrastats, so no power figures", file=sys.stderr)
    commands = tensorrt_commands(req, plan, work, power=jetson)
    if not any(what == "build engines" for _, what, _ in commands):
        check_engines(req.bundle, plan.manifest, version)  # stale or foreign engines: refused before any run
    out: dict[Case, dict] = {}
    checked = False
    logger = None
    try:
        for case, what, cmd in commands:
            if what == "tegrastats":  # in the background while trtexec runs; we own the process
                logger = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                continue
            if what in ("tegrastats stop", "results"):
                stop_logger(logger, cmd)
                logger = None
                out[case] = collect(case_stem(work, plan, case))
                continue
            if what == "trtexec":
                if not checked:  # engines agree with ONNX Runtime before any of them is timed
                    plan.engine_check, checked = check_against_onnxruntime(plan.bundle), True
                trtexec.write_index_inputs(case, work / "inputs")
            run(cmd, what)
            if what == "build engines":
                check_engines(plan.bundle.root, plan.manifest, version)
    finally:
        stop_logger(logger, tegrastats.stop_command())
    return out


def validation_feeds(manifest: Manifest, name: str) -> list[list[dict]]:
    """Random feeds for subgraph `name` at each of the bundle's validation shapes, per optimization
    profile of its engine (inside that profile)."""
    from runtime.checks import random_feeds
    float_dtype, dims, entry = manifest.float_dtype, manifest.model_dims(), manifest.subgraphs[name]
    out = []
    for profile_axes in manifest.profiles["validation_axes"][: len(entry.shapes)]:
        out.append([])
        for i, axes in enumerate(profile_axes):
            sizes = {**dims, **axes}
            tensors = [(t.name, str(float_dtype) if t.dtype == "float" else t.dtype,
                        resolve_dims(t.dims, sizes)) for t in entry.inputs]
            out[-1].append(random_feeds(tensors, seed=100 + i))
    return out


def check_against_onnxruntime(bundle: Bundle) -> dict[str, dict]:
    """Every engine vs ONNX Runtime with Polygraphy at the bundle's validation shapes, by the
    bundle's own tolerance rule (manifest tolerances per output)."""
    from runtime.checks import compare_engine, worst_check

    out, manifest = {}, bundle.manifest
    for name, entry in manifest.subgraphs.items():
        expect(bool(entry.tolerances), f"bundle {str(bundle.root)!r}: no tolerances recorded for {name}; rebuild the bundle")
        report = compare_engine(engine_path(bundle.root, entry), bundle.graph(name), validation_feeds(manifest, name),
                                {o: tuple(v) for o, v in entry.tolerances.items()}, name)
        out[name] = worst_check(report)
    return out


def stop_logger(logger, stop_cmd: list[str]) -> None:
    """Terminate the tegrastats we started, and ask any daemonised instance to stop (best effort)."""
    if logger is None:
        return
    logger.terminate()
    try:
        logger.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.kill()
    subprocess.run(stop_cmd, capture_output=True)


def collect(stem: Path) -> dict:
    """One case's trtexec times and layer profile, and tegrastats where it ran."""
    result = trtexec.parse_times(Path(f"{stem}.times.json").read_text())
    result["top_layers"] = trtexec.parse_profile(Path(f"{stem}.profile.json").read_text())["layers"]
    power = tegrastats.summarize(Path(f"{stem}.tegrastats").read_text()) if Path(f"{stem}.tegrastats").is_file() else {}
    result["tegrastats"] = power
    rails = power.get("rails_mw") or {}
    result["power_w"] = (max(rails.values()) / 1000) if rails else None  # the largest rail: the module's input
    return result


def run(cmd: list[str], what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise LladaVError(f"{what}: could not run {cmd[0]} ({exc})") from None
    if done.returncode != 0:
        raise LladaVError(f"{what} failed ({shlex.join(cmd)}):\n{done.stderr.strip()[-2000:]}")


# ---------------------------------------------------------------- the runtime itself


def measure(req: LatencyRequest, plan: Plan, time_engines: bool) -> tuple[dict[Case, dict], dict[float, dict]]:
    """Per P, with one set of sessions (the runtime's own runners): its engines timed at their shapes
    (`time_engines`: ONNX Runtime; TensorRT's come from trtexec), then answers through the runtime on
    the demo scene at the image size, exactly S steps (no stop at <|eot_id|>), a warm-up answer first
    (a backend's first run at new shapes pays one-off costs) and the median of `repeats`. Engine
    times and answers are taken back to back, under the same conditions."""
    from runtime.demo import demo_image
    from runtime.pipeline import Pipeline
    from runtime.pruning import PruneSettings
    from runtime.schedule import GenerationSettings

    g = plan.generation
    gen = GenerationSettings(g.steps, g.response, g.response, stop_at_eot=False)
    image = demo_image(*g.image) if g.cameras == 1 else {name: demo_image(*g.image) for name in rig_names(g.cameras)}
    samples: dict[Case, list[float]] = {}
    measured = {}
    with Pipeline(plan.bundle, backend=req.backend) as pipe:
        for a in plan.answers:
            if time_engines:
                time_cases(pipe.runners, a, req.iterations, pipe.float_dtype, samples)
            prune = PruneSettings(plan.manifest.k, a.p, rule=plan.manifest.rule)
            pipe.generate(image, req.prompt, gen, prune)  # warm-up
            runs = [pipe.generate(image, req.prompt, gen, prune) for _ in range(req.repeats)]
            totals = [r.total_ms for r in runs]
            engines = [r.vision_ms + sum(s.pre_ms + s.post_ms for s in r.steps) for r in runs]
            measured[a.p] = {"total_ms": float(np.median(totals)), "engines_ms": float(np.median(engines)),
                             "outside_ms": float(np.median([t - e for t, e in zip(totals, engines)])),
                             "total_ms_runs": totals, "steps": len(runs[0].steps), "seq_len": runs[0].steps[-1].seq_len,
                             **measure_dual_cache(pipe, image, req, gen, prune)}
    return {c: {"compute_ms": trtexec.stats(ms)} for c, ms in samples.items()}, measured


def measure_dual_cache(pipe, image, req: LatencyRequest, gen, prune) -> dict:
    """The same answer with a dual cache (one block: step 1 refreshes, every later step is cached), a
    warm-up first (the cached-step profile's first run), the median of `repeats`."""
    from runtime.caching import CacheSettings

    cache = CacheSettings("dual")
    pipe.generate(image, req.prompt, gen, prune, cache=cache)
    totals = [pipe.generate(image, req.prompt, gen, prune, cache=cache).total_ms for _ in range(req.repeats)]
    return {"dual_cache_total_ms": float(np.median(totals)), "dual_cache_total_ms_runs": totals}


# ---------------------------------------------------------------- the report


def assemble(req: LatencyRequest, plan: Plan, times: dict[Case, dict], measured: dict[float, dict] | None,
             dev: dict) -> dict:
    from bench.flops import Workload, remaining

    m, g = plan.manifest, plan.generation
    d = m.model["decoder"]
    work = Workload(d=d["d_model"], m=d["d_mlp"], layers=d["layers"], vocab=d["vocab"], text=g.text, visual=g.visual,
                    gen=g.response, steps=g.steps)
    median = {c: t["compute_ms"]["median"] for c, t in times.items()}
    base = plan.answers[0].predicted_ms(median, g.steps) if plan.answers[0].p == 0 else None
    answers = []
    for a in plan.answers:
        predicted = a.predicted_ms(median, g.steps)
        answers.append({"p": a.p, "reduced_seq": g.reduced(a.p), "predicted_ms": predicted,
                        "predicted_dual_cache_ms": a.predicted_cached_ms(median, g.steps),
                        "predicted_vs_p0": predicted / base if base else float("nan"),
                        "flops_vs_p0": remaining(work, m.k, a.p), "measured": (measured or {}).get(a.p)})
    source = ("trtexec GPU compute time (CUDA graph, no host transfers), tegrastats power"
              if req.backend == "tensorrt" else
              "ONNX Runtime on this machine's CPU, host wall-clock time per run (no trtexec, no tegrastats: "
              "no GPU time, no power)")
    return {"bundle": str(req.bundle), "backend": req.backend, "k": m.k, "device": dev, "timing_source": source,
            "generation": {"image": list(g.image), "cameras": g.cameras, "tiles": g.tiles, "visual": g.visual, "text": g.text,
                           "response": g.response, "steps": g.steps},
            "cases": [{"label": c.label, "subgraph": c.subgraph, "shapes": {n: list(s) for n, s in c.shapes}, **times[c]}
                      for c in plan.cases],
            "answers": answers,
            "engine_check": plan.engine_check,
            "notes": ["FLOPs vs P=0: bench.flops for this shape (docs/flops.md); predicted: the median engine times."]}


# ---------------------------------------------------------------- entry point


def latency_report(req: LatencyRequest) -> dict | None:
    plan = make_plan(req)
    if req.dry_run:
        print_plan(req, plan)
        return None
    out = check_output_dir(req.out or req.bundle / f"profile-{req.backend}", "--out")  # before the timing runs
    with tempfile.TemporaryDirectory(prefix="lladav-profile-") as tmp:
        work = Path(tmp)
        if req.backend == "onnxruntime":
            times, measured = measure(req, plan, time_engines=True)
            dev = device.identity(clocks_locked=False)
        elif req.lock_clocks:
            with device.locked_clocks(work / "clocks.conf", lambda cmd: run(cmd, "jetson_clocks")):
                times, (_, measured) = time_tensorrt(req, plan, work), measure(req, plan, time_engines=False)
                dev = device.identity(clocks_locked=True)
        else:
            times, (_, measured) = time_tensorrt(req, plan, work), measure(req, plan, time_engines=False)
            dev = device.identity(clocks_locked=False)
    report = assemble(req, plan, times, measured, dev)
    try:
        write_report(out, report)
    except OSError as exc:  # the timing runs are not lost: the report goes elsewhere, and the error says where
        raise LladaVError(f"--out {str(out)!r}: the report could not be written there ({exc}); {keep_report(report)}") from None
    print(f"report written to {out}/report.md")
    return report


def keep_report(report: dict) -> str:
    """Where a report that could not go to --out went: a temporary directory, or this message itself."""
    kept = Path(tempfile.mkdtemp(prefix="lladav-profile-report-"))
    try:
        write_report(kept, report)
        return f"it is in {kept}"
    except OSError:
        shutil.rmtree(kept, ignore_errors=True)
        return "nor in a temporary directory; here it is:\n" + markdown(report)


def print_plan(req: LatencyRequest, plan: Plan) -> None:
    g = plan.generation
    rig = f"{g.cameras} cameras of " if g.cameras > 1 else ""
    print(f"# {req.bundle}: {rig}{g.image[0]}x{g.image[1]} ({g.tiles} tiles, {g.visual} visual), {g.text} text, "
          f"{g.response} response, {g.steps} steps, P {', '.join(f'{p:g}' for p in req.ps)}")
    work = Path("$WORK")
    lines = []
    if req.lock_clocks:
        store, lock, _restore = device.clock_commands(work / "clocks.conf")
        lines += [store, lock]
    if req.backend == "tensorrt":
        commands = tensorrt_commands(req, plan, work)
        first_run = next(i for i, (_, what, _) in enumerate(commands) if what != "build engines")
        lines += [cmd for _, _, cmd in commands[:first_run]]
        lines += [["# check", f"{name}.engine", "vs ONNX Runtime (Polygraphy) at the bundle's validation shapes"]
                  for name in plan.manifest.subgraphs]
        lines += [cmd + (["&"] if what == "tegrastats" else []) for _, what, cmd in commands[first_run:]]
    else:
        lines += [["# onnxruntime", case.label] for case in plan.cases]
    for p in req.ps:
        lines.append(["python", "-m", "runtime", "--bundle", str(req.bundle), "--backend", req.backend, "--p", f"{p:g}",
                      "--steps", str(g.steps), "--gen-length", str(g.response), "--block-length", str(g.response),
                      "--no-stop-at-eot", "--prompt", req.prompt, "--trace", "--json"]
                     + [a for name in rig_names(g.cameras) if g.cameras > 1 for a in ("--image", f"{name}={name}.png")])
    if req.lock_clocks:
        lines.append(device.clock_commands(work / "clocks.conf")[2])
    for cmd in lines:
        background = cmd[-1:] == ["&"]
        text = " ".join(cmd) if cmd[0].startswith("#") else shlex.join(cmd[:-1] if background else cmd)
        print(text + (" &" if background else ""))


def build_parser() -> argparse.ArgumentParser:
    ap = cli_parser(None, __doc__)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle directory from export/build_engines.py")
    ap.add_argument("--backend", choices=BACKENDS, default="tensorrt",
                    help="tensorrt: trtexec, tegrastats and the TensorRT runtime (a GPU with TensorRT); onnxruntime: "
                         "the same report from ONNX Runtime on this machine's CPU")
    ap.add_argument("--image-size", type=image_size, metavar="WIDTHxHEIGHT",
                    help="camera frame size in pixels (default: the bundle's profile opt image)")
    ap.add_argument("--cameras", type=int, default=1, help="frames per request (a camera rig: each frame one padded "
                                                           "view, docs/cameras.md; the bundle's --cameras at least)")
    ap.add_argument("--p", type=percent_list, default="0,50,70", help="P values to profile, percent, comma-separated")
    ap.add_argument("--prompt", default="Is the lane free?", help="the question (its token count sets the text length)")
    ap.add_argument("--steps", type=int, help="denoising steps = response tokens (default: the profile's opt response)")
    ap.add_argument("--out", type=Path, help="report directory (default: <bundle>/profile-<backend>)")
    ap.add_argument("--dry-run", action="store_true", help="print every command (clocks, builds, trtexec, tegrastats, "
                                                           "runtime) and run none")
    ap.add_argument("--lock-clocks", action="store_true",
                    help="jetson_clocks --store, pin clocks for the run, restore them at exit (needs sudo)")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building missing engines")
    ap.add_argument("--iterations", type=int, default=20, help="timed runs per engine and shape (trtexec: at least)")
    ap.add_argument("--repeats", type=int, default=3, help="measured answers per P through the runtime (median)")
    ap.add_argument("--duration", type=float, default=3.0, help="trtexec: seconds of timed runs per engine and shape")
    ap.add_argument("--warmup", type=int, default=200, help="trtexec: warm-up milliseconds per engine and shape")
    ap.add_argument("--trtexec", help=f"trtexec binary (default: on PATH, else {trtexec.TRTEXEC_ON_JETPACK})")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    timing = trtexec.Timing(args.warmup, args.duration, args.iterations)
    req = LatencyRequest(args.bundle, args.backend, args.image_size, args.p, args.prompt, args.steps, args.out,
                         args.dry_run, args.lock_clocks, not args.no_build, args.iterations, args.repeats, timing,
                         args.trtexec, args.cameras)
    status, _ = at_boundary(lambda: latency_report(req), ap, "interrupted; no report was written (an earlier one is intact)")
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
