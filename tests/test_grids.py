"""Traffic-flow grids: the synthetic city (deterministic, with its rhythms and events), the TaxiBJ
HDF5 importer (files written here with h5py), the grid store and its windows, and the grid
forecaster trained by ``vpipe fit`` beside copy-last and the historical average."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_scripts import traffic
from pipeline.datasets.flows import GridDataModule
from pipeline.storage.grids import GridStore, import_grids
from pipeline.storage.store import StoreError

ROOT = Path(__file__).resolve().parents[1]


def write_h5(path: Path, data: np.ndarray, dates: list[str]) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("date", data=np.array(dates, dtype="S10"))
    return path


def slot_names(first: dt.date, days: int, per_day: int = 48) -> list[str]:
    return [f"{first + dt.timedelta(days=d):%Y%m%d}{s + 1:02d}" for d in range(days) for s in range(per_day)]


# The generator


def test_generator_is_deterministic_and_in_taxibj_form():
    a, dates, events = traffic.generate(14, seed=3)
    b, dates_b, events_b = traffic.generate(14, seed=3)
    assert a.shape == (14 * 48, 2, 32, 32) and a.dtype == np.float64
    assert np.array_equal(a, b) and dates == dates_b and events == events_b
    assert not np.array_equal(a, traffic.generate(14, seed=4)[0])
    assert dates[0] == "2025030301" and dates[47] == "2025030348" and dates[48] == "2025030401"
    assert (a >= 0).all() and np.array_equal(a, np.round(a))  # counts


def test_generator_has_daily_and_weekly_rhythms_and_rush_hours():
    flows, _, _ = traffic.generate(14, seed=0)
    days = flows.reshape(14, 48, 2, 32, 32)
    land = traffic.city(0)
    business, everywhere = land["business"] > 0.5, np.ones((32, 32), bool)
    weekday, weekend = days[[0, 1, 2, 3, 4, 7, 8, 9, 10, 11]], days[[5, 6, 12, 13]]
    at = lambda d, hour, channel, cells: d[:, 2 * hour, channel][:, cells].mean()  # noqa: E731
    # Daily: nights are quiet.
    assert at(weekday, 3, 0, everywhere) < 0.2 * at(weekday, 13, 0, everywhere)
    # Rush hours on weekdays: into the business district at 8, out of it at 18.
    assert at(weekday, 8, 0, business) > 2 * at(weekday, 11, 0, business)
    assert at(weekday, 18, 1, business) > 1.5 * at(weekday, 13, 1, business)
    # Weekly: weekends have no morning rush.
    assert at(weekend, 8, 0, business) < 0.5 * at(weekday, 8, 0, business)
    # The week repeats: Tuesday's day (every slot, cell and channel) correlates with next Tuesday's
    # far better than with the Sunday between them.
    corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]  # noqa: E731
    assert corr(days[1], days[8]) > 0.95 and corr(days[1], days[8]) - corr(days[6], days[8]) > 0.1


def test_generator_events_raise_inflow_around_their_spot():
    flows, _, events = traffic.generate(70, seed=0)
    assert 1 <= len(events) <= 20
    for e in events:
        slot = e["day"] * 48 + int(e["start_hour"] * 2)
        spot = np.s_[e["row"] - 1 : e["row"] + 2, e["col"] - 1 : e["col"] + 2]
        usual = np.mean(
            [flows[slot + k * 48, 0][spot].mean() for k in (-7, 7) if 0 <= slot + k * 48 < len(flows)]
        )
        assert flows[slot, 0][spot].mean() > usual + 20


def test_write_makes_a_taxibj_file(tmp_path):
    out = traffic.write(tmp_path / "traffic", days=3, seed=0)
    with h5py.File(out / "flows.h5") as f:
        assert f["data"].shape == (144, 2, 32, 32) and f["date"][0] == b"2025030301"
    first = (out / "flows.h5").read_bytes()
    traffic.write(tmp_path / "traffic", days=3, seed=0)
    assert (out / "flows.h5").read_bytes() == first  # byte-identical: DVC sees no change


# The importer and the store


def test_import_joins_files_sorts_slots_and_splits_by_day(tmp_path):
    rng = np.random.default_rng(0)
    names = slot_names(dt.date(2024, 1, 1), 10, per_day=4)
    data = rng.random((40, 2, 4, 4)).astype(np.float64)
    # Two files, the second given first and out of order; slot 7 (day 1, slot 4) missing.
    first = write_h5(tmp_path / "a.h5", data[:7], names[:7])
    second = write_h5(tmp_path / "b.h5", data[8:][::-1], names[8:][::-1])
    meta = import_grids([second, first], tmp_path / "store", val_days=2, test_days=3, slots_per_day=4)
    assert (
        meta["kind"] == "grids"
        and meta["shape"] == [2, 4, 4]
        and meta["slots"] == {"train": 19, "val": 8, "test": 12}
    )
    store = GridStore(tmp_path / "store")
    expected = np.concatenate([data[:7], data[8:]]).astype(np.float32)
    assert np.array_equal(store.grids, expected)
    assert list(store.slot[:9]) == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # the gap stays visible
    with open(tmp_path / "store" / "slots.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0] == {
        "row": "0",
        "date": "2024010101",
        "time": "2024-01-01T00:00",
        "slot": "0",
        "split": "train",
    }
    assert rows[-1]["time"] == "2024-01-10T18:00" and rows[-1]["split"] == "test"
    assert {r["split"] for r in rows if r["date"].startswith("20240106")} == {"val"}
    # Covariates: time of day on a circle, weekend flag (2024-01-06 was a Saturday).
    known = store.covariates()
    assert (
        known.shape == (39, 3)
        and known[0, 2] == 0
        and known[[r["date"].startswith("20240106") for r in rows]][:, 2].all()
    )


@pytest.mark.parametrize("case", ["duplicate", "no_date", "bad_date", "shape", "too_short", "not_hdf5"])
def test_import_errors_name_the_file_and_keep_the_old_store(case, tmp_path):
    names = slot_names(dt.date(2024, 1, 1), 6, per_day=4)
    good = write_h5(tmp_path / "good.h5", np.ones((24, 2, 4, 4)), names)
    import_grids([good], tmp_path / "store", val_days=1, test_days=1, slots_per_day=4)
    before = (tmp_path / "store" / "grids.npy").read_bytes()
    bad = tmp_path / "bad.h5"
    if case == "duplicate":
        write_h5(bad, np.ones((1, 2, 4, 4)), names[5:6])
        expected = "is also in"
    elif case == "no_date":
        with h5py.File(bad, "w") as f:
            f.create_dataset("data", data=np.ones((1, 2, 4, 4)))
        expected = "no 'date' dataset"
    elif case == "bad_date":
        write_h5(bad, np.ones((1, 2, 4, 4)), ["2024010199"])
        expected = "not YYYYMMDDSS"
    elif case == "shape":
        write_h5(bad, np.ones((1, 2, 8, 8)), ["2024020101"])
        expected = "grids of shape"
    elif case == "too_short":
        write_h5(bad, np.ones((4, 2, 4, 4)), slot_names(dt.date(2024, 3, 1), 1, per_day=4))
        expected = "too few"
    else:
        bad.write_bytes(b"not an HDF5 file")
        expected = "not a readable HDF5 file"
    files = [bad] if case in ("too_short", "not_hdf5", "no_date", "bad_date") else [good, bad]
    with pytest.raises(StoreError, match=expected) as err:
        import_grids(files, tmp_path / "store", val_days=1, test_days=1, slots_per_day=4)
    assert str(bad) in str(err.value)
    assert (tmp_path / "store" / "grids.npy").read_bytes() == before


def test_vpipe_grids_command(tmp_path, capsys):
    from pipeline.cli import main

    traffic.write(tmp_path / "raw", days=5, seed=0)
    main(
        [
            "grids",
            str(tmp_path / "raw" / "flows.h5"),
            "--out",
            str(tmp_path / "grids"),
            "--val-days",
            "1",
            "--test-days",
            "1",
        ]
    )
    assert "240 slots of 2×32×32 grids (144 train, 48 val, 48 test)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="vpipe grids: .*missing.h5: no such file"):
        main(["grids", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "other")])


# Windows and the historical average


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    """21 days of the synthetic city as a grid store: 2 weeks of training, 3 val and 4 test days."""
    folder = tmp_path_factory.mktemp("city")
    traffic.write(folder / "raw", days=21, seed=1)
    import_grids([folder / "raw" / "flows.h5"], folder / "grids", val_days=3, test_days=4)
    return folder / "grids"


def test_windows_history_and_known_values(city):
    dm = GridDataModule(str(city), context=3, horizon=2, history_weeks=2, batch_size=4)
    store = GridStore(city)
    values = np.asarray(store.grids) / dm.scale
    assert dm.input_dim == 2 and dm.covariates == 3 + 2 * 2
    assert dm.scale == pytest.approx(np.asarray(store.grids)[store.split == "train"].std(), rel=1e-5)
    # Training windows need a week before every slot; evaluation windows' targets lie in their split.
    assert dm._starts["train"].min() == 7 * 48
    assert (store.split[dm._starts["val"] + 3] == "val").all() and (
        store.split[dm._starts["test"] + 4] == "test"
    ).all()
    dataset = dm._dataset("test")
    batch = dataset.__getitems__([0, 5])
    assert batch["x"].shape == (2, 5, 2, 32, 32) and batch["cond"].shape == (2, 4, 7, 32, 32)
    start = int(dataset.starts[5])
    assert torch.allclose(batch["x"][1], torch.from_numpy(values[start : start + 5]))
    target = start + 4  # the last slot of the window: its historical average over the two weeks before
    expected = (values[target - 7 * 48] + values[target - 14 * 48]) / 2
    assert torch.allclose(batch["history"][1, 4], torch.from_numpy(expected), atol=1e-6)
    # cond at step t: slot t + 1's time and day type, then the historical averages of slots t and t + 1.
    assert torch.allclose(batch["cond"][1, 3, 3:5], batch["history"][1, 3]) and torch.allclose(
        batch["cond"][1, 3, 5:], batch["history"][1, 4]
    )
    assert torch.allclose(batch["cond"][1, 0, :3, 0, 0], torch.from_numpy(store.covariates()[start + 1]))
    examples = dm.examples(2)
    first_target = examples["x"].shape[1] - 2
    assert examples["x"].shape[0] == 2 and first_target == 3


def test_untrained_grid_forecaster_carries_the_anomaly_forward(city):
    from pipeline.systems.conv_forecaster import GridForecaster

    dm = GridDataModule(str(city), context=3, horizon=2, history_weeks=1)
    model = GridForecaster(
        input_dim=dm.input_dim, covariates=dm.covariates, scale=dm.scale, context=3, horizon=2
    )
    batch = dm._dataset("val").__getitems__([0, 1, 2])
    with torch.no_grad():
        pred = model.rollout(batch["x"][:, :3], 2, batch["cond"])
    x, history = batch["x"], batch["history"]
    anomaly = x[:, 2] - history[:, 2]  # the last context slot's departure from its historical average
    assert torch.allclose(pred[:, 0], history[:, 3] + anomaly, atol=1e-6)
    assert torch.allclose(pred[:, 1], history[:, 4] + anomaly, atol=1e-6)


def test_grid_config_trains_and_reports_flows(city, tmp_path, monkeypatch):
    import mlflow

    from pipeline.train import cli_main

    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    cli_main(
        [
            "fit",
            "-c",
            str(ROOT / "configs" / "traffic_convlstm.yaml"),
            "--data.init_args.grids",
            str(city),
            "--data.init_args.history_weeks",
            "2",
            "--model.init_args.hidden_channels",
            "[8]",
            "--trainer.accelerator",
            "cpu",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "3",
            "--system_metrics",
            "false",
        ]
    )
    assert (
        "MLFLOW_TRACKING_URI" not in os.environ
    )  # the run's store stays its own: the next run picks its root's
    metrics = json.loads((tmp_path / "metrics" / "traffic_convlstm.json").read_text())
    for prefix in ("test/", "test/copy_last/", "test/historical_average/"):
        assert {f"{prefix}rmse", f"{prefix}mae", f"{prefix}h01/rmse", f"{prefix}h04/mae"} <= metrics.keys()
        # RMSE over the whole horizon is the root of the mean square error, not a mean of roots.
        assert metrics[f"{prefix}rmse"] == pytest.approx(metrics[f"{prefix}mse"] ** 0.5, rel=1e-4)
    # In flow units: the historical average's error is computed here from the store itself.
    store = GridStore(city)
    flows = np.asarray(store.grids, dtype=np.float64)
    dm = GridDataModule(str(city), history_weeks=2)
    targets = dm._starts["test"] + 4
    ha = np.stack([(flows[targets - 7 * 48] + flows[targets - 14 * 48]) / 2])
    assert metrics["test/historical_average/h01/rmse"] == pytest.approx(
        np.sqrt(((flows[targets] - ha[0]) ** 2).mean()), rel=1e-3
    )
    plots = tmp_path / "plots" / "traffic_convlstm"
    with open(plots / "horizons.csv") as fh:
        header = fh.readline().strip().split(",")
    assert header[:4] == ["horizon", "rmse", "mse", "mae"] and "historical_average_rmse" in header
    assert (plots / "rollout.png").read_bytes()[:4] == b"\x89PNG"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("traffic_convlstm").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "test")} >= {
        "test/rollout.png",
        "test/rollout.gif",
    }
    assert run.data.tags.get("data.grids") == str(city)
