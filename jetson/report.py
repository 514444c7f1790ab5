"""The latency report: report.json (everything), report.md (for people), report.png (one chart)."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.files import atomic_directory, keep_everything


def markdown(r: dict) -> str:
    g, dev = r["generation"], r["device"]
    lines = [f"# Latency report: {r['bundle']} ({r['backend']})", ""]
    lines += [f"- device: {dev['model']}" + (f", L4T {dev['l4t']}" if dev.get("l4t") else "")
              + (f", TensorRT {dev['tensorrt']}" if dev.get("tensorrt") else ""),
              f"- clocks: {'locked (jetson_clocks)' if dev['clocks_locked'] else 'NOT locked: numbers vary with DVFS'}",
              f"- timing: {r['timing_source']}",
              f"- one answer: image {g['image'][0]}x{g['image'][1]} ({g['tiles']} tiles, {g['visual']} visual tokens), "
              f"{g['text']} text tokens, {g['response']} response tokens, {g['steps']} steps; K={r['k']}", ""]
    if r.get("engine_check"):
        lines += ["## Engines vs ONNX Runtime (the bundle's validation shapes and tolerance rule)", ""]
        lines += [f"- {name}: max |diff| {c['max_abs_diff']:.2e} <= {c['allowed']:.2e} allowed ({c['rule']})"
                  for name, c in r["engine_check"].items()] + [""]
    lines += ["## Engines at the shapes one answer runs", "",
              "| engine and shapes | median ms | p90 ms | p99 ms | avg power W | energy per call mJ |", "|---|---|---|---|---|---|"]
    for c in r["cases"]:
        t = c["compute_ms"]
        power = c.get("power_w")
        watts = "-" if power is None else f"{power:.1f}"
        energy = "-" if power is None else f"{power * t['median']:.1f}"  # W x ms = mJ
        lines.append(f"| {c['label']} | {t['median']:.3f} | {t['p90']:.3f} | {t['p99']:.3f} | {watts} | {energy} |")
    layers = [(c["label"], layer) for c in r["cases"] for layer in c.get("top_layers", [])[:3]]
    if layers:
        lines += ["", "Top layers by average time:", ""] + [
            f"- {label}: {layer['name']} {layer['average_ms']:.3f} ms ({layer['percent']:.1f}%)" for label, layer in layers]
    lines += ["", "## One answer per P: predicted from the engines, and measured through the runtime", "",
              "vision + decoder_pre(full) + decoder_post(reduced) + (S-1) x (decoder_pre + decoder_post)(reduced); "
              "with a dual cache the later steps are the cached-step cases (the response rows against the others' "
              "cached K/V)", "",
              "| P | seq after pruning | predicted ms | with dual cache ms | vs P=0 | FLOPs vs P=0 | measured ms | "
              "engines ms | outside ms | predicted / measured | measured with dual cache ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in r["answers"]:
        m = a.get("measured")
        cached = a.get("predicted_dual_cache_ms")
        measured_cached = (m or {}).get("dual_cache_total_ms")
        lines.append(f"| {a['p']:g} | {a['reduced_seq']} | {a['predicted_ms']:.1f} | "
                     + ("-" if cached is None else f"{cached:.1f}") + f" | {a['predicted_vs_p0']:.3f} | "
                     f"{a['flops_vs_p0']:.3f} | " + (f"{m['total_ms']:.1f} | {m['engines_ms']:.1f} | {m['outside_ms']:.1f} | "
                                                     f"{a['predicted_ms'] / m['total_ms']:.3f} |" if m else "- | - | - | - |")
                     + (" - |" if measured_cached is None else f" {measured_cached:.1f} |"))
    lines += ["", *r.get("notes", [])]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Predicted vs measured milliseconds per answer, per P (PIL, no plotting library)."""
    from PIL import Image, ImageDraw

    answers = r["answers"]
    width, height, margin = 160 + 140 * len(answers), 360, 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    top = max(max(a["predicted_ms"], (a.get("measured") or {}).get("total_ms", 0)) for a in answers) or 1
    scale = (height - 2 * margin - 20) / top
    for i, a in enumerate(answers):
        x = margin + 60 + i * 140
        for j, (value, color) in enumerate(((a["predicted_ms"], (70, 110, 200)),
                                            ((a.get("measured") or {}).get("total_ms"), (220, 120, 40)))):
            if value:
                d.rectangle([x + j * 45, height - margin - value * scale, x + j * 45 + 40, height - margin], fill=color)
                d.text((x + j * 45, height - margin - value * scale - 12), f"{value:.0f}", fill="black")
        d.text((x + 20, height - margin + 6), f"P={a['p']:g}", fill="black")
    d.text((margin, 8), f"ms per answer: predicted (blue) vs measured (orange), {r['backend']}", fill="black")
    img.save(path)


def write_report(out: Path, r: dict) -> None:
    """All three files at once: an earlier report is replaced only by a complete one; other files in
    `out` are kept (the profile owns report.json, report.md and report.png only)."""
    with atomic_directory(out, keep=keep_everything) as tmp:
        (tmp / "report.json").write_text(json.dumps(r, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(r))
        plot(r, tmp / "report.png")
