"""The CUDA path, proven on a GPU machine: `python -m pytest tests/gpu -x -s` (docs/gpu.md: what each line means).

Everything else in tests/ runs on CPU (gloo, fake tensors); these check what only a GPU shows: bf16 numerics, NCCL,
torch.compile with CUDA graphs, the fused attention kernels, the memory plan against the caching allocator, and
speed against the roofline. One GPU: under 8 minutes; the NCCL test runs where 2+ GPUs are present.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from data import left_pad
from model import SkyworkR1V, token_logprobs_and_entropy
from optim import make_optimizer
from parallel import Context, autocast, load
from tools import plan as planner
from tools.bench import Hardware

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = torch.device("cuda")


def prompts(config, device, n: int = 4, seed: int = 0):
    """n text prompts of different lengths, left-padded (the masked path of every rollout)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 600, (9 + 5 * i,), generator=g).tolist() for i in range(n)]
    ids, mask = left_pad(rows, 0)
    return ids.to(device), mask.to(device)


def image_prompt(config, device, seed: int = 1):
    """One prompt with one image tile (the ViT and the connector run too) -> ids [1,T], pixels [1,3,448,448]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 600, (1, 16 + config.num_image_token), generator=g)
    ids[0, 4:4 + config.num_image_token] = config.img_context_token_id
    return ids.to(device), torch.randn(1, 3, 448, 448, generator=g).to(device)


def test_bf16_logits_match_fp32_cpu(small_ckpt):
    """bf16 on the GPU computes the model that fp32 on the CPU does: logits of a prompt with an image agree to 3%
    of their range (bf16 keeps 8 bits of mantissa: exact agreement is not expected). The greedy-token agreement is
    printed, not asserted: random weights leave near-ties (a top-2 gap under bf16's error) at many positions, the
    image tokens' above all (0.945 in a CPU emulation of this test). Proves: weights load onto CUDA in bf16, ViT +
    connector + decoder run there."""
    cpu = SkyworkR1V.from_pretrained(small_ckpt)
    gpu = SkyworkR1V.from_pretrained(small_ckpt, dtype=torch.bfloat16, device=DEV)
    ids, pv = image_prompt(cpu.config, "cpu")
    with torch.no_grad():
        want = cpu(ids, pv)
        got = gpu(ids.to(DEV), pv.to(DEV, torch.bfloat16)).float().cpu()
    err = ((got - want).abs().max() / want.abs().max()).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"\n[bf16 logits] max |bf16 GPU - fp32 CPU| / max |logit| = {err:.4f} (limit 0.03); "
          f"greedy token agreement {agree:.3f} (printed only)")
    assert err < 3e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_tp_greedy_on_nccl(tiny_ckpt, tmp_path):
    """FSDP2 + the tensor-parallel rollout copy over NCCL (torchrun, 2 ranks, fp32) decode the greedy tokens of
    one GPU, each rank its own 2 rows. Proves: the NCCL process group (cpu:gloo,cuda:nccl), FSDP2's loading on
    CUDA, tp.refresh's all-to-all and the decode loop's collectives on GPUs."""
    out = str(tmp_path / "tokens")
    # a 3-minute collective timeout, and the whole job in a session of its own: a hung rank is killed with the
    # launcher, not left holding its GPU (and skewing the memory and speed tests) for the default 60 minutes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.dirname(__file__)]), "NANOR1V_TIMEOUT_MIN": "3"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(os.path.dirname(__file__), "nccl_worker.py"), tiny_ckpt, out]
    job = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        assert job.wait(timeout=300) == 0, "torchrun failed: its ranks' errors are above"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    ref = SkyworkR1V.from_pretrained(tiny_ckpt, device=DEV)
    ids, mask = prompts(ref.config, DEV)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=-1).cpu()
    got = torch.cat([torch.load(f"{out}.{r}") for r in range(2)])
    print(f"\n[nccl] 2 ranks, FSDP2 + TP: {got.shape[0]} rows x 16 greedy tokens equal one GPU's: "
          f"{torch.equal(got, want)}")
    assert torch.equal(got, want)


def test_compiled_decode_one_graph_and_cuda_graphs(tiny_ckpt):
    """model.generate(..., compile=True) on CUDA: the same greedy tokens as eager; exactly one dynamo graph for the
    run (no recompiles as the cache fills), none more for a second run with other prompt lengths and fewer rows
    (they fit the kept cache, generate.py; more rows or a longer run would grow it: one new graph); and inductor
    records CUDA graphs for it (no "cudagraph skipped" reason, e.g. mutated inputs, and a recorded tree node). In
    fp32, so that eager and compiled tokens can be compared exactly (inductor's fusions round bf16 differently, and
    a random model has near-ties). Proves: --compile gives the speed it is for (one graph replay per token) and not
    other tokens."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees
    torch._dynamo.reset()
    counters.clear()
    model = SkyworkR1V.from_pretrained(tiny_ckpt, dtype=torch.float32, device=DEV)
    graphs = []
    for n in (4, 3):  # two runs: other row counts and prompt lengths, the second within the first's cache
        ids, mask = prompts(model.config, DEV, n=n)
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=-1)
        compiled = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=-1, compile=True)
        assert torch.equal(compiled, eager), n
        graphs.append(counters["stats"]["unique_graphs"])
    manager = cudagraph_trees.get_manager(DEV.index or 0, create_if_none_exists=False)
    recorded = 0 if manager is None or manager.roots is None else sum(len(v) for v in manager.roots.values())
    skips = counters["inductor"]["cudagraph_skips"]
    print(f"\n[compile] dynamo graphs after run 1, run 2: {graphs} (want [1, 1]); CUDA graph roots recorded: "
          f"{recorded} (want >= 1); cudagraph skips: {skips} (want 0)")
    assert graphs == [1, 1] and skips == 0 and recorded >= 1


def test_masked_gqa_attention_avoids_the_math_kernel(small_ckpt):
    """Attention with padding masks and grouped KV heads runs with only the fused kernels allowed (flash,
    memory-efficient, cuDNN): a left-padded generate (prefill + decode), a masked training forward + backward (GRPO's
    log-prob passes) and SFT's right-padded one without a mask (causal, enable_gqa: sft.py passes no mask) in bf16
    must not raise "No available kernel". Proves: no [B,H,T,T] fp32 score matrix (the math kernel's, 43 GB per
    layer for 4 x 8K tokens on the 38B) in rollouts or training."""
    model = SkyworkR1V.from_pretrained(small_ckpt, dtype=torch.bfloat16, device=DEV)
    ids, mask = prompts(model.config, DEV)
    right = torch.zeros_like(ids)
    lengths = mask.sum(1)
    for i, n in enumerate(lengths.tolist()):  # the same rows, right-padded as sft.make_batch pads
        right[i, :n] = ids[i, ids.shape[1] - n:]
    rmask = (torch.arange(ids.shape[1], device=DEV)[None] < lengths[:, None]).long()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=-1)
        model(right, attention_mask=rmask).float().mean().backward()
        model(right).float().mean().backward()
    print("\n[attention] left-padded generate, masked and unmasked (SFT) training forward/backward ran on fused "
          "kernels only")


def test_grpo_update_memory_within_10_percent_of_plan(small_ckpt):
    """One GRPO update step on one GPU at the plan's GRPO recipe shapes (2,048-token sequence with one tile, a
    1,024-token response through lm_head, bf16 autocast, activation checkpointing, bf16 Adam moments, training
    the decoder and connector): torch.cuda.max_memory_allocated is within 10% of plan.py's formula for the
    update phase ("train"). The second update is measured: AdamW makes its moments in the first step, after the
    backward's peak, and the plan counts them held, as they are from then on. Proves: the memory plan that sizes
    the 38B runs describes the real allocator."""
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    ctx = Context(DEV, dtype=torch.bfloat16)
    recipe = next(r for r in planner.recipes(seq=2048, tiles=1, prompt=1024) if r.name == "GRPO")
    model = load(small_ckpt, ctx, train="llm,connector", grad_checkpointing=True)
    opt = make_optimizer(model, lr=1e-6, moments_dtype=torch.bfloat16)
    cfg = model.config
    ids = torch.randint(0, 600, (1, recipe.seq), device=DEV)
    ids[0, 2:2 + cfg.num_image_token] = cfg.img_context_token_id
    pv = torch.randn(1, 3, 448, 448, device=DEV)
    prompt = recipe.seq - recipe.head_tokens
    for update in range(2):
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with autocast(ctx):
            h = model(ids, pv, return_hidden=True)[:, prompt - 1:-1]
            logp = token_logprobs_and_entropy(model.language_model.lm_head, h, ids[:, prompt:])[0]
        (-logp.mean()).backward()
        opt.step()
        del h, logp
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    planned = planner.plan(cfg, 1, recipe, grad_ckpt=True, bf16_moments=True, act_bytes=2)["train"]
    print(f"\n[memory] GRPO update, one GPU: max_memory_allocated {measured / 1e9:.3f} GB, plan {planned / 1e9:.3f} "
          f"GB, ratio {measured / planned:.3f} (limit 0.90-1.10)")
    assert abs(measured / planned - 1) <= 0.10


def test_decode_speed_and_training_mfu_next_to_roofline(small_ckpt):
    """Decode tokens/s (batch 8, 256-token prompts, 128 new tokens, bf16, eager) next to its HBM roofline (every
    step reads the bf16 weights and the KV cache once), and one training step's MFU (6 x trained parameters x
    tokens + attention / time / the datasheet's dense bf16 peak). Printed, not asserted beyond sanity: the numbers
    to compare runs and machines by."""
    hw = Hardware()
    model = SkyworkR1V.from_pretrained(small_ckpt, dtype=torch.bfloat16, device=DEV)
    cfg = model.config.llm
    ids = torch.randint(0, 600, (8, 256), device=DEV)
    model.generate(ids, max_new_tokens=8, eos_token_id=-1)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=128, eos_token_id=-1)
    torch.cuda.synchronize()
    tok_s = 8 * 128 / (time.perf_counter() - t0)
    # embed_tokens is a row lookup: neither read whole per step nor 6 FLOPs a parameter a token (it is 77.7M of
    # the small decoder's ~196M parameters, so counting it would skew both figures by ~1.6x)
    embed = model.language_model.model.embed_tokens.weight
    weights = 2 * sum(p.numel() for p in model.language_model.parameters() if p is not embed)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 8 * (256 + 64)  # mean context
    bound = 8 * hw.hbm_bytes_per_s / (weights + kv)
    print(f"\n[decode] {torch.cuda.get_device_name()}: {tok_s:,.0f} tokens/s (batch 8, eager); HBM roofline "
          f"{bound:,.0f} tokens/s at {hw.hbm_bytes_per_s / 1e12:.2f} TB/s: {100 * tok_s / bound:.1f}% of it")
    del model
    ctx = Context(DEV, dtype=torch.bfloat16)
    model = load(small_ckpt, ctx, train="llm,connector")
    opt = make_optimizer(model, lr=1e-6)
    ids = torch.randint(0, 600, (4, 1024), device=DEV)

    def step():
        with autocast(ctx):
            h = model(ids, return_hidden=True)[:, :-1]
            logp = token_logprobs_and_entropy(model.language_model.lm_head, h, ids[:, 1:])[0]
        (-logp.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / 3
    embed = model.language_model.model.embed_tokens.weight
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad and p is not embed)
    flops = 6 * trained * ids.numel() + 12 * cfg.num_hidden_layers * cfg.hidden_size * ids.shape[1] * ids.numel() / 2
    mfu = flops / sec / hw.flops_per_s
    print(f"[train] step of 4 x 1024 tokens: {sec * 1e3:.1f} ms, {flops / sec / 1e12:.1f} TFLOP/s, MFU "
          f"{100 * mfu:.1f}% of {hw.flops_per_s / 1e12:.0f} TFLOP/s (dense bf16 datasheet peak)")
    assert tok_s > 0 and 0 < mfu < 1
