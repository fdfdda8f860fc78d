"""FSDP2 on CPU: 2 processes, gloo. The sharded model must behave exactly like the single-process one.
All checks run inside one spawn of 2 ranks (starting processes costs more than the checks)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import token_logprobs_and_entropy
from model import SkyworkR1V
from checkpoint import resume, save_checkpoint
from optim import make_optimizer
from parallel import Context, load, setup

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(model, n=2, t=24):
    g = torch.Generator().manual_seed(7)
    ctx_id, k = model.config.img_context_token_id, model.config.num_image_token
    ids = torch.randint(0, 400, (n, t + k), generator=g)
    ids[:, 3:3 + k] = ctx_id  # one tile per row
    return ids, torch.randn(n, 3, 448, 448, generator=g)


def loss_fn(model, ids, pv):
    """Next-token loss through the training path of sft.py / grpo.py: hidden states, then lm_head chunk by chunk
    (outside the root FSDP unit's forward, so this also checks that lm_head's gathered weight is used right)."""
    h = model(ids, pixel_values=pv, return_hidden=True)
    logp, _ = token_logprobs_and_entropy(model.language_model.lm_head, h[:, :-1], ids[:, 1:], chunk=64)
    return -logp.mean()


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def worker(rank, ckpt, out, port, dtype):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = setup(dtype=dtype)
    try:
        check(ctx, ckpt, out) if dtype == "fp32" else check_bf16(ctx, ckpt)
    finally:
        dist.destroy_process_group()


def check(ctx: Context, ckpt, out):
    ref = SkyworkR1V.from_pretrained(ckpt).train()
    ids, pv = batch(ref)
    sharded = load(ckpt, ctx, train="all")
    assert any(hasattr(p, "full_tensor") for p in sharded.parameters())
    uneven = sharded.vision_model.embeddings.class_embedding  # dim 0 is 1: rank 1 holds no rows at all
    assert uneven.to_local().shape[0] == (1 if ctx.rank == 0 else 0)

    # 1. generation, before any forward (generate must gather the root unit itself): rank 0 hits EOS at once,
    # rank 1 runs on; rank 0 must keep joining the all-gathers
    mine = slice(ctx.rank, ctx.rank + 1)
    with torch.no_grad():
        first = ref.generate(ids[:1], pixel_values=pv[:1], max_new_tokens=1)[0, -1].item()
        eos = first if ctx.rank == 0 else -1
        seq = sharded.generate(ids[mine], pixel_values=pv[mine], max_new_tokens=8, eos_token_id=eos)
        assert torch.equal(seq, ref.generate(ids[mine], pixel_values=pv[mine], max_new_tokens=8, eos_token_id=eos))
        # the ranks stepped together until the last row finished; each rank's rows are cut where they finished
        assert seq.shape[1] == ids.shape[1] + (1 if ctx.rank == 0 else 8)
        assert ctx.rank == 1 or (seq[0, ids.shape[1]:] == first).all()  # rank 0: EOS, then EOS padding

    # 2. same logits as one process (each rank runs its own row)
    with torch.no_grad():
        got = sharded(ids[mine], pixel_values=pv[mine])
        torch.testing.assert_close(got, ref(ids[mine], pixel_values=pv[mine]), rtol=1e-5, atol=1e-5)

    # 3. one AdamW step on half the batch per rank == one step on the whole batch in one process
    opt_ref, opt = make_optimizer(ref, lr=1e-2), make_optimizer(sharded, lr=1e-2)
    loss_fn(ref, ids, pv).backward()
    opt_ref.step()
    loss_fn(sharded, ids[mine], pv[mine]).backward()
    opt.step()
    # Adam's first step moves every element by ~lr * g/|g|: where |g| is near eps, float rounding of the reduced
    # gradient shows; atol 1e-4 is 1% of one step (the gradients themselves agree to ~1e-6 relative).
    for (name, p), q in zip(sharded.named_parameters(), ref.parameters()):
        torch.testing.assert_close(full(p), q, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
        assert (full(p) - q).abs().mean() < 1e-6, name

    # 4. sharded save -> single-process reload is bit-identical; training state round-trips
    save_checkpoint(out, sharded, opt, step=1, extra={"note": "x"})
    again = SkyworkR1V.from_pretrained(out)
    for (name, p), q in zip(sharded.named_parameters(), again.parameters()):
        assert torch.equal(full(p).detach(), q), name
    reloaded = load(out, ctx, train="all")
    opt2 = make_optimizer(reloaded, lr=1e-2)
    step, extra, _ = resume(out, reloaded, opt2)
    assert (step, extra) == (1, {"note": "x"})
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"].to_local(), b["exp_avg"].to_local())

    # 5. freezing: train only the connector; everything else stays bit-identical, optimizer holds only mlp1
    frozen = load(ckpt, ctx, train="connector")
    before = {n: full(p).detach().clone() for n, p in frozen.named_parameters()}
    opt3 = make_optimizer(frozen, lr=1e-2)
    assert {id(p) for p in opt3.param_groups[0]["params"]} == {id(p) for p in frozen.mlp1.parameters()}
    for _ in range(2):
        loss_fn(frozen, ids[mine], pv[mine]).backward()
        opt3.step()
        opt3.zero_grad()
    for n, p in frozen.named_parameters():
        same = torch.equal(full(p).detach(), before[n])
        assert same != n.startswith("mlp1."), n
        assert p.grad is None or n.startswith("mlp1."), n


def check_bf16(ctx: Context, ckpt):
    """bf16 MixedPrecisionPolicy (the GPU setting) on CPU: bf16 compute, fp32 master weights and gradients."""
    ref = SkyworkR1V.from_pretrained(ckpt)
    ids, pv = batch(ref)
    m = load(ckpt, ctx)
    assert ctx.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in m.parameters())
    mine = slice(ctx.rank, ctx.rank + 1)
    with torch.no_grad():
        low, high = m(ids[mine], pixel_values=pv[mine]), ref(ids[mine], pixel_values=pv[mine])
    assert low.dtype == torch.bfloat16
    with torch.no_grad():
        out = m.generate(ids[mine], pixel_values=pv[mine], max_new_tokens=4, eos_token_id=-1)  # bf16 KV cache
    assert out.shape[1] == ids.shape[1] + 4
    assert ((low.float() - high).abs().max() / high.abs().max()) < 3e-2
    loss_fn(m, ids[mine], pv[mine]).backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fsdp_two_ranks_match_one_process(tiny_ckpt, tmp_path, dtype):
    mp.spawn(worker, args=(tiny_ckpt, str(tmp_path / "step1"), free_port(), dtype), nprocs=WORLD, join=True)


def test_resume_refuses_other_world_size(tiny_ckpt, tmp_path):
    ctx = Context(torch.device("cpu"))
    m = load(tiny_ckpt, ctx, train="connector")
    opt = make_optimizer(m, lr=1e-3)
    out = str(tmp_path / "state")
    save_checkpoint(out, m, opt, step=3)
    meta = os.path.join(out, "train_state", "trainer_state.json")
    with open(meta) as f:
        text = f.read().replace('"world_size": 1', '"world_size": 8')
    with open(meta, "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match="saved by 8 rank.*resumed with 1"):
        resume(out, m, opt)


def test_bf16_moment_adamw_tracks_fp32_adamw(tiny_ckpt):
    ctx = Context(torch.device("cpu"))
    models = [load(tiny_ckpt, ctx, train="connector") for _ in range(2)]
    opts = [make_optimizer(models[0], lr=1e-3), make_optimizer(models[1], lr=1e-3, moments_dtype=torch.bfloat16)]
    ids, pv = batch(models[0])
    for _ in range(3):
        for m, opt in zip(models, opts):
            loss_fn(m, ids, pv).backward()
            opt.step()
            opt.zero_grad()
    assert opts[1].state[next(models[1].mlp1.parameters())]["exp_avg"].dtype == torch.bfloat16
    start = SkyworkR1V.from_pretrained(tiny_ckpt).mlp1
    for p, q, p0 in zip(models[0].mlp1.parameters(), models[1].mlp1.parameters(), start.parameters()):
        moved = (p - p0).abs().max()
        assert moved > 1e-4 and (p - q).abs().max() < 0.05 * moved  # same update up to bf16 rounding of moments
