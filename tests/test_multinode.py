"""Beyond one node on CPU: 4 gloo ranks as 2 "nodes" of 2 (LOCAL_WORLD_SIZE=2), HSDP with --replicate 2 and
tensor-parallel rollout groups per node; --replicate 1 (full sharding over the 4 ranks, a rollout group of 2
inside a shard group of 4) beside it. One spawn runs every check (starting 4 processes on a shared 2-core machine
costs more than the checks); the layout errors run without any process group."""
import os
import subprocess
import sys

import pytest
import torch

import model as model_py
from checkpoint import resume, save_checkpoint
from data import Tokenizer, left_pad
from grpo import GRPOConfig, Prompt, Sample, make_batch, optimise
from model import SkyworkR1V
from optim import make_optimizer
from parallel import Context, LayoutFlags, load, resolve, setup
from ranks import spawn
from test_tp import expected_slice
from tp import make_decoder, refresh

WORLD, NODE = 4, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


# ------------------------------------------------------------------------------------------------ the rollout
def my_prompts(model, rank: int):
    """Rows per rank 1, 2, 1, 1 (groups of 2: 3 rows and 2), each rank its own lengths; rank 2's row holds an
    image, so the ViT runs on one rank's tiles while the others run it on none."""
    g = torch.Generator().manual_seed(100 + rank)
    rows = [torch.randint(0, 400, (n,), generator=g).tolist() for n in [(5,), (7, 4), (6,), (3,)][rank]]
    pixels = None
    if rank == 2:
        rows[0][1:1] = [model.config.img_context_token_id] * model.config.num_image_token
        pixels = torch.randn(1, 3, 448, 448, generator=g)
    ids, mask = left_pad(rows, 0)
    return ids, mask, pixels


def check_rollout(ctx, ref, sharded):
    """Each tensor-parallel group decodes its own ranks' rows, once, and gets one process's greedy tokens."""
    decoder = make_decoder(sharded, torch.float32)
    T = ctx.layout.tp_size
    assert (decoder.tp_size, decoder.tp_rank) == (T, ctx.rank % T)
    ids, mask, pix = my_prompts(ref, ctx.rank)
    real, decoded = model_py.Qwen2ForCausalLM.decode, []

    def counting(self, x, *args, **kw):  # the decode loop TPDecoder.decode runs on the rows it gathered
        decoded.append(x.shape[0])
        return real(self, x, *args, **kw)
    model_py.Qwen2ForCausalLM.decode = counting
    try:
        got = sharded.generate(ids, pix, mask, max_new_tokens=6, decoder=decoder)
    finally:
        model_py.Qwen2ForCausalLM.decode = real
    assert torch.equal(got, ref.generate(ids, pix, mask, max_new_tokens=6)), ctx.rank
    counts = [len(my_prompts(ref, r)[0]) for r in range(WORLD)]
    group = ctx.rank // T
    assert decoded == [sum(counts[group * T:(group + 1) * T])], (ctx.rank, decoded)  # its group's rows, no other
    return decoder


def check_refresh(ctx, decoder, sharded):
    assert refresh(decoder, sharded) >= 0
    tp, rows = dict(decoder.named_parameters()), decoder.model.embed_tokens.weight.shape[0]
    for name, p in sharded.language_model.named_parameters():
        want = expected_slice(name, p.full_tensor(), decoder.tp_rank, rows, decoder.tp_size)
        assert torch.equal(tp[name], want), (ctx.rank, name)


# ---------------------------------------------------------------------------------------------- the GRPO step
def grpo_batch(ckpt, m, ctx):
    """4 problems (one with an image) x G = 2 responses of 5 tokens; rank r gets problem r's group. Equal response
    lengths: the token mean of the whole batch is then the mean of the ranks' token means."""
    tok = Tokenizer.from_dir(ckpt)
    g = torch.Generator().manual_seed(5)
    prompts = {}
    for i in range(4):
        ids = torch.randint(0, 400, (6 + i,), generator=g)
        pixels = torch.randn(1, 3, 448, 448, generator=g) if i == 1 else None
        if pixels is not None:
            ids = torch.cat([ids[:2], torch.full((m.config.num_image_token,), m.config.img_context_token_id), ids[2:]])
        with torch.no_grad():
            vit = m.vit_features((pixels if pixels is not None else torch.zeros(0, 3, 448, 448)).to(ctx.device))
        prompts[i] = Prompt(ids, pixels, vit)
    samples = [Sample(i, torch.randint(0, 400, (5,), generator=g)) for i in range(4) for _ in range(2)]
    return samples, torch.linspace(-1, 1, 8), prompts, tok.pad_id


def grpo_step(ckpt, m, opt, ctx, share: slice, adv_scale=1.0) -> dict:
    """One on-policy GRPO optimizer step (grpo.optimise) on `share` of the batch, clipping active."""
    samples, adv, prompts, pad_id = grpo_batch(ckpt, m, ctx)
    cfg = GRPOConfig(ckpt=ckpt, group_size=2, ppo_epochs=1, minibatch_size=8, micro_batch_size=1, grad_clip=CLIP)
    batch = make_batch(samples[share], (adv[share] * adv_scale).tolist(), prompts, pad_id, m.config.img_context_token_id)
    return optimise(m, opt, batch, cfg, ctx, torch.Generator().manual_seed(1))


# The step is measured as the change of the parameters, so it must be large next to their rounding: SGD with a
# large rate (update = LR x clipped gradient; at lr 1 the smallest tensors' updates are ~1e-4 of their weights and
# the float32 rounding of the weights alone shows at 1e-4 of the update)
LR, CLIP = 1e3, 0.5


def single_process_step(ckpt) -> tuple[dict, dict]:
    """-> ({name: SGD update}, metrics) of one process on the whole batch."""
    m = SkyworkR1V.from_pretrained(ckpt).train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    metrics = grpo_step(ckpt, m, torch.optim.SGD(m.parameters(), lr=LR), Context(torch.device("cpu")), slice(0, 8))
    return {n: p.detach() - before[n] for n, p in m.named_parameters()}, metrics


def check_step(ctx, ckpt, sharded, want: dict, want_metrics: dict):
    """The sharded step on this rank's 2 samples == one process's step on all 8 (1e-5 relative, fp32)."""
    sharded.reshard()  # after the rollout's no-grad forward the root unit is still gathered (resharded_parameters)
    before = {n: full(p).detach().clone() for n, p in sharded.named_parameters()}
    metrics = grpo_step(ckpt, sharded, torch.optim.SGD(sharded.parameters(), lr=LR), ctx,
                        slice(2 * ctx.rank, 2 * ctx.rank + 2))
    assert want_metrics["grad_norm"] > CLIP  # the clip acts: the global norm over shards and replicas is used
    assert metrics["grad_norm"] == pytest.approx(want_metrics["grad_norm"], rel=1e-5)
    moved = 0
    for name, p in sharded.named_parameters():
        got, ref = full(p).detach() - before[name], want[name]
        # the relative error of the whole update (Frobenius norms), not of its largest element: the connector's
        # LayerNorm weight sums per-token terms that cancel (GRPO's advantages sum to zero in a group), so its
        # largest element alone shows the shards' other summation order at 1.1e-5 on an AMD EPYC (5e-6 in norm)
        assert (got - ref).norm() <= 1e-5 * ref.norm(), (ctx.rank, name, ((got - ref).norm() / ref.norm()).item())
        moved += bool(ref.abs().max() > 0)
    assert moved > 20  # decoder and connector moved (the ViT has no gradient: its features are the step's)
    return {n: full(p).detach().clone() for n, p in sharded.named_parameters()}


def check_resume(ctx, ckpt, out):
    """Save after a step, take the next one; a run resumed from the save takes the same next step, bit for bit."""
    m = load(ckpt, ctx, train="all")
    opt = make_optimizer(m, lr=1e-3)
    mine = slice(2 * ctx.rank, 2 * ctx.rank + 2)
    grpo_step(ckpt, m, opt, ctx, mine)
    save_checkpoint(out, m, opt, step=1)
    grpo_step(ckpt, m, opt, ctx, mine, adv_scale=-0.5)
    again = load(out, ctx, train="all")
    opt2 = make_optimizer(again, lr=1e-3)
    assert resume(out, again, opt2)[0] == 1
    grpo_step(ckpt, again, opt2, ctx, mine, adv_scale=-0.5)
    for (name, p), q in zip(m.named_parameters(), again.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), (ctx.rank, name)


# ---------------------------------------------------------------------------------------------------- the run
def worker(rank, ckpt, out):
    hsdp = setup(dtype="fp32", layout=LayoutFlags(replicate=2))
    sharding = setup(dtype="fp32", layout=LayoutFlags(replicate=1, tp_size=2))  # full sharding over the 4
    ref = SkyworkR1V.from_pretrained(ckpt)
    want, want_metrics = single_process_step(ckpt)
    assert hsdp.layout == (2, 2) and hsdp.mesh.mesh_dim_names == ("replicate", "shard")
    assert sharding.layout == (1, 2) and sharding.mesh.mesh_dim_names == ("shard",)
    results = {}
    for ctx in (hsdp, sharding):
        sharded = load(ckpt, ctx, train="all")
        if ctx is hsdp:  # loading: each rank holds its shard group's rows; the two replicas the same ones
            p = sharded.language_model.model.layers[0].mlp.down_proj.weight
            s = rank % NODE
            assert torch.equal(p.to_local(), ref.language_model.model.layers[0].mlp.down_proj.weight.chunk(NODE)[s])
        decoder = check_rollout(ctx, ref, sharded)
        results[ctx.layout] = check_step(ctx, ckpt, sharded, want, want_metrics)
        check_refresh(ctx, decoder, sharded)
    # --replicate 1 is the sharding of one node exactly: the same step as the mesh FSDP made before layouts
    today = Context(sharding.device, rank, WORLD, torch.float32)  # no mesh: shard() builds the flat one
    again = check_step(today, ckpt, load(ckpt, today, train="all"), want, want_metrics)
    assert all(torch.equal(again[n], t) for n, t in results[(1, 2)].items())
    check_resume(hsdp, ckpt, out)


def test_two_nodes_of_two(tiny_ckpt, tmp_path):
    spawn(worker, tiny_ckpt, str(tmp_path / "step1"), world=WORLD, node=NODE)


# ------------------------------------------------------------------------------------------------ bad layouts
@pytest.mark.parametrize("env, argv, message", [
    ((4, 2), ["--replicate", "3"], "--replicate 3 must divide the world size 4"),
    ((4, 2), ["--tp-size", "4"], r"--tp-size 4 must divide the shard group \(4 ranks / --replicate 2 = 2\) and the "
                                 r"ranks of one node \(2\)"),
    ((4, 4), ["--replicate", "2", "--tp-size", "4"], r"--tp-size 4 must divide the shard group .* = 2\)"),
    ((1, 1), ["--replicate", "2"], "--replicate 2 must divide the world size 1"),
    ((4, 4), ["--tp-size", "4", "--ckpt", "{ckpt}"], r"over 4 ranks \(--tp-size\) needs llm_config.num_key_value_heads "
                                                     r"\(2\) divisible by 4"),
])
@pytest.mark.parametrize("script", ["grpo", "sft", "sample", "entropy"])
def test_layout_that_does_not_fit_is_one_line(tiny_ckpt, monkeypatch, capsys, script, env, argv, message):
    """Parsed under torchrun's environment for 4 ranks, before any process group or weight: one line, exit 2."""
    import importlib
    if "{ckpt}" in argv and script in ("sft", "entropy"):
        pytest.skip("no rollout copy: the heads are not its concern")
    monkeypatch.setenv("WORLD_SIZE", str(env[0]))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(env[1]))
    argv = [a.format(ckpt=tiny_ckpt) for a in argv]
    argv += {"entropy": ["--ckpts", "x", "--data", os.path.join(ROOT, "README.md")]}.get(script, [])
    if script == "sample" and "--ckpt" not in argv:
        argv += ["--ckpt", tiny_ckpt]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err


def test_layout_error_from_the_command_line(tiny_ckpt):
    """The real command under a 2-node job's environment, without torchrun: the error comes before the process
    group would be joined (no MASTER_ADDR here: joining would fail with a traceback instead)."""
    env = {**os.environ, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None)
    r = subprocess.run([sys.executable, "grpo.py", "--ckpt", tiny_ckpt, "--replicate", "3"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--replicate 3 must divide the world size 4" in r.stderr


def test_default_layout():
    assert resolve(None, 1, 1) == (1, 1)
    assert resolve(None, 8, 8) == (1, 8)            # one node: full sharding, a rollout copy over the node
    assert resolve(None, 16, 8) == (2, 8)           # two nodes: HSDP, a rollout copy per node
    assert resolve(None, 32, 8) == (4, 8)
    lay = type("L", (), {"replicate": 1, "tp_size": 0})()
    assert resolve(lay, 16, 8) == (1, 8)            # full sharding over both nodes, the copy still per node
    lay.tp_size = 2
    assert resolve(lay, 16, 8) == (1, 2)            # e.g. InternVL3-2B: 2 KV heads
