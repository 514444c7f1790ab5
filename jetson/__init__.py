"""On the Jetson: the engines' build script's companions and latency profiling (`profile`: trtexec
per engine and shape, tegrastats power, the runtime's own answers, a report), the answer's engine runs
from a manifest (`plan`), trtexec and tegrastats helpers, device facts (`device`)."""
