"""bench.py: the side-by-side table runs end to end on the tiny config, and the roofline's arithmetic is right."""
import json
import math

import pytest

pytest.importorskip("transformers")
import bench  # noqa: E402


def test_tiny_table_has_every_row_with_finite_ratios(tmp_path, capsys):
    # one thread: on a loaded 2-core machine, 2 OpenMP threads spin-wait for each other on tiny ops
    cfg = bench.BenchConfig(config="tiny", repeats=1, threads=1, out=str(tmp_path / "bench.json"))
    result = bench.main(cfg)
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == list(bench.TARGETS)
    for r in rows.values():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert r["ours"] > 0 and r["theirs"] > 0 and len(r["seconds"]["ours"]) == cfg.repeats
    table = capsys.readouterr().out
    for name in bench.TARGETS:
        assert f"| {name} |" in table
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["row"] for r in saved["rows"]] == list(bench.TARGETS)
    assert saved["meta"]["config"] == "tiny" and saved["meta"]["dtype"] == "fp32"


def test_roofline_38b_numbers():
    r = bench.roofline("r1v3-38b", context=4096)
    c = r["costs"]
    assert c["kv_bytes_per_token"] == 262144  # 2 (K,V) x 64 layers x 8 KV heads x 128 x 2 bytes = 256 KiB
    assert abs(c["params"]["total"] / 38.39e9 - 1) < 0.01
    # a batch-1 decode step on resident weights reads every decoder weight once: ~2 bytes x decoder params
    # (the embedding table is only indexed, hence a little less); over 8 GPUs of tensor parallelism
    res1 = r["decode"][0]
    weights = res1["hbm_bytes"] * 8 - 8 * 4096 * 262144
    assert 0.97 < weights / (2 * c["params"]["language_model"]) < 1.0
    assert res1["bound"] == "HBM"
    # under FSDP the all-gather dominates: ~(7/8) x 2 bytes x decoder params over 450 GB/s, batch-independent
    fsdp1, fsdp64 = r["decode"][2], r["decode"][3]
    assert fsdp1["bound"] == fsdp64["bound"] == "NVLink" and fsdp1["step_s"] == fsdp64["step_s"]
    assert abs(fsdp1["step_s"] - 2 * 32.0e9 * 7 / 8 / 450e9) / fsdp1["step_s"] < 0.03
    assert abs(r["train"]["flops_per_token"] / (6 * c["dec_matmul"]) - 1) < 0.05  # 6N + a little attention
    assert abs(r["load"]["bytes"] - 2 * c["params"]["total"]) < 1
    assert 10e12 < r["tile"]["flops"] < 14e12  # ~2 x 5.5B x 1025 patches + attention
    report = bench.roofline_report(r)
    assert "COMPUTED" in report and "262,144 bytes/token" in report
