"""Run BoxMOT's own ReID runtime on crops: the client side of tests/test_boxmot.py.

Run with the BoxMOT venv's python (``.ci/boxmot-venv``), never in the main environment:

    python tests/boxmot_client.py OUT.npz CROP.png ... -- WEIGHTS ...
    python tests/boxmot_client.py --guard-check      # must fail: BoxMOT asked to install is refused

For each WEIGHTS (a .pt, an .onnx or an ``*_openvino_model`` folder / ``.xml``) it builds
``boxmot.reid.core.runtime.ReID`` (the runtime BoxMOT's trackers use: it picks the backend from the
suffix, the architecture and crop size from the sidecar / checkpoint / file name) and calls it on the
crops read with ``cv2.imread`` (BGR, as BoxMOT's trackers crop frames). OUT.npz gets the L2-normalised
features per model (``f0``, ``f1``, ...) and ``info`` (JSON: backend class, input shape, model name).

BoxMOT installs missing runtime packages with pip at run time; here its installer raises instead, and
PIP_NO_INDEX=1 is set, so a run that completes proves that no install was attempted.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    os.environ["PIP_NO_INDEX"] = "1"
    from boxmot.utils import checks

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"BoxMOT tried to pip-install {args!r}: the test environment must already satisfy it")

    checks.RequirementsChecker._run_install = refuse
    checks.RequirementsChecker._install_packages = refuse
    if argv[:1] == ["--guard-check"]:  # prove the guard: a requirement this venv lacks must be refused
        checks.RequirementsChecker().check_packages(("onnxruntime==0.0.1",))
        return 0

    import cv2
    import numpy as np
    import torch
    from boxmot.reid.core.runtime import ReID

    out, rest = argv[0], argv[1:]
    split = rest.index("--")
    crops_paths, weights = rest[:split], rest[split + 1:]
    crops = [cv2.imread(p) for p in crops_paths]
    if any(c is None for c in crops):
        raise SystemExit("unreadable crop")
    arrays, info = {}, []
    for i, w in enumerate(weights):
        reid = ReID(weights=w, device=torch.device("cpu"), half=False)
        entry = {"weights": w, "backend": type(reid.model).__name__, "input_shape": list(reid.model.input_shape),
                 "model_name": reid.model.model_name}
        try:
            arrays[f"f{i}"] = np.asarray(reid(crops), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - recorded: a model BoxMOT feeds the wrong size fails here
            if "tried to pip-install" in str(exc):
                raise
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        info.append(entry)
    import onnxruntime

    extra = {"onnxruntime": onnxruntime.__version__,
             "torchvision_imported": any(m.split(".")[0] == "torchvision" for m in sys.modules)}
    np.savez(out, info=json.dumps({"models": info, **extra}), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
