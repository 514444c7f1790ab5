"""On-target engine builds, trtexec latency profiling, clocks and power: a later issue."""
