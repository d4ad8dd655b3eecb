"""Run by tests/test_fastreid_client.py with a Python that has fast-reid's own package (PyPI ``fastreid``).

It uses only fast-reid's code (and torch/numpy), never reid-export's. ``python fastreid_side.py JOBS.json``
runs the jobs listed there (``[[command, arg, ...], ...]``, one interpreter start for all) and prints a
JSON list of their answers; the commands:

    merge CONFIG             -> {"ok": true, "dump": "..."} or {"ok": false, "error": "..."}
    features CONFIG CKPT INPUTS.npy OUT.npy
        -> get_cfg().merge_from_file(CONFIG); build_model; Checkpointer(model).load(CKPT); eval-mode
           features of the float32 NCHW 0..255 RGB pixels in INPUTS.npy written to OUT.npy;
           {"missing": [...], "unexpected": [...], "extra": [checkpoint keys the Checkpointer left over]}
    resume CONFIG CKPT
        -> fast-reid's own optimizer and schedulers (as its DefaultTrainer builds them) given to its
           Checkpointer, which then loads CKPT: {"ok": true} or {"ok": false, "error": "..."}
"""

import json
import logging
import sys

import numpy as np
import torch


def _cfg(path):
    from fastreid.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(path)
    return cfg


def merge(path):
    try:
        cfg = _cfg(path)
    except Exception as exc:  # noqa: BLE001 - the error is the answer
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "dump": cfg.dump()}


def features(config, ckpt, inputs, out):
    from fastreid.modeling import build_model
    from fastreid.utils.checkpoint import Checkpointer

    cfg = _cfg(config)
    model = build_model(cfg)
    extra = Checkpointer(model).load(ckpt)  # what it did not consume comes back
    stored = torch.load(ckpt, map_location="cpu")["model"]
    own = model.state_dict()
    model.eval()
    with torch.no_grad():
        feats = model(torch.from_numpy(np.load(inputs)).clone())  # fast-reid normalises in place
    np.save(out, feats.numpy())
    return {"missing": sorted(set(own) - set(stored)), "unexpected": sorted(set(stored) - set(own)),
            "extra": sorted(extra)}


def resume(config, ckpt):
    from fastreid.modeling import build_model
    from fastreid.solver import build_lr_scheduler, build_optimizer
    from fastreid.utils.checkpoint import Checkpointer

    cfg = _cfg(config)
    model = build_model(cfg)
    optimizer, param_wrapper = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer, 10)  # {"lr_sched": ..., "warmup_sched": ...}
    del param_wrapper
    try:
        Checkpointer(model, optimizer=optimizer, **scheduler).load(ckpt)
    except Exception as exc:  # noqa: BLE001 - the error is the answer
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True}


def main(argv):
    logging.disable(logging.CRITICAL)
    torch.set_num_threads(1)
    commands = {"merge": merge, "features": features, "resume": resume}
    with open(argv[0], encoding="utf-8") as handle:
        jobs = json.load(handle)
    sys.stdout.write(json.dumps([commands[job[0]](*job[1:]) for job in jobs]))


if __name__ == "__main__":
    main(sys.argv[1:])
