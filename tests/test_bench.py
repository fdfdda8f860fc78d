"""tools/bench.py: the side-by-side table runs end to end on the tiny config, and the roofline's arithmetic is right."""
import json
import math

import pytest

pytest.importorskip("transformers")
from tools import bench  # noqa: E402


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


# ---------------------------------------------------------------------------- bench_rollout.py and the GRPO roofline
from tools import bench_rollout  # noqa: E402

# the smallest group the comparison means something for: 2 samples, an image of 2 tiles + thumbnail, 4 new tokens
SMALL_GROUP = bench_rollout.RolloutSizes(group=2, image_grid=(2, 1), group_new=4, micro_batch=2)


def test_rollout_group_rows_run_on_tiny_and_check_equal_work(tiny_ckpt):
    rows = bench_rollout.group_rows(tiny_ckpt, SMALL_GROUP, repeats=1)
    assert [r["row"] for r in rows] == ["rollout per group (G=2)", "GRPO step (G=2, 1 PPO epoch)"]
    for r in rows:
        assert r["a"] == "new" and r["b"] == "old" and len(r["seconds"]["new"]) == 1
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["target"] in (3.0, 1.5)
    assert "| rollout per group (G=2) | new | old | s |" in bench_rollout.table(rows)


def test_rollout_group_rows_fail_when_the_paths_differ(tiny_ckpt, monkeypatch):
    """The equal-work check is real: a new path whose greedy tokens differ from the old one's stops the bench."""
    new_rollout = bench_rollout.new_rollout

    def wrong(*args):
        responses, prompt = new_rollout(*args)
        return [r[:-1] + [(r[-1] + 1) % 256] for r in responses], prompt
    monkeypatch.setattr(bench_rollout, "new_rollout", wrong)
    with pytest.raises(AssertionError, match="greedy tokens differ"):
        bench_rollout.group_rows(tiny_ckpt, SMALL_GROUP, repeats=1)


def test_roofline_grpo_rows_tp_beats_fsdp_gather_by_the_formulas():
    r = bench.roofline("r1v3-38b", context=4096)
    c, hw, g = r["costs"], bench.Hardware(), bench.GRPOConfig()
    fsdp, tp = r["grpo"]
    # the decode step at the recipe's batch: TP reads 1/8 of the bf16 decoder + its KV share; FSDP gathers it all
    d_fsdp, d_tp = fsdp["decode_step"], tp["decode_step"]
    assert d_tp["step_s"] < d_fsdp["step_s"] and d_tp["bound"] == "HBM" and d_fsdp["bound"] == "NVLink"
    kv = g.rollout_batch_size * (bench.RECIPE_PROMPT_TOKENS + g.max_new_tokens // 2) * c["kv_bytes_per_token"]
    assert d_tp["hbm_bytes"] == 2 * c["dec_matmul"] / 8 + kv
    assert abs(d_fsdp["step_s"] - 2 * (c["params"]["language_model"] - c["lm_head"]) * 7 / 8 / 450e9) < 1e-9
    # TP's NVLink bytes: ring all-reduces (2 per layer + the embedding's) and the logits all-gather, node batch 64
    rows = hw.gpus * g.rollout_batch_size
    assert abs(d_tp["nvlink_bytes"] - 7 / 8 * 2 * rows * (2 * 129 * 5120 + 151674)) < 1
    # the rollout phase: 64 sequences per GPU in calls of 8, each max_new_tokens steps, plus the prefills
    calls = g.prompts_per_step * g.group_size // 8 // g.rollout_batch_size
    for s in (fsdp, tp):
        decode = calls * g.max_new_tokens * s["decode_step"]["step_s"]
        assert decode < s["phases"]["rollout"] < decode + 5  # prefill + ViT: a few seconds at peak
        assert abs(s["step_s"] - sum(s["phases"].values())) < 1e-6
    assert fsdp["phases"]["update"] == tp["phases"]["update"] and fsdp["phases"]["refresh"] == 0 < tp["phases"]["refresh"]
    assert fsdp["phases"]["logprobs"] == tp["phases"]["logprobs"] == 0  # one optimizer step: no old-log-prob pass
    assert fsdp["step_s"] / tp["step_s"] > 5  # hours vs minutes
    assert 1.5 * 3600 < fsdp["step_s"] < 2 * 3600 and tp["step_s"] < 600
    report = bench.roofline_report(r)
    assert "GRPO step, default recipe" in report and "COMPUTED, not measured" in report


def test_rollout_step_work_counts_the_tiles_each_path_runs_through_the_vit(tiny_ckpt):
    """bench_rollout.step_work (what the ViT-once and prefill-once path saves) against the tiles the ViT really sees
    in one GRPO step of each side."""
    m, opt, ids, pixels, cfg, ctx = bench_rollout.group_setup(tiny_ckpt, SMALL_GROUP)
    seen = []
    m.vision_model.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    want = bench_rollout.step_work(cfg, pixels.shape[0], len(ids))
    for side, rollout_fn, features in (("old", bench_rollout.old_rollout, False),
                                       ("new", bench_rollout.new_rollout, True)):
        seen.clear()
        bench_rollout.grpo_step(m, opt, rollout_fn, ids, pixels, cfg, ctx, features)
        assert sum(seen) == want[side]["vit_tiles"], side
    assert want["old"]["prefill_tokens"] == cfg.group_size * want["new"]["prefill_tokens"]


def test_roofline_grpo_on_several_nodes_hsdp_vs_full_fsdp():
    """1, 2, 4 nodes of 8: the rollout and the compute scale with the GPUs; HSDP keeps FSDP's collectives on NVLink
    and adds one cross-node all-reduce of the gradient shards per optimizer step; full FSDP's per-micro-batch
    collectives cross the network (400 Gb/s per GPU = 50 GB/s) and bound the update."""
    r = bench.roofline("r1v3-38b", context=4096)
    c = r["costs"]
    rows = {(n["nodes"], n["sharding"]): n for n in r["nodes"]}
    assert list(rows) == [(1, "FSDP"), (2, "HSDP"), (2, "full FSDP"), (4, "HSDP"), (4, "full FSDP")]
    one = rows[1, "FSDP"]
    assert one["step_s"] == r["grpo"][1]["step_s"]  # one node: the TP column of the default recipe
    for n in (2, 4):
        hsdp, full = rows[n, "HSDP"], rows[n, "full FSDP"]
        assert hsdp["seqs_per_gpu"] == full["seqs_per_gpu"] == 64 // n
        assert abs(hsdp["phases"]["rollout"] - one["phases"]["rollout"] / n) < 1e-6
        assert abs(hsdp["phases"]["update"] - one["phases"]["update"] / n) < 1e-6  # compute-bound, as on one node
        shard = 4 * c["trained"] / 8  # fp32 gradients of one GPU's shard; one optimizer step per GRPO step
        assert abs(hsdp["phases"]["replicate"] - 2 * (n - 1) / n * shard / 50e9) < 1e-9
        network = 64 // n * (2 + 2 + 4) * c["trained"] * (8 * n - 1) / (8 * n) / 50e9  # per micro-batch, x micro
        assert abs(full["phases"]["update"] - network) < 1e-6 and full["phases"]["replicate"] == 0
        assert hsdp["step_s"] < full["step_s"] < one["step_s"]
    slow = bench.roofline("r1v3-38b", 4096, bench.Hardware(inter_node_bytes_per_s=25e9))
    assert slow["nodes"][2]["phases"]["update"] == 2 * rows[2, "full FSDP"]["phases"]["update"]
    assert "HSDP vs full FSDP (COMPUTED, not measured)" in bench.roofline_report(r)
