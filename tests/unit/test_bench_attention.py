"""benchmarks/attention.py --quick in-process: correctness only (the four layouts' first
losses agree, or the run exits; finite positive times and ratios; the shared prompt
takes fewer slots than plain packing), never timing. About 10 s on 2 shared cores."""

import importlib.util
import json
import math
import os

from tests.conftest import REPO


def test_attention_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(REPO, "benchmarks", "attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "attention.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["max_length"] for r in res["results"]] == [128, 256]
    for r in res["results"]:
        assert r["first_loss_max_diff"] <= 1e-5
        for m in bench.MODES:
            assert math.isfinite(r["seconds"][m]) and r["seconds"][m] > 0 and r["ratio_vs_padded"][m] > 0
        assert r["slots"]["shared-segments"] < r["slots"]["packed-segments"] <= r["slots"]["packed-dense"]  # one row: no packing waste
        assert r["ratio_vs_padded"]["padded"] == 1.0
