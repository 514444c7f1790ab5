"""(project env) the fp32 bundle's calibration feeds as npz files, for the ModelOpt trial."""
import json, sys
from pathlib import Path
import numpy as np
from calib.data import load_calibration
m = json.load(open("/work/main/bundles/miniature-k15-p50-int8-fp32/manifest.json"))
key = m["subgraphs"]["decoder_pre"]["quantization"]["calibration"]["key"]
data = load_calibration(Path("/work/main/bundles/calibration") / key)
for name in ("decoder_pre", "decoder_post"):
    for i, f in enumerate(data.feeds(name)):
        np.savez(f"/tmp/mo/work/{name}_{i:03d}.npz", **f)
    print(name, len(data.feeds(name)), {k: (v.dtype, v.shape) for k, v in data.feeds(name)[0].items()})
