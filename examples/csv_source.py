"""A user data source: a CSV file of ``user,item,timestamp`` rows (ids any integers).

Plug it in with ``[data] source = "examples.csv_source:SOURCE"`` and the keys of
``CsvConfig`` (``path``, ``n_rounds``, ``history_fraction``). The config lives beside its
loader and is validated by the same mechanism as every other section.
"""
from dataclasses import dataclass

import numpy as np
import pandas as pd

from devices.data import DataSource, Interactions, Timeline
from devices.errors import ConfigError, DataError
from devices.movielens import movielens_timeline


@dataclass(frozen=True)
class CsvConfig:
    path: str = ""
    n_rounds: int = 5
    history_fraction: float = 0.8

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("path", self.path, "the path of a user,item,timestamp CSV file")


def load(cfg: CsvConfig, seed: int) -> tuple[Interactions, Timeline]:
    try:
        df = pd.read_csv(cfg.path, usecols=["user", "item", "timestamp"])
    except (OSError, ValueError) as exc:
        raise DataError(f"{cfg.path}: {exc}") from None
    if df.empty or not np.isfinite(df["timestamp"].to_numpy(np.float64)).all():
        raise DataError(f"{cfg.path}: no rows, or a timestamp that is not a finite number")
    users, user_idx = np.unique(df["user"].to_numpy(), return_inverse=True)
    _, item_idx = np.unique(df["item"].to_numpy(), return_inverse=True)
    order = np.lexsort((df["timestamp"].to_numpy(), user_idx))  # per user, in time order
    counts = np.bincount(user_idx, minlength=len(users))
    times = df["timestamp"].to_numpy(np.float64)[order]
    t0 = float(times.min())
    inter = Interactions(n_users=len(users), n_items=int(item_idx.max()) + 1,
                         indptr=np.concatenate([[0], np.cumsum(counts)]), items=item_idx[order], times=times - t0)
    return inter, movielens_timeline(inter, t0, cfg.n_rounds, cfg.history_fraction)


SOURCE = DataSource("csv", CsvConfig, load)
