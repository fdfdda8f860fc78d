"""FSDP2 on CPU: 2 processes, gloo. The sharded model must behave exactly like the single-process one.
All checks run inside one spawn of 2 ranks (starting processes costs more than the checks)."""
import json
import os

import pytest
import torch
import torch.distributed as dist

from model import token_logprobs_and_entropy
from model import SkyworkR1V
from checkpoint import resume, save_checkpoint
from optim import make_optimizer
from parallel import Context, load, setup
from ranks import spawn


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


def worker(rank, ckpt, out, dtype):
    ctx = setup(dtype=dtype)
    check(ctx, ckpt, out) if dtype == "fp32" else check_bf16(ctx, ckpt)


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
    for (name, p), q in zip(reloaded.named_parameters(), sharded.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), name  # the fp32 master weights, from train_state/model
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
    spawn(worker, tiny_ckpt, str(tmp_path / "step1"), dtype)


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


# ------------------------------------------------------------------------------ issue 22: GPU-path fixes on CPU
def offload_worker(rank, ckpt):
    ctx = setup(dtype="fp32")
    check_refresh_after_generate(ctx, ckpt)
    check_offloaded_clip(ctx, ckpt)


def check_refresh_after_generate(ctx: Context, ckpt):
    """tp.refresh right after a no-grad generate (no backward in between): the root FSDP unit (lm_head) is still
    unsharded then, a plain Parameter; refresh must reshard it first ('full_tensor' AttributeError before)."""
    from tp import make_decoder
    ref = SkyworkR1V.from_pretrained(ckpt)
    ids, pv = batch(ref)
    mine = slice(ctx.rank, ctx.rank + 1)
    sharded = load(ckpt, ctx, train="all").eval()
    want = ref.generate(ids[mine], pixel_values=pv[mine], max_new_tokens=5, eos_token_id=-1)
    assert torch.equal(sharded.generate(ids[mine], pixel_values=pv[mine], max_new_tokens=5, eos_token_id=-1), want)
    decoder = make_decoder(sharded, torch.float32)  # the refresh, with the root unit still gathered
    got = sharded.generate(ids[mine], pixel_values=pv[mine], max_new_tokens=5, eos_token_id=-1, decoder=decoder)
    assert torch.equal(got, want)


def check_offloaded_clip(ctx: Context, ckpt):
    """--cpu-offload: FSDP2 keeps gradients on the CPU; clip_grads reduces their norm over ranks (a CPU collective:
    gloo here, the cpu:gloo half of the GPU process group) and returns it on the compute device asked for, so it
    can be stacked with the CUDA loss. The norm equals one process's over the whole batch."""
    from optim import clip_grads
    ref = SkyworkR1V.from_pretrained(ckpt).train()
    ids, pv = batch(ref)
    loss_fn(ref, ids, pv).backward()
    want = clip_grads(ref, 1e9)
    m = load(ckpt, ctx, train="all", cpu_offload=True)
    mine = slice(ctx.rank, ctx.rank + 1)
    loss_fn(m, ids[mine], pv[mine]).backward()
    assert all(p.grad.to_local().device.type == "cpu" for p in m.parameters())
    norm = clip_grads(m, 1e9, device=ctx.device)
    assert norm.device == ctx.device and not hasattr(norm, "full_tensor")
    torch.testing.assert_close(norm, want, rtol=1e-4, atol=0)


def test_refresh_after_generate_and_offloaded_clip(tiny_ckpt):
    spawn(offload_worker, tiny_ckpt)


def test_clip_norm_lands_on_the_compute_device(tiny_ckpt):
    """The norm is computed where the gradients are (CPU under --cpu-offload) and moved to `device`, the device
    of the loss it is stacked with (sft.train_step's one sync): 'meta' stands in for a second device on CPU."""
    from optim import clip_grads
    m = load(tiny_ckpt, Context(torch.device("cpu")), train="connector")
    ids, pv = batch(m)
    loss_fn(m, ids, pv).backward()
    assert clip_grads(m, 1.0, device=torch.device("meta")).device.type == "meta"


def test_setup_process_group_and_allocator(monkeypatch):
    """parallel.setup on GPUs: one process group with gloo for CPU tensors and NCCL for CUDA ones (--cpu-offload's
    CPU gradients need a CPU collective), a timeout from $NANOR1V_TIMEOUT_MIN (default 60 min), and
    expandable_segments in PYTORCH_CUDA_ALLOC_CONF unless the user set it. CUDA is faked, the group recorded."""
    import datetime
    import parallel
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setattr(parallel.atexit, "register", lambda f: None)
    monkeypatch.setattr(parallel, "meshes", lambda *a: (None, None))
    monkeypatch.setattr(torch, "manual_seed", lambda s: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("NANOR1V_TIMEOUT_MIN", raising=False)
    parallel.setup()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert calls == [("cpu:gloo,cuda:nccl", datetime.timedelta(minutes=60))]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    monkeypatch.setenv("NANOR1V_TIMEOUT_MIN", "90")
    parallel.setup()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"  # the user's value stays
    assert calls[-1][1] == datetime.timedelta(minutes=90)
    monkeypatch.setenv("NANOR1V_TIMEOUT_MIN", "soon")
    with pytest.raises(ValueError, match="NANOR1V_TIMEOUT_MIN='soon'"):
        parallel.setup()


def test_export_written_shard_by_shard(tmp_path, monkeypatch):
    """save_state_dict writes each shard as soon as it is full: the bytes handed to it and not yet written never
    exceed one shard plus the tensor in hand (rank 0 exporting the 38B holds 5 GB, not 77). Events are recorded
    in order: every tensor yielded, every file written. Fails if the shards are collected first, written after."""
    import checkpoint
    from safetensors.torch import load_file
    events, real_save = [], checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda t, *a, **kw: events.append(("write", list(t))) or
                        real_save(t, *a, **kw))

    def tensors():
        for i in range(40):
            t = torch.full((256,), float(i))  # 1 KiB each, 40 KiB in all
            events.append(("yield", t.numel() * t.element_size()))
            yield f"w{i}", t

    checkpoint.save_state_dict(tensors(), {"x": 1}, str(tmp_path / "out"), max_shard_bytes=4096)
    held = peak = 0
    for kind, what in events:
        held = held + what if kind == "yield" else 0
        peak = max(peak, held)
    assert peak <= 4096 + 1024 and sum(kind == "write" for kind, _ in events) == 10, events
    files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert files[0] == "model-00001-of-00010.safetensors" and len(files) == 10
    got = {k: v for f in files for k, v in load_file(str(tmp_path / "out" / f)).items()}
    assert all(torch.equal(got[f"w{i}"], torch.full((256,), float(i))) for i in range(40))


def test_export_in_the_release_dtype_and_resume_exact(tiny_ckpt, tmp_path):
    """A run that starts from a bf16 checkpoint (as the release is) exports bf16 (half the bytes of the fp32
    master weights), and resuming from that export still restores the trained fp32 weights bit for bit (from
    train_state/model). Fails if the export is the fp32 master copy, or if resume trusts the rounded export."""
    from safetensors import safe_open
    ctx = Context(torch.device("cpu"))
    SkyworkR1V.from_pretrained(tiny_ckpt).save_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    m = load(str(tmp_path / "bf16"), ctx, train="connector")
    opt = make_optimizer(m, lr=1e-2)
    ids, pv = batch(m)
    loss_fn(m, ids, pv).backward()
    opt.step()  # the connector's fp32 weights now differ from any bf16 value
    out = str(tmp_path / "step1")
    save_checkpoint(out, m, opt, step=1)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    for f in set(index.values()):
        with safe_open(os.path.join(out, f), "pt") as g:
            assert all(g.get_slice(k).get_dtype() == "BF16" for k in g.keys())
    again = load(out, ctx, train="connector")
    assert not all(torch.equal(p, q) for p, q in zip(again.mlp1.parameters(), m.mlp1.parameters()))  # rounded
    resume(out, again, make_optimizer(again, lr=1e-2))
    for (name, p), q in zip(again.named_parameters(), m.parameters()):
        assert torch.equal(p, q), name
