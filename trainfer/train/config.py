"""TrainConfig: every knob of a training run, from a TOML file, a preset and `--set key=value` overrides.

    trainfer train --data data/shakespeare --preset tiny --set max_steps=500 --set model.dim=192

Model shape keys live under `model.` (the fields of ModelConfig); everything else is the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trainfer.errors import TrainferError
from trainfer.model.config import PRESETS, ModelConfig, _swiglu_hidden

# What a preset sets besides the model shape: a token budget and learning rate that suit the size.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"seq_len": 128, "batch_size": 16, "lr": 2e-3, "max_steps": 2000, "warmup_steps": 100},
    "small": {"seq_len": 256, "batch_size": 16, "lr": 1e-3, "max_steps": 5000, "warmup_steps": 200},
    "base": {"seq_len": 512, "batch_size": 16, "lr": 6e-4, "max_steps": 20000, "warmup_steps": 500},
}


@dataclass
class TrainConfig:
    data: str = ""  # a directory written by `trainfer prepare`
    out_dir: str = "runs/run"
    shapes_model: ClassVar[bool] = True  # model.* settings apply (a fine-tune's shape is its base's)
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides on top of the preset
    seq_len: int = 128
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    max_steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    dtype: str = "auto"  # auto | float32 | bfloat16 (autocast; auto = bf16 only where the hardware has it)
    compile: bool = False
    fsdp: bool = False  # shard parameters/optimizer over ranks (torch.distributed.fsdp.fully_shard)
    device: str = "auto"  # auto | cpu | cuda
    # MFU's denominator, FLOP/s per process (e.g. 989e12 for an H100's dense bf16). 0 = $TRAINFER_PEAK_FLOPS,
    # else the cached or measured matmul peak of this machine (trainfer.train.metrics.matmul_peak)
    peak_flops: float = 0.0
    seed: int = 0
    eval_every: int = 250
    eval_batches: int = 20
    sample_every: int = 0  # 0 = at each evaluation
    sample_tokens: int = 64
    sample_prompt: str = ""  # empty: start a new document
    # The memorization probe at each evaluation (on a copy of the model, in the inference engine): this many
    # training and held-out passages, 32-token prefix and continuation. 0 = off (it costs a copy of the weights).
    probe_passages: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2  # checkpoints kept besides the best-validation one
    early_stop_patience: int = 0  # evaluations without a new best before stopping; 0 = never
    early_stop_min_delta: float = 0.0  # a new best must beat the old by more than this (nats)
    progress: bool = True

    def __post_init__(self) -> None:
        checks = self.checks()
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise TrainferError(f"invalid value for {bad[0]}: {getattr(self, bad[0])!r}")
        for key, allowed in self.choices().items():
            if getattr(self, key) not in allowed:
                raise TrainferError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.preset not in PRESETS:
            raise TrainferError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")

    def checks(self) -> dict[str, bool]:
        return {
            "seq_len": self.seq_len > 1,
            "batch_size": self.batch_size > 0,
            "grad_accum": self.grad_accum > 0,
            "max_steps": self.max_steps > 0,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "eval_every": self.eval_every > 0,
            "eval_batches": self.eval_batches > 0,
            "ckpt_every": self.ckpt_every > 0,
            "keep_last": self.keep_last > 0,
            "log_every": self.log_every > 0,
            "seed": self.seed >= 0,
            "grad_clip": self.grad_clip >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "weight_decay": self.weight_decay >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "decay_fraction": 0 <= self.decay_fraction <= 1,
            "early_stop_patience": self.early_stop_patience >= 0,
            "early_stop_min_delta": self.early_stop_min_delta >= 0,
            "sample_tokens": self.sample_tokens >= 0,
            "sample_every": self.sample_every >= 0,
            "probe_passages": 0 <= self.probe_passages <= 256,
            "peak_flops": self.peak_flops >= 0,
        }

    def choices(self) -> dict[str, tuple[str, ...]]:
        return {
            "schedule": ("cosine", "wsd", "constant"),
            "dtype": ("auto", "float32", "bfloat16"),
            "device": ("auto", "cpu", "cuda"),
        }

    def model_config(self, vocab_size: int, bos: int | None, eos: int | None) -> ModelConfig:
        """The preset's shape with this run's overrides, sized to the data's vocabulary and sequence length."""
        base = PRESETS[self.preset]
        try:
            cfg = base.replace(
                **{"max_seq_len": max(base.max_seq_len, self.seq_len), **self.model},
                vocab_size=vocab_size,
                bos_token_id=bos,
                eos_token_id=eos,
            )
        except ValueError as e:
            raise TrainferError(f"invalid model shape: {e}") from None
        if self.model.get("dim") and "hidden_dim" not in self.model:
            cfg = cfg.replace(hidden_dim=_swiglu_hidden(cfg.dim))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_MODEL_INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len")
_MODEL_FLOATS = ("norm_eps", "rope_theta")


def _check_model_value(key: str, name: str, value: Any) -> Any:
    """Model shape values: positive whole numbers, positive floats, booleans, or a rope_scaling table."""
    if name in _MODEL_INTS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            raise TrainferError(f"{key} must be a positive whole number, got {value!r}")
        return int(value)
    if name in _MODEL_FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise TrainferError(f"{key} must be a positive number, got {value!r}")
        return float(value)
    if name == "rope_scaling":
        if not isinstance(value, dict):
            raise TrainferError(f'{key} must be a table, e.g. {{rope_type = "linear", factor = 2.0}}')
        return value
    if not isinstance(value, bool):
        raise TrainferError(f"{key} must be true or false, got {value!r}")
    return value


def _closest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"


def parse_value(text: str) -> Any:
    """TOML syntax for a value (`3e-4`, `true`, `"x"`); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    base: dict[str, Any] | None = None,
    cls: type[TrainConfig] | None = None,
    **values: Any,
) -> TrainConfig:
    """Preset's run defaults < base (a resumed run's config) < file < keyword values < `key=value` overrides.

    cls: TrainConfig (pretraining, with presets) or a subclass with its own defaults (FineTuneConfig).

    Unknown keys are errors that name the closest valid key.
    """
    settings = _gather_settings(path, overrides, base, values)
    cls = cls or TrainConfig
    run, model = _sort_keys(settings, cls)
    merged = _typed_run_settings(run, cls)
    if model and not cls.shapes_model:
        raise TrainferError("model.* settings shape a model trained from scratch; a fine-tune keeps its base's shape")
    return cls(**merged, model=model)


def _gather_settings(
    path: str | Path | None, overrides: list[str], base: dict[str, Any] | None, values: dict[str, Any]
) -> dict[str, Any]:
    """Every source flattened to dotted keys and layered, later wins, so that a file and `--set model.dim=...`
    can override one key of a nested table without restating the rest."""
    settings: dict[str, Any] = _flatten(base or {})
    if path is not None:
        try:
            settings.update(_flatten(tomllib.loads(Path(path).read_text())))
        except FileNotFoundError:
            raise TrainferError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise TrainferError(f"{path} is not valid TOML: {e}") from None
    settings.update({k: v for k, v in values.items() if v is not None})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise TrainferError(f"--set expects key=value, got {item!r}")
        settings[key.strip()] = parse_value(text.strip())
    return settings


def _sort_keys(settings: dict[str, Any], cls: type[TrainConfig]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings, model.* settings without the prefix): a typo is caught here, by name, rather than
    silently training with a default."""
    run_keys = [f.name for f in dataclasses.fields(cls) if f.name != "model"]
    # vocab size and special token ids come from the data's tokenizer; arch is what the model is
    fixed = ("vocab_size", "arch", "bos_token_id", "eos_token_id")
    model_keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in fixed]
    run: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for key, value in settings.items():
        if key.startswith("model."):
            name = key.removeprefix("model.")
            if name not in model_keys:
                valid = [f"model.{k}" for k in model_keys]
                raise TrainferError(f"unknown config key {key!r}{_closest(key, valid)}")
            model[name] = _check_model_value(key, name, value)
        elif key in run_keys:
            run[key] = value
        else:
            raise TrainferError(f"unknown config key {key!r}{_closest(key, run_keys)}")
    return run, model


def _typed_run_settings(run: dict[str, Any], cls: type[TrainConfig]) -> dict[str, Any]:
    """The preset's run defaults under the settings given, each checked against its field's type: TOML and
    `--set` cannot say which type a key wants, so a wrong one is named here instead of failing mid-run."""
    preset = run.get("preset", cls.preset)
    if preset not in RUN_PRESETS:
        raise TrainferError(f"unknown preset {preset!r}; choose one of {', '.join(RUN_PRESETS)}")
    presets = RUN_PRESETS[preset] if cls is TrainConfig else {}  # a fine-tune's shape is its base model's
    merged = {**presets, **run}  # a resumed run's base already holds every key
    for key, value in merged.items():
        merged[key] = _typed_value(key, value, getattr(cls, key, None))
    return merged


def _typed_value(key: str, value: Any, default: Any) -> Any:
    """value if it has the type of the field's default (a whole-number float becomes an int), else a clear error."""
    if isinstance(default, str) and not isinstance(value, str):
        raise TrainferError(f"{key} must be text, got {value!r}")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise TrainferError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainferError(f"{key} must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if not value.is_integer():
                raise TrainferError(f"{key} must be a whole number, got {value!r}")
            return int(value)
    return value
