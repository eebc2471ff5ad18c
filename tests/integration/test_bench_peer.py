"""Smoke runs of benchmarks/peer.py (simpo-ray vs TRL's SimPO) and
benchmarks/simpo_vs_dpo.py: correctness only (same loss on the first batch, finite
positive ratios), never timing. In-process and in subprocesses, no Ray: not marked slow."""

import importlib.util
import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO

BENCH = os.path.join(REPO, "benchmarks")


def run_smoke(script: str, tmp_path) -> dict:
    out = tmp_path / "result.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, os.path.join(BENCH, script), "--smoke", "--json", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_peer_smoke_same_loss_and_finite_ratios(tmp_path):
    res = run_smoke("peer.py", tmp_path)
    (size, r), = res["sizes"].items()
    tol = res["args"]["tolerance"]
    modes = ("trl", "ours-packed", "ours-padded")
    # Same weights, same rows, same beta / gamma: the first batch's SimPO loss agrees
    # (and so does the gradient it produces), before any optimizer step.
    assert r["first_loss_max_abs_diff"] <= tol
    assert all(positive(r["first_loss"][m]) for m in modes)
    assert r["first_grad_norm_max_rel_diff"] <= 1e-4
    for m in modes:
        assert positive(r["tokens_per_s"][m])
        assert positive(r["tokens_per_s"][m] / r["tokens_per_s"]["trl"])
        assert 0 <= r["waste"][m] < 1
        assert positive(r["rss"][m]["peak_mib"])
        assert r["rss"][m]["above_setup_mib"] >= 0
    assert r["timed_batches"] == res["args"]["batches"]


def test_simpo_vs_dpo_smoke(tmp_path):
    res = run_smoke("simpo_vs_dpo.py", tmp_path)
    (size, r), = res["sizes"].items()
    # Policy = reference at step 0: both DPO modes give exactly ln 2.
    assert r["dpo_first_loss_minus_ln2"] <= 1e-5
    for m in ("simpo", "dpo-live", "dpo-precomputed"):
        assert positive(r["step_s"][m])
        assert positive(r["rss"][m]["peak_mib"])
        assert math.isfinite(r["first_loss"][m])
    assert positive(r["reference_pass_s_per_batch"])


def test_peer_loss_check_catches_a_different_margin(tmp_path):
    """The agreement check is not vacuous: give TRL a different simpo_gamma and the
    first-batch losses no longer agree."""
    spec = importlib.util.spec_from_file_location("peer_bench", os.path.join(BENCH, "peer.py"))
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    from simpo_ray.tiny import build_tokenizer

    a = peer.parse(["--smoke"])
    tok = build_tokenizer()
    rows = peer.ultrafeedback_like_rows(a.pairs, 0, a.max_length, a.max_length // 2)
    trips = peer.triplets(rows, tok)
    idx = list(range(a.micro))
    ours = peer.build("ours-packed", "xs", a, rows, trips, tok, str(tmp_path))
    a.gamma_beta_ratio += 0.5  # TRL alone gets a larger margin
    trl = peer.build("trl", "xs", a, rows, trips, tok, str(tmp_path))
    l_ours = ours.forward_backward(peer.inputs_for("ours-packed", ours, idx, trips))
    l_trl = trl.forward_backward(peer.inputs_for("trl", trl, idx, trips))
    assert abs(l_ours - l_trl) > 10 * a.tolerance
