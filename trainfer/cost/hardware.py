"""The hardware and price table (hardware.toml beside this file, or a user's file layered on top)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from trainfer.errors import TrainferError

TABLE = Path(__file__).with_name("hardware.toml")
FIELDS = ("name", "description", "peak_tflops", "peak_dtype", "memory_gbs", "price_per_hour", "source", "as_of")


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    peak_tflops: float
    peak_dtype: str
    memory_gbs: float
    price_per_hour: float
    source: str
    as_of: str
    device_price: float | None = None  # to buy one, for edge amortization

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12


@dataclass(frozen=True)
class PriceTable:
    rows: dict[str, Hardware]
    sources: tuple[str, ...]  # the files read, with their dates

    def get(self, name: str) -> Hardware:
        if name not in self.rows:
            raise TrainferError(f"no hardware {name!r} in the price table; known: {', '.join(self.rows)}")
        return self.rows[name]


def _read(path: Path) -> tuple[str, list[Hardware]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TrainferError(f"no such price table: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrainferError(f"price table {path} is not valid TOML: {e}") from None
    rows = []
    for i, row in enumerate(data.get("hardware", [])):
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise TrainferError(f"price table {path}: row {i + 1} lacks {', '.join(missing)}")
        unknown = set(row) - set(FIELDS) - {"device_price"}
        if unknown:
            raise TrainferError(f"price table {path}: row {i + 1} has unknown fields {', '.join(sorted(unknown))}")
        try:
            hw = Hardware(**row)
            numbers = [hw.peak_tflops, hw.memory_gbs, hw.price_per_hour] + [hw.device_price or 1]
            if not all(isinstance(x, int | float) and x > 0 for x in numbers):
                raise ValueError("peak_tflops, memory_gbs, price_per_hour (and device_price) must be positive")
        except (TypeError, ValueError) as e:
            raise TrainferError(f"price table {path}: row {i + 1} ({row.get('name')}): {e}") from None
        rows.append(hw)
    if not rows:
        raise TrainferError(f"price table {path} has no [[hardware]] rows")
    return str(data.get("date", "undated")), rows


def load_table(override: Path | None = None) -> PriceTable:
    """The shipped table, with a user's rows replacing (or adding to) rows of the same name."""
    rows: dict[str, Hardware] = {}
    sources = []
    for path in [TABLE] + ([Path(override)] if override else []):
        date, read = _read(path)
        rows.update({hw.name: hw for hw in read})
        sources.append(f"{path} ({date})")
    return PriceTable(rows, tuple(sources))
