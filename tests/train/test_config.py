"""TrainConfig: layering of presets, files and overrides; unknown keys name the closest valid one."""

from __future__ import annotations

import pytest

from trainfer.errors import TrainferError
from trainfer.train.config import load_config
from trainfer.train.schedule import lr_at


def test_layers_preset_file_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "small"\nlr = 5e-4\nschedule = "wsd"\n[model]\ndim = 256\n')
    cfg = load_config(f, ["lr=1e-3", "grad_accum=4", "model.n_layers=3"], data="d")
    assert (cfg.preset, cfg.lr, cfg.schedule, cfg.grad_accum, cfg.data) == ("small", 1e-3, "wsd", 4, "d")
    assert cfg.seq_len == 256  # from the small preset's run defaults
    m = cfg.model_config(vocab_size=500, bos=0, eos=0)
    assert (m.dim, m.n_layers, m.vocab_size, m.n_heads) == (256, 3, 500, 8)
    assert m.hidden_dim == 704  # re-derived from the new width (SwiGLU 8/3, rounded to 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lrr=1"], "unknown config key 'lrr'; did you mean 'lr'"),
        (["model.n_layer=2"], "unknown config key 'model.n_layer'; did you mean 'model.n_layers'"),
        (["max_steps=abc"], "max_steps must be a number"),
        (["max_steps=2.5"], "max_steps must be a whole number"),
        (["schedule=linear"], "schedule must be one of cosine, wsd, constant"),
        (["compile=1"], "compile must be true or false"),
        (["preset=huge"], "unknown preset 'huge'"),
        (["lr"], "--set expects key=value"),
        (["batch_size=0"], "invalid value for batch_size"),
        (["seed=-1"], "invalid value for seed"),
        (["grad_clip=-1"], "invalid value for grad_clip"),
        (["sample_prompt=5"], "sample_prompt must be text"),
        (["model.dim=1.5"], "model.dim must be a positive whole number"),
        (["model.n_heads=0"], "model.n_heads must be a positive whole number"),
        (["model.qkv_bias=1"], "model.qkv_bias must be true or false"),
        (["model.eos_token_id=3"], "unknown config key 'model.eos_token_id'"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(TrainferError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_bad_file(tmp_path):
    with pytest.raises(TrainferError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("lr = = 1")
    with pytest.raises(TrainferError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_schedules():
    cos = load_config(None, ["lr=1.0", "min_lr_ratio=0.1", "warmup_steps=10", "max_steps=110"])
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(60, cos) == pytest.approx(0.55) and lr_at(110, cos) == pytest.approx(0.1)
    wsd = load_config(None, ["lr=1.0", "schedule=wsd", "warmup_steps=0", "max_steps=100", "decay_fraction=0.2"])
    assert lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.55) and lr_at(100, wsd) == pytest.approx(0.1)
