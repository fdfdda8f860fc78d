"""Rollout speed, measured: `python -m tools.bench --rollout`.

Two comparisons of the same work done two ways, each paired and interleaved in one run (repeats alternate which
side goes first, A B B A ..., so both sides see the same machine load), each checked for equal work before timing:

  decode   2 gloo ranks, one thread each, tiny_configs/mid.json (decoder 8 x 512, ~90 MB fp32). The same B prompts
           (B = 1 and 8; rank r brings rows r, r+2, ...) decoded three ways, greedy, eos off:
             TP           tp.make_decoder's tensor-parallel copy: two all-reduces of [B,1,D] per layer per token
             FSDP-gather  generate on the FSDP2 shards (decoder=None): every layer all-gathered every token
             one process  what `python sample.py` runs: SkyworkR1V.from_pretrained and generate, in a process of its
                          own (no process group) with `threads` threads; half its repeats before the 2-rank job,
                          half after (two jobs cannot interleave their calls)
           Greedy tokens must be identical on all three. Then one TP call at batch 1 under torch.profiler on rank 0:
           per token, the time in aten ops (compute) vs from each collective's call to its return (waiting).
  refresh  the same 2 ranks: tp.refresh (FSDP shards -> TP copy) next to one optimizer step of the sharded model
           (forward + backward + AdamW on a short text batch); GRPO rebuilds the copy after each
           update (tp.make_decoder: an allocation, then this refresh).
  group    one process, tiny_configs/small.json, one prompt with an image of 4 tiles + thumbnail, G samples:
             old  each of the G rows its own copy of the prompt: the pixels through the ViT and a prefill per row
                  (rollout.generate_responses with group_size=1 over the prompt repeated G times); in the GRPO step
                  the log-prob passes run the ViT on the pixels again (features=False)
             new  rollout.vit_once, then one prefill whose KV cache is copied into G rows (group_size=G,
                  vit_features); the log-prob passes reuse the ViT features (features=True), and an update that
                  is one optimizer step needs no separate old-log-prob pass (grpo.old_logprobs)
           Rows: rollout time per group, and a GRPO step (rollout + old log-probs + ppo_epochs updates).

Ratios are "A faster than B": median time of B / median time of A; the range is over per-repeat paired ratios.

    python -m tools.bench --rollout  # everything: the table + out/bench_rollout.json
    python -m tools.bench --rollout --only group --repeats 3
"""
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile, record_function
from PIL import Image

from data import Tokenizer, encode_prompt
from grpo import GRPOConfig, Prompt, Sample, batch_logprobs, make_batch, old_logprobs, optimise
from model import SkyworkR1V, token_logprobs_and_entropy
from optim import make_optimizer
from parallel import Context, load, setup
from rollout import generate_responses, vit_once
from sft import write_tiny_checkpoint
from tools import machine
from tools.bench import NO_EOS, fmt, text_ids
from tp import make_decoder, refresh

WORLD = 2
PARTS = ("decode", "group")


@dataclass
class RolloutSizes:
    decode_config: str = "mid"     # tiny_configs/<name>.json for the 2-rank rows
    decode_prompt: int = 16        # short text prompts: the decode rows time the per-token loop
    decode_new: int = 32
    decode_batches: tuple = (1, 8)
    train_rows: int = 2            # refresh row: the optimizer step's batch per rank
    train_len: int = 64
    group: int = 8                 # G samples per prompt
    image_grid: tuple = (2, 2)     # an image of 2 x 2 tiles (+ the thumbnail: 5 tiles, 1,280 image tokens)
    group_new: int = 16            # new tokens per sample: the prompt is the expensive part of a rollout here
    ppo_epochs: int = 1
    micro_batch: int = 2           # sequences per forward/backward in the GRPO step (both sides)


# --------------------------------------------------------------------------------------------------- measuring
def measure(sides: dict, repeats: int, timer) -> tuple[dict, dict]:
    """sides {name: zero-argument callable} -> ({name: [seconds] x repeats}, {name: output of its warm-up call}).
    One warm-up call each (its output is for the caller's equal-work check), then `repeats` timed rounds, the
    order reversed every other round (A B, B A, ...)."""
    outputs = {name: timer(fn)[1] for name, fn in sides.items()}
    times, names = {name: [] for name in sides}, list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timer(sides[name])[0])
    return times, outputs


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_together(fn):
    """Wall time of a call on every rank, from a barrier to a barrier: the job is as slow as its slowest rank."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - t0, out


def compare(row: str, unit: str, times: dict, a: str, b: str, work: float = 0.0, target: float = None) -> dict:
    """One table row: side a against side b. With work, values are rates (work / seconds), else seconds (x1000
    for ms). ratio = median time of b / median time of a (> 1: a is faster); its range is over paired repeats."""
    def value(t):
        return work / t if work else t * (1e3 if unit == "ms" else 1.0)
    ta, tb = times[a], times[b]
    paired = [y / x for x, y in zip(ta, tb)]
    ratio = statistics.median(tb) / statistics.median(ta)
    return dict(row=row, unit=unit, a=a, b=b, a_value=value(statistics.median(ta)),
                a_range=sorted([value(min(ta)), value(max(ta))]), b_value=value(statistics.median(tb)),
                b_range=sorted([value(min(tb)), value(max(tb))]), ratio=ratio, ratio_range=[min(paired), max(paired)],
                target=target, met=None if target is None else ratio >= target, seconds={a: ta, b: tb})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned(fn, nprocs: int, *args):
    """fn(rank, out, *args) in `nprocs` fresh processes -> the JSON rank 0 wrote to `out` (mp.spawn returns
    nothing)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.spawn(fn, args=(out, *args), nprocs=nprocs, join=True)
        with open(out) as f:
            return json.load(f)


def write_json(out: str, value):
    with open(out, "w") as f:
        json.dump(value, f)


# ------------------------------------------------------------------------------- decode and refresh: 2 ranks
def decode_table_rows(ckpt: str, s: RolloutSizes, repeats: int, threads: int) -> tuple[list, dict]:
    """The decode and refresh rows, and rank 0's profile split (collective_split) of a TP call at batch 1."""
    alone, half = f"one process, {threads} thread{'s' * (threads > 1)}", repeats // 2
    before = spawned(one_process_main, 1, ckpt, s, repeats - half, threads)
    job = spawned(rank_main, WORLD, ckpt, s, repeats, before["tokens"], free_port())
    after = spawned(one_process_main, 1, ckpt, s, half, threads)["seconds"] if half else {}
    rows = []
    for b in map(str, s.decode_batches):
        times = {**job["seconds"][b], alone: before["seconds"][b] + after.get(b, [])}
        work, name = int(b) * s.decode_new, f"decode, batch {b}"
        rows += [compare(name, "tokens/s", times, "TP", "FSDP-gather", work, target=5.0),
                 compare(name, "tokens/s", times, "TP", alone, work, target=0.4)]
    return rows + [job["refresh"]], job["split"]


def one_process_main(rank: int, out: str, ckpt: str, s: RolloutSizes, repeats: int, threads: int):
    """`python sample.py`'s decode path, alone in its process: {"seconds": {batch: [...]}, "tokens": {batch: ids}}."""
    torch.set_num_threads(threads)
    model = SkyworkR1V.from_pretrained(ckpt).eval()
    seconds, tokens = {}, {}
    for b in s.decode_batches:
        ids = text_ids(b, s.decode_prompt, seed=b)
        times, outs = measure({"one": lambda: model.generate(ids, max_new_tokens=s.decode_new, eos_token_id=NO_EOS)},
                              repeats, timed)
        seconds[str(b)], tokens[str(b)] = times["one"], outs["one"].tolist()
    write_json(out, {"seconds": seconds, "tokens": tokens})


def rank_main(rank: int, out: str, ckpt: str, s: RolloutSizes, repeats: int, want: dict, port: int):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = setup(dtype="fp32")
    torch.set_num_threads(1)  # one core per rank: the two ranks fill the 2-core machine
    try:
        sharded = load(ckpt, ctx, train="connector,llm")  # GRPO's trainable parts, FSDP2
        decoder = make_decoder(sharded, torch.float32)
        seconds = {str(b): decode_times(ctx, sharded, decoder, b, s, repeats, torch.tensor(want[str(b)]))
                   for b in s.decode_batches}
        ids = text_ids(1, s.decode_prompt, seed=1)[ctx.rank::WORLD]
        split = collective_split(lambda: sharded.generate(ids, None, torch.ones_like(ids), decoder=decoder,
                                                          max_new_tokens=s.decode_new, eos_token_id=NO_EOS),
                                 s.decode_new)
        refresh = refresh_row(ctx, sharded, decoder, s, repeats)
        if rank == 0:
            write_json(out, {"seconds": seconds, "refresh": refresh, "split": split})
    finally:
        dist.destroy_process_group()


def decode_times(ctx, sharded, decoder, batch: int, s: RolloutSizes, repeats: int, want) -> dict:
    """The same `batch` prompts decoded by TP and by FSDP-gather -> {side: [seconds of the whole job]}; each rank's
    rows checked against the one-process tokens `want`."""
    mine = text_ids(batch, s.decode_prompt, seed=batch)[ctx.rank::WORLD]  # batch 1: rank 1 brings no rows but
    kw = dict(max_new_tokens=s.decode_new, eos_token_id=NO_EOS)           # steps along (every path is collective)
    sides = {"TP": lambda: sharded.generate(mine, None, torch.ones_like(mine), decoder=decoder, **kw),
             "FSDP-gather": lambda: sharded.generate(mine, None, torch.ones_like(mine), **kw)}
    times, outs = measure(sides, repeats, timed_together)
    for side in sides:
        assert torch.equal(outs[side], want[ctx.rank::WORLD]), \
            f"batch {batch}: {side} greedy tokens differ from one process's on rank {ctx.rank}"
    return times


COLLECTIVES = ("all_reduce", "all_gather", "broadcast")  # what tp.py and the decode loop call


def collective_split(fn, tokens: int) -> dict:
    """torch.profiler over fn() on this rank -> ms per token: compute (the aten ops' own time; matmul: mm and
    addmm), waiting (each torch.distributed collective from its call to its return, annotated here), the rest
    (Python, dispatch, the profiler's own overhead), and collectives per token."""
    saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def annotated(name, f):
        def call(*args, **kwargs):
            with record_function(f"collective: {name}"):
                return f(*args, **kwargs)
        return call

    for name, f in saved.items():  # tp.py looks dist.all_reduce up at each call: it sees the annotated one
        setattr(dist, name, annotated(name, f))
    try:
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
    finally:
        for name, f in saved.items():
            setattr(dist, name, f)
    events = prof.key_averages()
    ms = lambda us: us / 1e3 / tokens  # noqa: E731
    waiting = [e for e in events if e.key.startswith("collective: ")]
    compute = ms(sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")))
    split = dict(wall_ms=wall * 1e3 / tokens, compute_ms=compute, waiting_ms=ms(sum(e.cpu_time_total for e in waiting)),
                 matmul_ms=ms(sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm"))),
                 collectives=sum(e.count for e in waiting) / tokens)
    return dict(split, other_ms=split["wall_ms"] - compute - split["waiting_ms"])


def refresh_row(ctx, sharded, decoder, s: RolloutSizes, repeats: int) -> dict:
    """tp.refresh vs one optimizer step of the sharded model (a short text batch, AdamW as GRPO's)."""
    opt = make_optimizer(sharded, lr=1e-4)
    ids = text_ids(s.train_rows, s.train_len, seed=100 + ctx.rank)

    def step():
        opt.zero_grad(set_to_none=True)
        h = sharded(ids[:, :-1], return_hidden=True)
        logp, _ = token_logprobs_and_entropy(sharded.language_model.lm_head, h, ids[:, 1:])
        (-logp.mean()).backward()
        opt.step()

    times, _ = measure({"refresh": lambda: refresh(decoder, sharded), "optimizer step": step}, repeats,
                       timed_together)
    # equal work here means: the refresh copies what the step changed (the last round may have ended on a step)
    refresh(decoder, sharded)
    q = sharded.language_model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(decoder.model.layers[0].self_attn.q_proj.weight, q.to_local()), "refresh missed the update"
    return compare("refresh vs optimizer step", "ms", times, "refresh", "optimizer step")


# ---------------------------------------------------------------------------------------- group: one process
def tiled_image(grid: tuple, seed: int = 0) -> Image.Image:
    """A random RGB image whose aspect ratio tiles into exactly cols x rows 448px tiles (data.tile_grid)."""
    cols, rows = grid
    pixels = np.random.default_rng(seed).integers(0, 256, (rows * 448, cols * 448, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def group_setup(ckpt: str, s: RolloutSizes) -> tuple:
    """-> (policy, optimizer, prompt ids [P], pixels [tiles,3,H,W], GRPOConfig, Context) for the group rows."""
    ctx = Context(torch.device("cpu"))
    m = load(ckpt, ctx, train="connector,llm")  # GRPO's default: the ViT frozen
    tok = Tokenizer.from_dir(ckpt)
    cols, rows = s.image_grid
    ids, pixels = encode_prompt(tok, m.config, "How many shapes are in the image?", [tiled_image(s.image_grid)],
                                max_tiles=cols * rows)
    assert pixels.shape[0] == cols * rows + 1, f"expected {cols * rows} tiles + thumbnail, got {pixels.shape[0]}"
    cfg = GRPOConfig(group_size=s.group, max_new_tokens=s.group_new, ppo_epochs=s.ppo_epochs,
                     minibatch_size=s.group, micro_batch_size=s.micro_batch, grad_checkpointing=False,
                     bf16_moments=False, lr=0.0)
    # lr 0: AdamW does all its work but leaves the weights as they are, so every call of either side sees the same
    # model and their outputs can be compared at any point (a real lr would make the second side's greedy tokens
    # those of a different model)
    opt = make_optimizer(m, lr=cfg.lr)
    return m, opt, torch.tensor(ids), pixels, cfg, ctx


def old_rollout(m, ids, pixels, cfg, ctx) -> tuple[list, Prompt]:
    """Per sample: G copies of the prompt, each with its pixels: G ViT passes and G prefills."""
    groups = generate_responses(m, [(ids, pixels)] * cfg.group_size, ctx, pad_id=0, stop_ids=[NO_EOS], group_size=1,
                                batch_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    return [g[0] for g in groups], Prompt(ids, pixels, None)  # the log-prob passes take the pixels (features=False)


def new_rollout(m, ids, pixels, cfg, ctx) -> tuple[list, Prompt]:
    """grpo.py's path: the ViT once, one prefill, its KV cache copied into G sample rows."""
    vit = vit_once(m, [pixels], ctx)
    groups = generate_responses(m, [(ids, pixels)], ctx, pad_id=0, stop_ids=[NO_EOS], group_size=cfg.group_size,
                                batch_size=cfg.group_size, vit_features=vit, max_new_tokens=cfg.max_new_tokens,
                                temperature=0.0)
    return groups[0], Prompt(ids, pixels, vit[0])


def grpo_step(m, opt, rollout_fn, ids, pixels, cfg, ctx, features: bool) -> tuple:
    """Rollout + old log-probs + ppo_epochs updates -> (responses, loss, grad norm). The old path always makes the
    separate old-log-prob pass (grpo.batch_logprobs, on pixels); the new one does what grpo.train does
    (grpo.old_logprobs: none when the update is one optimizer step, as here with 1 epoch and 1 minibatch).
    Advantages are fixed random numbers: greedy rows of one group are identical, so their real advantages would be
    0, and a zero loss would still cost the same but hide a wrong gradient path."""
    responses, prompt = rollout_fn(m, ids, pixels, cfg, ctx)
    samples = [Sample(0, torch.tensor(r)) for r in responses]
    adv = torch.randn(len(samples), generator=torch.Generator().manual_seed(1))
    batch = make_batch(samples, adv.tolist(), {0: prompt}, 0, m.config.img_context_token_id, features)
    batch.old_logp = old_logprobs(m, batch, cfg, ctx) if features else batch_logprobs(m, batch, cfg, ctx)
    metrics = optimise(m, opt, batch, cfg, ctx, torch.Generator().manual_seed(2))
    return responses, metrics["loss"], metrics["grad_norm"]


def check_rollouts(old: list, new: list):
    assert old == new, "greedy tokens differ between the old (per-row) and new (group) rollout"


def check_grpo_steps(old: tuple, new: tuple, tol: float = 1e-4):
    """Same responses, same loss and gradient norm (lr 0: both sides see the same weights every call)."""
    check_rollouts(old[0], new[0])
    for name, a, b in (("losses", old[1], new[1]), ("gradient norms", old[2], new[2])):
        assert abs(a - b) <= tol * max(abs(b), 1e-6), f"{name} differ: {a} vs {b}"


def group_rows(ckpt: str, s: RolloutSizes, repeats: int) -> list:
    m, opt, ids, pixels, cfg, ctx = group_setup(ckpt, s)
    times, outs = measure({"new": lambda: new_rollout(m, ids, pixels, cfg, ctx)[0],
                           "old": lambda: old_rollout(m, ids, pixels, cfg, ctx)[0]}, repeats, timed)
    check_rollouts(outs["old"], outs["new"])
    rows = [compare(f"rollout per group (G={s.group})", "s", times, "new", "old", target=3.0)]
    times, outs = measure({"new": lambda: grpo_step(m, opt, new_rollout, ids, pixels, cfg, ctx, True),
                           "old": lambda: grpo_step(m, opt, old_rollout, ids, pixels, cfg, ctx, False)}, repeats, timed)
    check_grpo_steps(outs["old"], outs["new"])
    rows.append(compare(f"GRPO step (G={s.group}, {s.ppo_epochs} PPO epoch)", "s", times, "new", "old", target=1.5))
    rows[-1]["work"] = step_work(cfg, pixels.shape[0], len(ids))
    return rows


def step_work(cfg: GRPOConfig, tiles: int, prompt_tokens: int) -> dict:
    """Tiles through the ViT and prompt tokens prefilled in one GRPO step of one group, each side. old: per sample,
    in the rollout and in every log-prob pass (the old policy's, then ppo_epochs updates); new: once (the ViT
    frozen, as in group_setup, the passes reuse its features; the update is one optimizer step, so no old pass)."""
    G = cfg.group_size
    return {"old": {"vit_tiles": G * (2 + cfg.ppo_epochs) * tiles, "prefill_tokens": G * prompt_tokens},
            "new": {"vit_tiles": tiles, "prefill_tokens": prompt_tokens}}


# ------------------------------------------------------------------------------------------------------ report
def work_line(rows: list) -> str:
    """The group rows' work per GRPO step, old vs new (step_work)."""
    w = next((r["work"] for r in rows if "work" in r), None)
    return "" if w is None else (f"per GRPO step of one group, old -> new: ViT tiles {w['old']['vit_tiles']} -> "
                                 f"{w['new']['vit_tiles']}, prefilled tokens {w['old']['prefill_tokens']:,} -> "
                                 f"{w['new']['prefill_tokens']:,}")


def table(rows: list) -> str:
    lines = ["| row | A | B | unit | A: median (min-max) | B: median (min-max) | A faster than B (min-max) | target "
             "| met |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        target = "" if r["target"] is None else f">= {r['target']}x"
        lines.append(f"| {r['row']} | {r['a']} | {r['b']} | {r['unit']} "
                     f"| {fmt(r['a_value'])} ({fmt(r['a_range'][0])}-{fmt(r['a_range'][1])}) "
                     f"| {fmt(r['b_value'])} ({fmt(r['b_range'][0])}-{fmt(r['b_range'][1])}) "
                     f"| **{r['ratio']:.2f}x** ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) | {target} "
                     f"| {met} |")
    return "\n".join(lines)


def split_line(s: dict) -> str:
    return (f"TP decode, batch 1, rank 0 under torch.profiler, per token: {s['wall_ms']:.1f} ms = compute "
            f"{s['compute_ms']:.1f} (matmuls {s['matmul_ms']:.1f}) + waiting in {s['collectives']:.0f} collectives "
            f"{s['waiting_ms']:.1f} + other {s['other_ms']:.1f}")


def run(cfg, sizes: RolloutSizes = None) -> dict:
    """cfg: bench.BenchConfig (config: the group rows' tiny_configs name; repeats, threads, only, out)."""
    sizes = sizes or RolloutSizes()
    parts = [p for p in cfg.only.split(",") if p] or list(PARTS)
    if set(parts) - set(PARTS):
        raise ValueError(f"--rollout --only: parts are {list(PARTS)}, got {parts}")
    workdir = tempfile.mkdtemp(prefix="nanor1v-bench-rollout-")
    meta = dict(machine(), threads=cfg.threads, command="python " + " ".join(sys.argv), group_config=cfg.config, repeats=cfg.repeats, sizes=asdict(sizes),
                load_average_before=os.getloadavg())
    rows, split = [], None
    try:
        if "decode" in parts:
            ckpt = write_tiny_checkpoint(os.path.join(workdir, "decode", "ckpt"), sizes.decode_config,
                                         max_shard_bytes=2**30)
            rows, split = decode_table_rows(ckpt, sizes, cfg.repeats, cfg.threads)
            print(table(rows), flush=True)
        if "group" in parts:
            torch.set_num_threads(cfg.threads)
            ckpt = write_tiny_checkpoint(os.path.join(workdir, "group"), cfg.config, max_shard_bytes=2**30)
            rows += group_rows(ckpt, sizes, cfg.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_average_after"] = os.getloadavg()
    print(f"\n{meta['date']} | {meta['cpu']} ({meta['cores']} cores) | torch {meta['torch']} | decode: 2 gloo ranks x 1 "
          f"thread, {sizes.decode_config}; one process: {cfg.threads} thread(s); group: {cfg.config} | median of "
          f"{cfg.repeats} | load average {meta['load_average_before'][0]:.1f} -> {meta['load_average_after'][0]:.1f}\n")
    print(table(rows))
    for line in (split_line(split) if split else "", work_line(rows)):
        print("\n" + line if line else "", end="")
    print()
    out = cfg.out or os.path.join("out", "bench_rollout.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, split=split), f, indent=2)
    print(f"\nwritten {out}")
    return dict(meta=meta, rows=rows, split=split)
