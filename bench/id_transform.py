"""What the id transform costs the reader: `_decode` of one production-width row group (1024 rows, 2117
continuous, 59 binary, 4 id features, 10 tasks; TwHIN columns too when the config declares them) with
`id_transform` none / modulo / hash, interleaved in one process so machine noise hits all three alike.

    python bench/id_transform.py [REPEATS]

Prints the median and the 10th-90th percentiles per mode, and the transform alone per id.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from recap_app import data
from recap_app.config import IdTransform, load_config
from recap_app.synthetic_data import _Signal

ROWS = 1024


def main(repeats: int = 200) -> None:
    config = load_config("production", [])
    for table in config.model.embeddings.tables:
        table.id_transform = IdTransform.NONE  # in-range ids, so `none` reads them too
    layout = data.Layout.of(config)
    arrow = _Signal(config, 0).block(0, 0, ROWS).to_arrow(layout)
    ids = sum(len(arrow.column(f).combine_chunks().flatten()) for f in layout.features)
    modes = {
        m: data.Layout(**{**layout.__dict__, "id_transforms": (m,) * len(layout.features)})
        for m in IdTransform
    }
    times: dict[IdTransform, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode, lay in modes.items():
            start = time.perf_counter()
            data._decode(arrow, lay, "bench")
            times[mode].append(time.perf_counter() - start)
    print(f"_decode of {ROWS} rows, {ids} ids, {repeats} repetitions each (ms):")
    for mode, t in times.items():
        q = [x * 1e3 for x in statistics.quantiles(t, n=10)]
        print(f"  {mode.value:7s} median {statistics.median(t) * 1e3:.3f}  p10 {q[0]:.3f}  p90 {q[-1]:.3f}")
    raw = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 1_000_000, dtype=np.int64)
    for mode in (IdTransform.MODULO, IdTransform.HASH):
        t = []
        for _ in range(20):
            start = time.perf_counter()
            data.transform_ids(raw, mode, 100_000)
            t.append(time.perf_counter() - start)
        print(f"  {mode.value} alone: {statistics.median(t) * 1e9 / len(raw):.2f} ns per id")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
