"""Synthetic city traffic flows in the TaxiBJ form, written as a TaxiBJ-style HDF5 file.

    python -m data_scripts.traffic --out data/raw/traffic --days 70 --seed 0

A 32×32 city: residential districts on the outskirts, business districts near the centre, a few
leisure areas. Each cell counts the trips that enter it (inflow) and leave it (outflow) in every
30-minute slot, 48 slots a day, starting on a Monday:

- daily rhythm: quiet nights, a daytime plateau;
- weekday rush hours: in the morning people flow out of the residential cells into the business
  cells, in the evening back; weekends have no rush hours but a broad afternoon peak at leisure areas;
- day-to-day variation (a weather factor per day, a slow drift within the day);
- a few events: on some days a crowd gathers around one spot for two to four hours (inflow surges
  before, outflow after);
- counts are Poisson draws of the expected flows.

``flows.h5`` holds ``data`` ``(T, 2, 32, 32)`` float64 (channel 0 inflow, 1 outflow) and ``date``
``(T,)`` byte strings ``YYYYMMDDSS`` (``SS`` the slot of the day, 01..48), as the TaxiBJ files
(``BJ16_M32x32_T30_InOut.h5``) do; ``events.csv`` lists the events. Everything is determined by the
seed: the same arguments give the same numbers.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZE = 32
SLOTS_PER_DAY = 48
START = dt.date(2025, 3, 3)  # a Monday
EVENT_PROBABILITY = 0.12  # per day


def _bump(hours: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((hours - centre) / width) ** 2)


def _blobs(
    rng: np.random.Generator, count: int, radius: tuple[float, float], spread: tuple[float, float]
) -> np.ndarray:
    """``(SIZE, SIZE)`` sum of ``count`` Gaussian blobs at ``radius`` (fraction of the half-width) from the centre."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) * 2 - 1
    field = np.zeros((SIZE, SIZE))
    for _ in range(count):
        angle, r = rng.uniform(0, 2 * np.pi), rng.uniform(*radius)
        cx, cy, s = r * np.cos(angle), r * np.sin(angle), rng.uniform(*spread)
        field += rng.uniform(0.6, 1.0) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s**2))
    return field / field.max()


def city(seed: int) -> dict[str, np.ndarray]:
    """The land use of the city: ``residential``, ``business`` and ``leisure`` weights per cell in [0, 1]."""
    rng = np.random.default_rng([seed, 0])
    return {
        "residential": _blobs(rng, 7, (0.45, 0.9), (0.12, 0.22)),
        "business": _blobs(rng, 3, (0.0, 0.3), (0.08, 0.15)),
        "leisure": _blobs(rng, 3, (0.2, 0.7), (0.06, 0.1)),
    }


def expected_flows(days: int, seed: int, peak: float = 1000.0) -> tuple[np.ndarray, list[dict]]:
    """Expected inflow and outflow ``(days * 48, 2, 32, 32)`` and the events ``[{day, row, col, start_hour, hours}]``."""
    land = city(seed)
    res, bus, lei = land["residential"], land["business"], land["leisure"]
    everywhere = 0.35 * res + 0.35 * bus + 0.2 * lei + 0.05
    rng = np.random.default_rng([seed, 1])
    hours = (np.arange(SLOTS_PER_DAY) + 0.5) / 2
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    out = np.zeros((days * SLOTS_PER_DAY, 2, SIZE, SIZE))
    events = []
    for d in range(days):
        weekend = (START + dt.timedelta(days=d)).weekday() >= 5
        weather = np.exp(rng.normal(0, 0.12))
        drift = np.exp(np.cumsum(rng.normal(0, 0.02, SLOTS_PER_DAY)))  # slow change within the day
        daytime = 0.08 + _bump(hours, 14.0, 4.5) + 0.5 * _bump(hours, 20.5, 2.0)  # (48,)
        if weekend:
            afternoon = _bump(hours, 15.5, 2.5)
            inflow = (
                0.8 * daytime[:, None, None] * everywhere
                + 1.3 * afternoon[:, None, None] * lei
                + 0.5 * _bump(hours, 20.0, 2.0)[:, None, None] * res
            )
            outflow = (
                0.8 * daytime[:, None, None] * everywhere
                + 1.3 * _bump(hours, 17.5, 2.5)[:, None, None] * lei
                + 0.5 * afternoon[:, None, None] * res
            )
        else:
            morning, evening = _bump(hours, 8.25, 0.9), _bump(hours, 18.0, 1.1)
            inflow = (
                daytime[:, None, None] * everywhere
                + 2.2 * morning[:, None, None] * bus
                + 1.6 * evening[:, None, None] * res
            )
            outflow = (
                daytime[:, None, None] * everywhere
                + 2.2 * morning[:, None, None] * res
                + 1.6 * evening[:, None, None] * bus
            )
        day = np.stack([inflow, outflow], 1) * (weather * drift)[:, None, None, None]
        if rng.random() < EVENT_PROBABILITY:
            row, col = (int(v) for v in rng.integers(4, SIZE - 4, 2))
            start, length = float(rng.uniform(11, 19)), float(rng.uniform(2, 4))
            spot = np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * 1.5**2))
            size = rng.uniform(1.5, 3.0)
            day[:, 0] += size * _bump(hours, start, 0.7)[:, None, None] * spot  # arriving
            day[:, 1] += size * _bump(hours, start + length, 0.7)[:, None, None] * spot  # leaving
            events.append(
                {"day": d, "row": row, "col": col, "start_hour": round(start, 2), "hours": round(length, 2)}
            )
        out[d * SLOTS_PER_DAY : (d + 1) * SLOTS_PER_DAY] = day
    return out * (peak / 3.0), events


def timestamps(days: int) -> list[str]:
    """TaxiBJ's slot names ``YYYYMMDDSS`` (slots 01..48) of ``days`` days from :data:`START`."""
    return [
        f"{(START + dt.timedelta(days=d)):%Y%m%d}{s + 1:02d}"
        for d in range(days)
        for s in range(SLOTS_PER_DAY)
    ]


def generate(days: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[dict]]:
    """Observed flows ``(days * 48, 2, 32, 32)`` float64 (Poisson counts), their slot names and the events."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    mean, events = expected_flows(days, seed)
    counts = np.random.default_rng([seed, 2]).poisson(mean).astype(np.float64)
    return counts, timestamps(days), events


def write(out: str | os.PathLike, days: int, seed: int = 0) -> Path:
    """Write ``flows.h5`` and ``events.csv`` into ``out`` (replaced as a whole)."""
    import h5py

    from pipeline.storage.atomic import replace_dir

    data, dates, events = generate(days, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    with h5py.File(tmp / "flows.h5", "w", track_order=True) as f:
        f.create_dataset("data", data=data, compression="gzip", compression_opts=4, shuffle=True)
        f.create_dataset("date", data=np.array(dates, dtype="S10"))
    with open(tmp / "events.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["day", "row", "col", "start_hour", "hours"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(events)
    replace_dir(tmp, out)
    print(
        f"traffic: wrote {len(dates)} slots ({days} days, {len(events)} events) to {out / 'flows.h5'}",
        file=sys.stderr,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_scripts.traffic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder (replaced)")
    parser.add_argument("--days", type=int, default=70, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        write(args.out, args.days, args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
