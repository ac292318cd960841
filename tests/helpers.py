"""Helpers shared by the tests: paths to ../shared, study files, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Self

import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SST2 = SHARED / "data" / "sst2"
MINILM = SHARED / "models" / "minilm-l6-h384"


def write_study(folder: Path, body: str, name: str = "study.py") -> Path:
    """A study file in ``folder`` whose outputs also go to ``folder``."""
    path = folder / name
    path.write_text(textwrap.dedent(body).replace("OUTPUT_DIR", str(folder / "out")))
    return path


TINY_STUDY = """
    from sweeper import Int, LogFloat, Sweep, SyntheticText, TinyTextClassifier

    sweep = Sweep(
        name="tiny",
        model=TinyTextClassifier(layers=2, hidden=32, heads=2),
        data=SyntheticText(n_train=400, n_test=100),
        space={
            "learning_rate": LogFloat(1e-4, 1e-2),
            "unfreeze_depth": Int(0, 2),
            "pretrain_loss_weight": LogFloat(1e-3, 1.0),
        },
        pretrain_loss="l2sp",
        epochs=1,
        evals_per_epoch=2,
        n_trials=4,
        output_dir="OUTPUT_DIR",
    )
"""


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real `sweeper` command in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sweeper", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


class ConnectionCounter:
    """Connections to the PostgreSQL ``database`` (on the test server), sampled every 50 ms
    from the admin database, which is not counted; ``peak`` is the most seen at once."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.samples: list[int] = []
        self.done = threading.Event()
        from tests.conftest import PG_ADMIN_URL

        self.engine = sqlalchemy.create_engine(PG_ADMIN_URL, poolclass=sqlalchemy.pool.NullPool)
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d")
        with self.engine.connect() as conn:  # on the admin database: not counted
            while not self.done.is_set():
                self.samples.append(int(conn.execute(query, {"d": self.database}).scalar_one()))
                conn.commit()
                self.done.wait(0.05)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        self.engine.dispose()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)
