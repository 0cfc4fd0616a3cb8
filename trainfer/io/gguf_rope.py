"""Llama-3 RoPE scaling in GGUF: llama.cpp stores it as per-frequency divisors (the `rope_freqs` tensor).

The writer computes the divisors as llama.cpp's convert_hf_to_gguf.py does; the reader recovers the
Llama-3 parameters from them, so a Llama 3.x GGUF (ours or llama.cpp's) loads with the same frequencies.
"""

from __future__ import annotations

import math

import numpy as np

from trainfer.errors import TrainferError


def base_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """Unscaled inverse frequencies (head_dim/2,) in float64."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_factors(theta: float, head_dim: int, scaling: dict[str, float]) -> np.ndarray:
    """Divisors of each inverse frequency (1 for short wavelengths, `factor` for long ones, a blend between)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / base_frequencies(theta, head_dim)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, mid))


def llama3_from_factors(theta: float, head_dim: int, factors: np.ndarray) -> dict[str, float] | None:
    """The Llama-3 scaling whose divisors are `factors` (None when all are 1), or a TrainferError.

    Divisors depend on `factor` and the two band edges (old_len / low, old_len / high) only, so low_freq_factor
    is set to 1 and the edges fitted: exactly from the blended band when it has two or more frequencies, else
    anywhere between the neighbouring frequencies (the curve is continuous, so the edges' exact place is moot).
    """
    f = np.asarray(factors, dtype=np.float64)
    x = base_frequencies(theta, head_dim) / (2 * math.pi)  # 1 / wavelength, decreasing
    if f.shape != x.shape:
        raise TrainferError(f"rope_freqs has {f.size} values; head_dim {head_dim} needs {x.size}")
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(f.max())
    high_band, low_band = np.isclose(f, 1.0, rtol=1e-6), np.isclose(f, factor, rtol=1e-6)
    mid = ~(high_band | low_band)
    s = (1 / f - 1 / factor) / (1 - 1 / factor)  # 0 in the low band, 1 in the high band
    if mid.sum() >= 2:
        slope, intercept = np.polyfit(x[mid], s[mid], 1)  # s = (x - x_low) / (x_high - x_low)
        x_low, x_high = -intercept / slope, (1 - intercept) / slope
    else:
        x_high = x[high_band].min() if high_band.any() else 2 * x.max()
        x_low = x[low_band].max() if low_band.any() else x.min() / 2
        if mid.any():  # one blended frequency: keep x_high, place x_low on its line
            x_m, s_m = x[mid][0], s[mid][0]
            x_low = (x_m - s_m * x_high) / (1 - s_m)
    old_len, high = float(1 / x_low), float(x_high / x_low)
    candidates = [
        {"original_max_position_embeddings": round(old_len), "high_freq_factor": round(high, 6)},
        {"original_max_position_embeddings": old_len, "high_freq_factor": high},
    ]
    for c in candidates:  # prefer round numbers (Llama 3.x: 8192, 4.0) when they give the same divisors
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, **c}
        if np.allclose(llama3_factors(theta, head_dim, scaling), f, rtol=1e-5, atol=0):
            return scaling
    raise TrainferError("this GGUF's rope_freqs are not Llama-3 RoPE scaling; trainfer cannot run them")
