"""Reading a training run directory: its complete checkpoints, their state, the best one. A run directory loads
anywhere a model name is taken (io/loader.resolve); writing one is train/checkpoint.py's job.

    RUN/checkpoints/step-00000500/  config.json, model.safetensors, tokenizer.json, trainer.pt, state.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from trainfer.errors import TrainferError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of interrupted writes are ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


STATE_KEYS = ("step", "cursor", "best_val", "bad_evals", "elapsed_s", "val_loss", "config")


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainferError(f"cannot read {ckpt}/state.json: {e}") from None
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise TrainferError(f"{ckpt}/state.json lacks {', '.join(missing)}: not a trainfer checkpoint")
    return state


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest validation loss, else the latest."""
    ckpts = list_checkpoints(run_dir)
    scored = [(read_state(c).get("val_loss"), c) for c in ckpts]
    scored = [(v, c) for v, c in scored if v is not None and v == v]  # v == v drops NaN
    if scored:
        return min(scored, key=lambda vc: vc[0])[1]
    return ckpts[-1] if ckpts else None
