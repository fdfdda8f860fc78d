"""The memory planner against measurements: exact tensor bytes on the tiny model, peak host memory (RSS) of a real
training step on a mid-size model, and the 38B default GRPO setting under 70 GB per GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from model import write_tiny_checkpoint
from model import R1VConfig
from plan import main as plan_main
from plan import plan, recipes
from optim import make_optimizer
from parallel import Context, load_for_training
from test_fsdp import batch, loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("recipe,spec", [("cold-start SFT", "all"), ("connector-only", "connector")])
def test_state_bytes_are_exact_on_tiny(tiny_ckpt, recipe, spec):
    model = load_for_training(tiny_ckpt, Context(torch.device("cpu")), train=spec)
    opt = make_optimizer(model, lr=1e-3)
    loss_fn(model, *batch(model)).backward()
    opt.step()
    r = next(r for r in recipes() if r.name == recipe)
    p = plan(model.config, 1, r, act_bytes=4)
    assert p["weights"] == tensor_bytes(model.parameters())
    assert p["grads"] == tensor_bytes(q.grad for q in model.parameters() if q.grad is not None)
    moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert p["adam"] == tensor_bytes(moments)


def test_peak_host_memory_of_a_training_step_is_within_20_percent(tmp_path):
    with open(os.path.join(ROOT, "tiny_configs", "tiny.json")) as f:
        cfg = json.load(f)
    cfg["vision_config"].update(hidden_size=128, intermediate_size=512)
    cfg["llm_config"].update(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                             intermediate_size=1408, vocab_size=32000)
    ckpt = write_tiny_checkpoint(str(tmp_path / "mid"), cfg, max_shard_bytes=32 * 2**20)
    out = subprocess.run([sys.executable, "plan.py", "--measure", ckpt, "--recipe", "cold-start SFT", "--seq", "640",
                          "--tiles", "1"], capture_output=True, text=True, cwd=ROOT, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["planned"] > 400e6  # large enough that interpreter and allocator noise cannot decide the test
    assert 0.8 < r["measured"] / r["planned"] < 1.2, r


def test_default_38b_grpo_fits_80gb_with_margin(capsys):
    with open(os.path.join(ROOT, "tiny_configs", "r1v3-38b.json")) as f:
        cfg = R1VConfig.from_dict(json.load(f))
    grpo = next(r for r in recipes() if r.name == "GRPO")
    default = plan(cfg, 8, grpo, grad_ckpt=True, bf16_moments=True)
    assert default["peak"] <= 70e9, default["peak"] / 1e9
    assert plan(cfg, 8, grpo, bf16_moments=False)["peak"] > 80e9  # why the default keeps Adam moments in bf16
    plan_main(["--gpus", "8"])
    assert "| GRPO | act-ckpt, bf16 Adam |" in capsys.readouterr().out
