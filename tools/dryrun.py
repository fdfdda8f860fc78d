"""A dry run of the real training code at full scale, without GPUs: fake tensors on a fake process group.

    python -m tools.plan --trace               # the 38B on 8 fake GPUs, every recipe, next to plan.py's formula
    python -m tools.plan --trace --nodes 2     # 2 nodes of 8 (16 fake ranks): HSDP, then full FSDP

plan.py computes memory per GPU from a formula; this file runs the code instead and counts. One process plays rank
0 of a fake group of nodes x gpus ranks (torch's FakeStore + the "fake" backend: every collective returns tensors
of the right shape and does nothing), with parallel.py's meshes over it (parallel.meshes: one node's ranks per
shard group under HSDP, all of them under full FSDP; a tensor-parallel group per node), so `fully_shard` really
shards for 8, 16 or 32 ranks. Under FakeTensorMode every tensor has a shape, a dtype and a device but no storage:
the 38B's forward, backward, clipping, AdamW step and generation run in a few hundred MB of host memory (timings:
docs/memory.md), through the same functions the scripts call (sft.sft_loss, grpo.make_batch, response_logprobs and
grpo_loss, rollout.vit_once, SkyworkR1V.generate with tp.py's decoder, optim.clip_grads and the optimizers,
tp.refresh). FSDPMemTracker (torch.distributed._tools, which torchtitan uses
for its memory estimation) watches every op and keeps the live tensor bytes by category; the peak is what a GPU
would hold at that moment.

What a trace needs from the code: no host syncs on the hot path (a fake tensor has no value to read, so `.item()`,
`bool(t)` or boolean-mask indexing raise), and the few values that generation reads on the host answered here
(`dry_run_answers`). What it cannot see: the CUDA context and NCCL's buffers, the caching allocator's reserved and
fragmented blocks, and kernels that differ between this CPU trace and a GPU (CPU SDPA keeps no T x T matrix; a
masked GQA call on a GPU may fall back to the math kernel, which does). Leave a margin: the default GRPO recipe
targets <= 70 of 80 GB (docs/memory.md). The same steps on real tensors in a real gloo group (fake=False) give the
same peaks: tests/test_dryrun.py.
"""
import itertools
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType

from data import left_pad
from grpo import GRPOConfig, Prompt, Sample, grpo_loss, make_batch, response_logprobs
from model import R1VConfig, SkyworkR1V
from optim import PARTS, clip_grads, freeze, make_optimizer
from parallel import Context, Layout, autocast, meshes, resolve, shard
from rollout import vit_once
from sft import sft_loss
from tp import TPDecoder, refresh
from tools import ROOT

COLUMNS = {  # FSDPMemTracker category -> column. The model has no buffers (RoPE is computed per forward), so
    # "Buffer" is free for the one module outside FSDP: tp.py's rollout copy (GRPO's rollout phase)
    "Sharded Param": "weights", "Sharded Grad": "grads", "Unsharded Grad": "grads", "OptState": "adam",
    "Buffer": "tp_copy", "Activation": "acts", "Inputs": "acts", "Temp": "temps",
    "Unsharded Param": "gathered", "All Gather": "gathered", "Reduce Scatter": "gathered"}


@dataclass
class Shape:
    """One GPU's work. The defaults are grpo.py's at 38B scale (sft.py's micro-batch is the same)."""
    seq: int = 8192          # tokens per sequence, prompt included
    prompt: int = 2048       # GRPO: prompt tokens (image tokens included); the response is the rest
    micro_batch: int = 1     # sequences per forward/backward
    rollout_seqs: int = 8    # sequences per generate call per GPU (grpo --rollout_batch_size)
    group: int = 8           # GRPO samples per prompt: each call prefills rollout_seqs // group prompts once
    step_prompts: int = 8    # GRPO prompts per GPU per step (64 / 8 GPUs): their ViT features live all step
    tiles: int = 7           # image tiles per sequence (256 tokens each)
    chunk: int = 1024        # tokens per lm_head chunk of the log-probs (--logprob_chunk)


# ------------------------------------------------------------------------------------------------ the tracker
def fake_group(world: int):
    """Join a fake process group of `world` ranks as rank 0. A process group is global state: a fake one of another
    size is left first (it holds no connections); a real one is refused."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized() and dist.get_world_size() != world:
        if dist.get_backend() != "fake":
            raise RuntimeError(f"this process is already in a group of {dist.get_world_size()} ranks, not {world}")
        dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())


class PeakTracker(FSDPMemTracker):
    """FSDPMemTracker keeping only the global peak, the peak of each stage (forward, backward, optimizer step) and
    where the peak happened. The stock tracker also updates a peak per active module after every op, O(modules)
    per op: ~1,000 modules x ~10^5 ops for the 38B, longer than the trace itself."""

    def __init__(self, model, opt, copy=None):
        super().__init__(model, opt)
        self.stages, self.peak_at = {}, ""
        for p in copy.parameters() if copy is not None else ():
            # known before it is used: else the first view of a weight (F.linear's transpose) would file it as an
            # activation
            self._update_and_maybe_create_winfos(p, _FSDPRefType.BUFFER)

    def _update_peak_stats(self, peak_state):
        for dev, snap in self._curr_mem_snap.items():
            stage = "optimizer step" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"
            self.stages[stage] = max(self.stages.get(stage, 0), snap["Total"])
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)
                # in backward the autograd engine calls the ops: name the innermost module instead
                module = max(self._mod_tracker.parents, key=len).split(".", 1)[-1]  # minus the root's class
                where = module if stage == "backward" else caller() or module.replace("Global", "")
                self.peak_at = f"{stage}, {where}".rstrip(", ")

    def _fsdp_state_pre_forward(self, fsdp_mod, orig_pre_forward):
        # generate() runs every unit once per token, which the stock tracker takes for a second training iteration
        # and refuses; per-module statistics are not kept here, so the unit's record simply starts afresh
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig_pre_forward)

        def pre_forward(*args, **kwargs):
            if not self._mod_tracker.is_bw:
                self.memory_tracking.pop(fsdp_mod, None)
            return inner(*args, **kwargs)
        return pre_forward

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig_post_backward):
        # a unit that did not run forward while tracked (the frozen ViT, when GRPO trains on the step's features)
        # has no record, which the stock tracker looks up; it has no gradient to reduce either: FSDP's own hook
        inner = super()._fsdp_param_group_post_backward(fsdp_mod, orig_post_backward)

        def post_backward(*args, **kwargs):
            return (inner if fsdp_mod in self.memory_tracking else orig_post_backward)(*args, **kwargs)
        return post_backward

    def result(self, opt) -> dict:
        """The peak in bytes by column (+ "peak", "at", and the peak of each stage). The tracker files everything
        made inside the optimizer step as optimizer state: what is not the moments is that step's temporaries."""
        snap = next(iter(self._peak_mem_snap.values()))
        out = dict.fromkeys(COLUMNS.values(), 0)
        for kind, nbytes in snap.items():
            if kind != "Total":
                out[COLUMNS[kind.value]] += nbytes
        moments = sum(local_bytes(v) for st in opt.state.values() for k, v in st.items() if k != "step")
        out["temps"] += out["adam"] - min(out["adam"], moments)
        out["adam"] = min(out["adam"], moments)
        return {**out, "peak": snap["Total"], "at": self.peak_at, "stages": dict(self.stages)}


TOOLS = os.path.join(ROOT, "tools")


def caller() -> str:
    """file:function of the innermost project function on the stack (what allocated the peak's last tensor), or
    "" when there is none."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(ROOT) and not name.startswith(TOOLS):
            return f"{name[len(ROOT) + 1:]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return ""


def local_bytes(x) -> int:
    """Bytes on this rank of a tensor (a DTensor's local shard), or of a module's parameters (a tied matrix once)."""
    if isinstance(x, torch.nn.Module):
        return sum(local_bytes(p) for p in x.parameters())
    x = x.to_local() if hasattr(x, "to_local") else x
    return x.numel() * x.element_size()


# ------------------------------------------------------------------------------------------------ the models
def sharded_model(cfg: R1VConfig, ctx: Context, train: str, grad_ckpt: bool, dtype=torch.float32) -> SkyworkR1V:
    """As parallel.load builds it, minus the weights: meta model in `dtype` (fp32 master weights; a
    frozen reference policy: the compute dtype), frozen parts, activation checkpointing, FSDP2 units over ctx.mesh
    (parallel.shard). Outside FakeTensorMode: fully_shard reads the mesh's values."""
    with torch.device("meta"):
        model = SkyworkR1V(cfg)
    model.to(dtype)
    freeze(model, train)
    model.grad_checkpointing = grad_ckpt
    return shard(model, ctx).train()


def meta_decoder(cfg: R1VConfig, dtype: torch.dtype, ctx: Context) -> TPDecoder:
    """This rank's share of the tensor-parallel copy in its group (ctx.tp_mesh) on the meta device, as
    tp.make_decoder builds it before to_empty."""
    mesh = ctx.tp_mesh
    with torch.device("meta"):
        return TPDecoder(cfg.llm, mesh.get_local_rank(), mesh.size(), mesh.get_group()).to(dtype)


def reference_bytes(cfg: R1VConfig, gpus: int, nodes: int = 1, hsdp: bool = True) -> int:
    """This rank's shards of GRPO's frozen reference policy (bf16, sharded like the policy; never materialised)."""
    return local_bytes(sharded_model(cfg, trace_context(gpus, nodes, hsdp), "none", False, torch.bfloat16))


def trace_context(gpus: int, nodes: int = 1, hsdp: bool = True, fake: bool = True) -> Context:
    """This rank's Context in a (fake, unless fake=False: a group already joined) group of nodes x gpus ranks,
    with the GPU's settings and parallel.py's meshes, as parallel.setup builds them under torchrun with
    LOCAL_WORLD_SIZE = gpus: HSDP (--replicate nodes: a 2-D (replicate, shard) mesh, sharded inside a node) or full
    FSDP (--replicate 1: sharded over every rank); the tensor-parallel group is one node's `gpus` ranks either way.
    The meshes are built here, outside FakeTensorMode (making them reads values)."""
    world = gpus * nodes
    if fake:
        fake_group(world)
    layout = resolve(Layout(replicate=nodes if hsdp else 1, tp_size=gpus), world, local_world=gpus)
    mesh, tp_mesh = meshes("cpu", world, layout)
    return Context(torch.device("cpu"), rank=dist.get_rank(), world=world, dtype=torch.bfloat16, layout=layout,
                   mesh=mesh, tp_mesh=tp_mesh)


# ------------------------------------------------------------------------------------------------ the inputs
def image_prompt(cfg: R1VConfig, rows: int, length: int, tiles: int, pad: int = 0):
    """ids [rows, length] holding `tiles` tiles' <IMG_CONTEXT> tokens after `pad` left-padding columns, attention
    mask (0 on the padding), pixels [rows * tiles, 3, H, W]. Fake tensors ignore the values; a real run (the test
    against gloo) needs them consistent, and padding makes both take the masked attention path."""
    if pad + 1 + tiles * cfg.num_image_token > length:
        raise ValueError(f"{length} tokens cannot hold {tiles} tiles of {cfg.num_image_token} image tokens")
    ids = torch.zeros(rows, length, dtype=torch.long)
    ids[:, pad + 1:pad + 1 + tiles * cfg.num_image_token] = cfg.img_context_token_id
    mask = torch.ones_like(ids)
    mask[:, :pad] = 0
    return ids, mask, torch.zeros(rows * tiles, 3, cfg.force_image_size, cfg.force_image_size)


@contextmanager
def dry_run_answers(decode_steps: int):
    """The two values generation reads on the host, answered by the dry run:
    - "are all rows done?" (generate.decode reads it after the first token and every CHECK_EVERY tokens): no, then
      yes after decode_steps tokens (the KV cache is allocated at full length by the prefill, so more tokens add
      only per-token temporaries);
    - every rank's row count (tp.gather_rows reads it with .tolist()): equal on all ranks here, so only that
      all-gather of the shapes is skipped; the rows themselves are all-gathered as in tp.py."""
    import generate
    import tp

    def gather_rows_alike(tensors, group=None):
        out, rank = [], dist.get_rank(group)
        for z in tensors:
            parts = [torch.empty_like(z) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, z, group=group)
            out.append(torch.cat(parts))
        return out, slice(rank * len(tensors[0]), (rank + 1) * len(tensors[0]))

    names = ("rows_done", "all_ranks_done", "tokens_agree", "CHECK_EVERY")
    calls, saved = itertools.count(), [getattr(generate, n) for n in names] + [tp.gather_rows]
    for name in names[:3]:
        # two reads a call: tokens 1, decode_steps (tokens_agree also gets the tensor-parallel group)
        setattr(generate, name, lambda done, new, **group: next(calls) % 2 == 1)
    generate.CHECK_EVERY, tp.gather_rows = decode_steps, gather_rows_alike
    try:
        yield
    finally:
        *values, tp.gather_rows = saved
        for name, value in zip(names, values):
            setattr(generate, name, value)


# ------------------------------------------------------------------------------------------------- the steps
def optimizer_step(model, opt):
    """Clipping (optim.clip_grads: the norm stays a tensor, no host sync), AdamW, gradients freed. (GRPO then
    rebuilds its rollout copy, grpo.refresh_rollout_copy: after the gradients are freed, below the update's peak.)"""
    clip_grads(model, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def sft_step(model, opt, ctx: Context, s: Shape):
    """sft.train_step on one micro-batch: sft.sft_loss (lm_head over every position, chunked), backward, step."""
    ids, mask, pixels = image_prompt(model.config, s.micro_batch, s.seq, s.tiles, pad=1)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
             "labels": ids.masked_fill(mask == 0, -100)}
    with autocast(ctx):
        loss, _ = sft_loss(model, batch, float(s.micro_batch * s.seq), s.chunk)
    loss.backward()
    optimizer_step(model, opt)


def grpo_prompts(model, ctx: Context, s: Shape) -> dict:
    """grpo.encode_problems' result for the step's prompts (lengths prompt, prompt-1, ...: left padding in the
    rollout): ids, pixels and their ViT features from one ViT call (rollout.vit_once), reused all step."""
    enc = [image_prompt(model.config, 1, s.prompt - i, s.tiles) for i in range(s.step_prompts)]
    vit = vit_once(model, [pixels for _, _, pixels in enc], ctx)
    return {i: Prompt(ids[0], pixels, v) for i, ((ids, _, pixels), v) in enumerate(zip(enc, vit))}


def rollout_step(model, decoder, ctx: Context, s: Shape, prompts: dict):
    """One generate call of rollout.generate_responses: rollout_seqs // group prompts, each prefilled once and
    sampled `group` times from copies of its KV cache (sized for seq tokens), by the tensor-parallel copy."""
    chunk = [prompts[i] for i in range(max(1, s.rollout_seqs // s.group))]
    ids, mask = left_pad([p.ids for p in chunk], 0)
    with autocast(ctx):
        model.generate(ids, None, mask, max_new_tokens=s.seq - ids.shape[1], temperature=1.0,
                       num_return_sequences=s.group, vit_features=torch.cat([p.vit for p in chunk]), decoder=decoder)


def grpo_step(model, opt, ctx: Context, s: Shape, prompts: dict):
    """grpo.optimise on one micro-batch: grpo.make_batch, grpo.response_logprobs (the step's ViT features; lm_head
    on the response only), grpo.grpo_loss, backward, step. Responses of lengths R, R-1, ... after prompts 0, 1, ...
    (optimise's minibatch slicing, Batch.rows, reads lengths on the host: one micro-batch needs none of it)."""
    R = s.seq - s.prompt
    samples = [Sample(b % len(prompts), torch.zeros(R - b, dtype=torch.long)) for b in range(s.micro_batch)]
    batch = make_batch(samples, [1.0] * len(samples), prompts, 0, model.config.img_context_token_id)
    logp, _, mask = response_logprobs(model, batch, GRPOConfig(logprob_chunk=s.chunk), ctx)
    loss, _ = grpo_loss(logp, torch.zeros_like(logp), batch.adv, mask, num_tokens=float(mask.numel()))
    loss.backward()
    optimizer_step(model, opt)


def warm_up_shape(cfg: R1VConfig, s: Shape) -> Shape:
    """The untracked first step's shape: one tile and a few tokens (with fake tensors a step costs per op)."""
    tiles = min(s.tiles, 1)
    prompt = min(s.prompt, tiles * cfg.num_image_token + 8)
    return Shape(seq=prompt + 8, prompt=prompt, micro_batch=1, rollout_seqs=s.group, group=s.group,
                 step_prompts=1, tiles=tiles, chunk=s.chunk)


# ---------------------------------------------------------------------------------------------- one recipe
def trace_recipe(cfg: R1VConfig, gpus: int, train: str, grpo: bool, s: Shape = Shape(), grad_ckpt: bool = True,
                 bf16_moments: bool = True, tp: bool = True, fake: bool = True, decode_steps: int = 2,
                 nodes: int = 1, hsdp: bool = True) -> dict:
    """{phase: PeakTracker.result()} for one recipe: `train` the parts trained (optim.freeze's spec), `grpo` for
    GRPO's two phases, "rollout" (ViT once, one generate call) then "train" (one update), as grpo.train runs them;
    else one "train" step (sft.py). Each tracked phase follows an untracked warm-up step: Adam's state exists
    from the second step on, and the first step's set-up (FSDP's lazy init, DTensor's sharding propagation, which
    makes full-size tensors) would be counted. The tensor-parallel copy (tp) exists in the rollout phase only,
    as in grpo.train (release_rollout_copy before the update, rebuilt after it).
    fake=False runs the same on real tensors in an initialised process group (the test against gloo).
    nodes of `gpus` ranks, HSDP or full FSDP (trace_context); the tensor-parallel copy spans one node's `gpus`."""
    ctx = trace_context(gpus, nodes, hsdp, fake)
    model = sharded_model(cfg, ctx, train, grad_ckpt)
    # tp.make_decoder in two halves: the meta copy here, outside FakeTensorMode; to_empty + refresh inside it
    decoder = meta_decoder(cfg, ctx.dtype, ctx) if grpo and tp else None
    out = {}
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():  # (to_empty reads the meta model)
        model.to_empty(device="cpu")
        if not fake:  # real values: sampling refuses NaN probabilities
            with torch.no_grad():
                for p in model.parameters():
                    p.to_local().normal_(0, 0.02)
        if decoder is not None:
            decoder.to_empty(device="cpu")
            refresh(decoder, model)
        opt = make_optimizer(model, lr=1e-6, moments_dtype=torch.bfloat16 if bf16_moments else torch.float32)
        prompts = {}  # GRPO: the step's prompts and ViT features, made in the rollout phase, read by the update

        def rollout():
            prompts.update(grpo_prompts(model, ctx, s))
            rollout_step(model, decoder, ctx, s, prompts)

        with dry_run_answers(decode_steps):
            warm = warm_up_shape(cfg, s)
            if grpo:
                grpo_step(model, opt, ctx, warm, grpo_prompts(model, ctx, warm))
                # grpo.release_rollout_copy: the update runs without the copy, rebuilt after the step (when the
                # gradients are freed: below the update's peak)
                phases = {"rollout": rollout, "train": lambda: grpo_step(model, opt, ctx, s, prompts)}
            else:
                sft_step(model, opt, ctx, warm)
                phases = {"train": lambda: sft_step(model, opt, ctx, s)}
            for phase, run in phases.items():
                tracker = PeakTracker(model, opt, decoder if phase == "rollout" else None)
                tracker.track_inputs(prompts)
                with tracker:
                    run()
                out[phase] = tracker.result(opt)
    return out


def train_spec(parts) -> str:
    """Module names (a plan.Recipe's `train`) -> optim.freeze's spec ("vision,connector,llm")."""
    return ",".join(k for k, v in PARTS.items() if v in parts)
