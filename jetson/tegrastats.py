"""tegrastats (Jetson has no NVML): the command that logs while an engine runs, and the parser.

Line shape, JetPack 6 (L4T r36):
  11-21-2026 10:00:00 RAM 20642/62817MB (lfb 1x2MB) CPU [23%@2201,...] EMC_FREQ 3%@3199
  GR3D_FREQ 12%@1300 cpu@52.9C gpu@47.6C VDD_GPU_SOC 5139mW/5139mW VDD_CPU_CV 3268mW/3268mW
  VIN_SYS_5V0 5500mW/5500mW
JetPack 7 prints the GPU as `GR3D_FREQ 12%@[1300,1300]`. Rail names differ by module; power is
current/average mW. Logging: `tegrastats --interval MS --logfile F`, run in the background by the
profiler (which terminates it), and `tegrastats --stop` for an instance that daemonised itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%@(?:\[([\d,]+)\]|(\d+))")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%@(\d+)")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)mW/(\d+)mW")


def start_command(logfile, interval_ms: int = 100) -> list[str]:
    return ["tegrastats", "--interval", str(interval_ms), "--logfile", str(logfile)]


def stop_command() -> list[str]:
    return ["tegrastats", "--stop"]


@dataclass
class Sample:
    ram_mb: int | None = None
    gpu_load: float | None = None  # percent
    gpu_mhz: float | None = None
    emc_load: float | None = None
    emc_mhz: float | None = None
    rails_mw: dict[str, float] = field(default_factory=dict)  # instantaneous power per rail


def parse_line(line: str) -> Sample | None:
    """One tegrastats line, or None for a line that is not one (comments, blanks)."""
    ram, gpu = _RAM.search(line), _GPU.search(line)
    if not ram and not gpu:
        return None
    s = Sample()
    if ram:
        s.ram_mb = int(ram.group(1))
    if gpu:
        freqs = [int(f) for f in (gpu.group(2) or gpu.group(3)).split(",")]
        s.gpu_load, s.gpu_mhz = float(gpu.group(1)), float(np.mean(freqs))
    emc = _EMC.search(line)
    if emc:
        s.emc_load, s.emc_mhz = float(emc.group(1)), float(emc.group(2))
    s.rails_mw = {name: float(now) for name, now, _avg in _RAIL.findall(line)}
    return s


def summarize(text: str) -> dict:
    """Means over the samples of a log (GPU load and frequency, EMC, every rail), peak RAM."""
    samples = [s for s in map(parse_line, text.splitlines()) if s is not None]
    if not samples:
        return {"samples": 0}

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    rails = sorted({r for s in samples for r in s.rails_mw})
    return {
        "samples": len(samples),
        "gpu_load_percent": mean(s.gpu_load for s in samples),
        "gpu_mhz": mean(s.gpu_mhz for s in samples),
        "emc_load_percent": mean(s.emc_load for s in samples),
        "emc_mhz": mean(s.emc_mhz for s in samples),
        "ram_peak_mb": max((s.ram_mb for s in samples if s.ram_mb is not None), default=None),
        "rails_mw": {r: mean(s.rails_mw.get(r) for s in samples) for r in rails},
    }
