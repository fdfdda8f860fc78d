"""Supervised fine-tuning of the vision-language model, top to bottom in one file.

Two stages of Skywork-R1V3 (arXiv 2507.06167) are SFT:
  * cold-start SFT (`--train all`): ~12K long chain-of-thought samples teach the `<think> ... </think> \\boxed{}`
    reasoning format before GRPO (grpo.py) improves the reasoning itself;
  * connector-only tuning after RL (`--train connector`): ~10K samples across ~20 domains update only `mlp1`,
    the ViT and the LLM stay frozen; the report finds this rebalances knowledge better than tuning other modules.

The loss is the token-mean negative log-likelihood of the assistant tokens (response + `<|im_end|>`); the prompt
(system / user turns, image tokens) only conditions. With no arguments, `python sft.py` writes a tiny random
checkpoint and cold-start data for the synthetic visual task (count the red shapes), trains the format in a few
CPU minutes and leaves out/sft, the checkpoint grpo.py starts from.

Data: JSONL, one sample a line: {"images": [...], "question": str, "response": str, ["answer": str]} or
{"images": [...], "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}; image paths are
relative to the file. Every assistant turn must be `<think> reasoning </think> ... \\boxed{answer}`
(rewards.format_reward): others are reported by file:line and skipped (--allow-untagged trains on them).

    python sft.py                                                  # tiny default: cold-start SFT, CPU, minutes
    torchrun --nproc_per_node 8 sft.py --ckpt Skywork-R1V3-38B --data cold_start.jsonl --lr 1e-5 --max-len 16384 \
        --grad-checkpointing                                       # the 38B, FSDP2 (see parallel.py)
    python sft.py --ckpt out/grpo --data domains.jsonl --train connector --out out/connector   # post-RL stage
"""
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import cli
from checkpoint import resume, save_checkpoint, save_state_dict, trained_step
from cli import at_least, parse_config
from data import (MAX_PROBLEMS, THINK_PREFIX, THINK_START, DataError, Tokenizer, encode_chat, image_tiles,
                  make_visual_task, parse_columns, read_jsonl, read_records, reasoning_trace, shuffled_indices,
                  tile_count, train_tokenizer)
from logs import MetricsLog, plot_curves, prepare_run
from model import R1VConfig, SkyworkR1V, token_logprobs_and_entropy
from optim import clip_grads, lr_at, make_optimizer, parse_train_spec
from parallel import Context, LayoutFlags, all_reduce_sum, autocast, barrier, load, setup
from rewards import format_reward
from rollout import heldout_accuracy
from tp import make_decoder, tp_fits


@dataclass
class SFTConfig(LayoutFlags):  # + --replicate, --tp-size (parallel.py)
    # model and data
    ckpt: str = ""                # starting checkpoint (release format); "" = a tiny random one in out/tiny-init
    data: str = ""                # training JSONL or parquet (file or folder); "" = synthetic cold-start data
    eval_data: str = ""           # held-out JSONL; "" = the synthetic held-out split, or n_eval samples cut from --data
    columns: str = ""             # parquet column names, e.g. question=problem,response=solution,images=image
    synthetic_dir: str = "out/sft-data"  # where the synthetic data is written (without --data)
    n_train: int = 1000           # synthetic training problems
    n_eval: int = 64              # held-out samples (synthetic, or cut from --data when there is no --eval-data)
    out: str = "out/sft"          # checkpoint dir (release format + train_state/); out.metrics.jsonl, out.png beside it
    resume: bool = False          # continue the run saved in --out (its train_state/), if there is one
    overwrite: bool = False       # delete what --out holds (checkpoint, metrics, curves) first; without it or
                                  # --resume an existing run is refused
    train: str = "all"            # all | llm | connector | vision,connector | ...: the parts that get gradients
    max_len: int = 1024           # tokens per sample, image tokens included (see truncate())
    max_tiles: int = 12           # 448px tiles per image (+ thumbnail), as in the release's inference
    allow_untagged: bool = False  # train on responses without <think>...</think> and \boxed{} too
    # optimisation (defaults fit the tiny model: a 38B full SFT wants lr ~1e-5, batch 64+, warmup ~3%)
    steps: int = 300              # optimizer steps
    batch_size: int = 4           # samples per micro-batch (per rank)
    grad_accum: int = 1           # micro-batches per optimizer step
    lr: float = 5e-3              # peak learning rate, after warmup; cosine down to min_lr_ratio * lr
    warmup: int = 20              # steps of linear warmup from 0
    min_lr_ratio: float = 0.1     # the learning rate at the last step, as a fraction of --lr
    weight_decay: float = 0.0     # AdamW weight decay
    grad_clip: float = 1.0        # clip the global gradient norm to this
    grad_checkpointing: bool = False  # recompute each block in backward: activation memory flat in depth
    cpu_offload: bool = False     # FSDP2 CPU offload of parameters, gradients and optimizer state
    bf16_moments: bool = False    # Adam moments in bf16 (fp32 weights): what the 38B needs on 80 GB GPUs (tools/plan.py)
    logprob_chunk: int = 1024     # tokens per lm_head chunk in the loss (bounds the [tokens, vocab] logits)
    # evaluation and output
    eval_every: int = 50          # held-out loss every this many steps (and at the end)
    print_every: int = 10         # console line every this many steps (metrics JSONL gets every step)
    save_every: int = 0           # checkpoint every this many steps (0 = only at the end)
    gen_eval: int = 64            # held-out prompts answered greedily at the end -> format rate, accuracy (0 = off)
    max_new_tokens: int = 320     # response length limit of the --gen-eval answers
    seed: int = 0                 # data order, held-out split, synthetic data

    def __post_init__(self):
        super().__post_init__()  # the layout
        at_least(self, 1, "steps", "batch_size", "grad_accum", "eval_every", "print_every", "max_len", "max_tiles",
                 "max_new_tokens", "logprob_chunk", "n_train")
        at_least(self, 0, "n_eval", "save_every", "gen_eval", "warmup", "lr", "weight_decay")
        parse_train_spec(self.train)  # a typo in --train fails now, not after the data is prepared
        parse_columns(self.columns)
        for flag, path in (("--data", self.data), ("--eval-data", self.eval_data)):
            if path and not os.path.exists(path):  # a file, or a folder of parquet files
                raise ValueError(f"{flag} {path}: no such file")
        if self.ckpt and not os.path.isfile(os.path.join(self.ckpt, "config.json")):
            raise ValueError(f"--ckpt {self.ckpt}: not a checkpoint directory (no config.json)")


# ----------------------------------------------------------------------------------------------------------------
# 1. The loss: token-mean negative log-likelihood of the assistant tokens

def sft_loss(model, batch: dict, n_tokens: float, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum over the batch's assistant tokens of -log p(token) / n_tokens, sum of the policy's entropy there).
    Pass the whole optimizer step's token count as n_tokens: with gradient accumulation the step's gradient is
    then that of the token mean over all its micro-batches (long responses weigh by their length, as in one batch).

    Every position of the [B, T] batch goes through lm_head (chunk tokens at a time), and the positions without a
    target (prompt, image tokens, padding: label -100) are masked by multiplication, not selected: shapes never
    depend on the data, so there is no host sync and the function traces under FakeTensorMode (tools/plan.py's dry run)
    and torch.compile. The price is lm_head on the prompt's tokens too: lm_head is ~2.5% of the 38B's matmul FLOPs
    per token, so under 1% of a step when the response is most of the sequence, as in long chain-of-thought SFT."""
    # right padding (make_batch): causal attention already hides the padding from every real token, and padded
    # positions have no target, so no mask: the unmasked attention kernel (model.attend)
    hidden = model(batch["input_ids"], batch["pixel_values"], return_hidden=True)  # [B,T,D]
    targets = batch["labels"][:, 1:]                                  # position t predicts token t+1; -100 = none
    logp, ent = token_logprobs_and_entropy(model.language_model.lm_head, hidden[:, :-1], targets, chunk=chunk)
    keep = (targets >= 0).float()                                     # logp is already 0 where the target is -100
    return -logp.sum() / n_tokens, (ent.detach() * keep).sum()


def n_targets(examples: list) -> int:
    return sum(int(e.mask[1:].sum()) for e in examples)  # the first token has no predecessor, so it is never a target


# ----------------------------------------------------------------------------------------------------------------
# 2. One optimizer step, and the loop

def train_step(model, opt, examples: list, pad_id: int, cfg: SFTConfig, ctx) -> dict:
    """The step's examples (this rank's share) -> micro-batches -> accumulated gradients -> clip -> AdamW."""
    n_all, = all_reduce_sum([n_targets(examples)])  # the step's assistant tokens on all ranks
    loss_sum = ent_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)  # read once, after the step
    for i in range(0, len(examples), cfg.batch_size):  # gradient accumulation over micro-batches
        batch = make_batch(examples[i:i + cfg.batch_size], pad_id, model.config, cfg.max_tiles, ctx.device)
        with autocast(ctx):
            # FSDP averages gradients over ranks; scaling by world turns that average back into the global token
            # mean (each rank's loss is its share of sum(-log p) / n_all)
            loss, ent = sft_loss(model, batch, n_all / ctx.world, cfg.logprob_chunk)
        loss.backward()
        loss_sum, ent_sum = loss_sum + loss.detach().double() / ctx.world, ent_sum + ent.double()
    grad_norm = clip_grads(model, cfg.grad_clip, device=ctx.device)  # CPU under --cpu-offload: moved to the loss
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss_sum, ent_sum, grad_norm = torch.stack([loss_sum, ent_sum, grad_norm.double()]).tolist()  # the one sync
    loss_all, ent_all = all_reduce_sum([loss_sum, ent_sum])
    return {"loss": loss_all, "entropy": ent_all / max(n_all, 1), "grad_norm": grad_norm, "tokens": n_all}


@dataclass
class Run:
    """What the loop works with (main builds it): the model and optimizer, the data, the log, the first step."""
    cfg: SFTConfig
    ctx: Context
    model: SkyworkR1V
    opt: torch.optim.Optimizer
    pad_id: int
    train_set: list
    eval_set: list
    log: MetricsLog
    start: int = 0                  # steps already done (a resumed run)


def fit(run: Run):
    """Optimizer steps start..cfg.steps, each on the next samples of a seeded shuffle (step_indices), at the
    warmup-then-cosine learning rate lr_at(step); held-out loss every eval_every steps."""
    cfg, ctx, model, opt = run.cfg, run.ctx, run.model, run.opt
    if run.start == 0:  # the curve starts from the untrained model
        run.log.write(0, {"eval_loss": evaluate(model, run.eval_set, cfg, ctx, run.pad_id)})
    for step in range(run.start, cfg.steps):
        t0 = time.time()
        idx = step_indices(step, len(run.train_set), cfg.batch_size * cfg.grad_accum, cfg.seed, ctx.rank, ctx.world)
        lr = set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio))
        metrics = train_step(model, opt, [run.train_set[i] for i in idx], run.pad_id, cfg, ctx)
        metrics.update(lr=lr, sec=round(time.time() - t0, 3))
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            metrics["eval_loss"] = evaluate(model, run.eval_set, cfg, ctx, run.pad_id)
        report(done, metrics, cfg, ctx, run.log)
        if "eval_loss" in metrics and run.log.enabled:  # redrawn at every evaluation: a killed run keeps its curves
            plot_curves(run.log.path, cfg.out + ".png", CURVES)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save_checkpoint(cfg.out, model, opt, done, {"config": asdict(cfg)})


def set_lr(opt, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


@torch.no_grad()
def evaluate(model, examples: list, cfg: SFTConfig, ctx, pad_id: int) -> float:
    """Token-mean held-out loss (every rank takes a strided share; load_datasets makes the shares equal)."""
    mine = examples[ctx.rank::ctx.world]
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for i in range(0, len(mine), cfg.batch_size):
        batch = make_batch(mine[i:i + cfg.batch_size], pad_id, model.config, cfg.max_tiles, ctx.device)
        with autocast(ctx):
            total += sft_loss(model, batch, 1.0, cfg.logprob_chunk)[0].double()
    total, = all_reduce_sum([total.item()])
    return total / max(n_targets(examples), 1)


# ----------------------------------------------------------------------------------------------------------------
# 3. main: load, fit, save, answer the held-out questions; then its bookkeeping

CURVES = ["loss", "eval_loss", "entropy", "grad_norm", "lr", "sec"]


def main(cfg: SFTConfig) -> dict:
    t_start = time.time()
    ctx = setup(seed=cfg.seed, layout=cfg)
    ckpt, resuming = starting_checkpoint(cfg, ctx)
    train_path, eval_path = data_files(cfg, ctx)
    barrier()  # the main rank may have just written the tiny checkpoint and the synthetic data
    # the data is checked (against the checkpoint's tokenizer and config) and the run directory claimed before any
    # weight is read: a bad record or a previous run in --out costs seconds, not a model load
    tok = Tokenizer.from_dir(ckpt)
    train_set, eval_set, stats = load_datasets(train_path, eval_path, tok, cfg, R1VConfig.from_dir(ckpt), ctx)
    claim_run(cfg, ctx, resuming)
    model = load(ckpt, ctx, cfg.train, cfg.grad_checkpointing, cfg.cpu_offload)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay,
                         moments_dtype=torch.bfloat16 if cfg.bf16_moments else torch.float32)
    start = resume(cfg.out, model, opt)[0] if resuming else 0
    log = MetricsLog(cfg.out + ".metrics.jsonl", enabled=ctx.is_main, resume_step=start if resuming else None)
    log.write(start, {"data_" + k: v for k, v in stats.items() if not k.endswith("_at")})

    fit(Run(cfg, ctx, model, opt, tok.pad_id, train_set, eval_set, log, start))
    save_checkpoint(cfg.out, model, opt, cfg.steps, {"config": asdict(cfg)})
    result = {"steps": cfg.steps, "out": cfg.out}
    if cfg.gen_eval:  # greedy thinking-mode answers to held-out questions: has the format been learnt?
        problems = [{"question": e.question, "images": e.images, "answer": e.answer}
                    for e in eval_set if e.question is not None][:cfg.gen_eval]
        ev = heldout_generation(model.eval(), tok, problems, cfg, ctx)
        result.update(gen_samples=ev["samples"], format_rate=ev["format_rate"], accuracy=ev["accuracy"],
                      sample=ev["sample"])
        log.write(cfg.steps, {k: result[k] for k in ("gen_samples", "format_rate", "accuracy")})
        MetricsLog(cfg.out + ".heldout_answers.jsonl", ctx.is_main).write_rows(cfg.steps, ev["answers"])
    result["wall_sec"] = round(time.time() - t_start, 1)
    if ctx.is_main:
        plot_curves(log.path, cfg.out + ".png", CURVES)
        print(json.dumps(result, indent=1))
    return result


def heldout_generation(model, tok: Tokenizer, problems: list, cfg: SFTConfig, ctx) -> dict:
    """rollout.heldout_accuracy through tp.py's tensor-parallel copy of the decoder on W > 1 ranks (decoding from
    the FSDP shards would all-gather the whole decoder for every token); the copy is made from the trained shards
    and dropped after. On one process (no copy) the model's own decoder answers."""
    decoder = make_decoder(model, ctx.dtype) if tp_fits(model.config.llm, ctx.world) else None
    try:
        return heldout_accuracy(model, tok, problems, ctx, max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.batch_size, max_tiles=cfg.max_tiles, decoder=decoder)
    finally:
        del decoder


def claim_run(cfg: SFTConfig, ctx, resuming: bool):
    """The run's files are --out (the checkpoint) and the files beside it: a previous run there is refused unless
    --resume or --overwrite (logs.prepare_run); the resolved config goes to <out>.run_config.json."""
    parts = [cfg.out, cfg.out + ".partial"] + [cfg.out + s for s in (".metrics.jsonl", ".png", ".run_config.json",
                                                                       ".heldout_answers.jsonl")]
    prepare_run(parts, cfg, resume=cfg.resume, overwrite=cfg.overwrite, config_path=cfg.out + ".run_config.json",
                step=trained_step(cfg.out) if resuming else None, schedule=("steps", "lr", "warmup", "min_lr_ratio"),
                lr_at=lambda c, s: lr_at(s, c["steps"], c["lr"], c["warmup"], c["min_lr_ratio"]),
                is_main=ctx.is_main, prog="sft.py", barrier=barrier)
    barrier()


def starting_checkpoint(cfg: SFTConfig, ctx) -> tuple[str, bool]:
    """-> (checkpoint to load, resuming?): with --resume the run saved in --out, else --ckpt, else a tiny random
    checkpoint (written to out/tiny-init once)."""
    resuming = cfg.resume and os.path.isfile(os.path.join(cfg.out, "train_state", "trainer_state.json"))
    if cfg.resume and not resuming and ctx.is_main:
        print(f"--resume: nothing to resume in {cfg.out}, starting from {cfg.ckpt or 'a tiny random checkpoint'}")
    ckpt = cfg.out if resuming else cfg.ckpt or "out/tiny-init"
    if ckpt == "out/tiny-init" and ctx.is_main and not os.path.isfile(os.path.join(ckpt, "config.json")):
        write_tiny_checkpoint(ckpt)
    return ckpt, resuming


# tiny random models: the default run starts from one, the tests load one
def write_tiny_checkpoint(out_dir: str, config="tiny", seed: int = 0, max_shard_bytes: int = 256 * 2**10) -> str:
    """A random-weight checkpoint in the release format from tiny_configs/<config>.json (or a config dict of that
    format), with a small BPE tokenizer carrying the release's special tokens. Weights are non-trivial (norms, layer
    scales and biases away from their init) so tests can tell a mis-loaded tensor. Small shards so that even tiny
    models exercise the index."""
    if isinstance(config, dict):
        cfg_dict, config = config, "config dict"
    else:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_configs", f"{config}.json")) as f:
            cfg_dict = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    tok_dir = tempfile.mkdtemp(prefix=".tok-", dir=os.path.dirname(os.path.abspath(out_dir)))
    train_tokenizer(tok_dir)
    config = R1VConfig.from_dict(cfg_dict, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = SkyworkR1V(config)
    tensors = [(name, init_tensor(name, tuple(p.shape), gen)) for name, p in model.named_parameters()]
    save_state_dict(tensors, cfg_dict, out_dir, max_shard_bytes, tok_dir)
    shutil.rmtree(tok_dir)
    return out_dir


def init_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if name.endswith((".ls1", ".ls2")) or "norm" in name or name.startswith("mlp1.0."):
        base = 0.0 if name.endswith(".bias") else 1.0  # scales near 1, shifts near 0, neither exactly at init
        return base + 0.1 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen) * (5.0 if "embed" in name else 1.0)


def data_files(cfg: SFTConfig, ctx) -> tuple[str, str]:
    """-> (training JSONL, held-out JSONL or ""): --data and --eval-data, or the synthetic cold-start set, which the
    main rank writes."""
    if cfg.data:
        return cfg.data, cfg.eval_data
    if ctx.is_main:
        synthetic_data(cfg.synthetic_dir, cfg.n_train, cfg.n_eval, cfg.seed)
    return (os.path.join(cfg.synthetic_dir, "sft_train.jsonl"),
            cfg.eval_data or os.path.join(cfg.synthetic_dir, "sft_heldout.jsonl"))


def load_datasets(train_path: str, eval_path: str, tok: Tokenizer, cfg: SFTConfig, config: R1VConfig, ctx):
    """-> (training examples, held-out examples, the training file's stats). Without a held-out file, n_eval samples
    of --data are held out: a seeded choice, not the file's tail, which may be sorted."""
    train_set, stats = load_sft(train_path, tok, cfg, config)
    if eval_path:
        eval_set, _ = load_sft(eval_path, tok, cfg, config)
    else:
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = min(cfg.n_eval, len(train_set) // 2)
        eval_set, train_set = [train_set[i] for i in perm[:n_eval]], [train_set[i] for i in perm[n_eval:]]
        if ctx.is_main:
            print(f"no --eval-data: holding out {n_eval} of the {n_eval + len(train_set)} samples of {train_path} "
                  f"(--n-eval {cfg.n_eval}, at most half; they are not trained on). Give --eval-data FILE to keep "
                  f"all of them for training")
    # keep a multiple of world: every rank runs the same forwards (the lockstep rule, parallel.py)
    eval_set = eval_set[:len(eval_set) // ctx.world * ctx.world]
    if ctx.is_main:
        print(f"{len(train_set)} training samples, {len(eval_set)} held out; data stats {stats}")
    return train_set, eval_set, stats


def report(step: int, m: dict, cfg: SFTConfig, ctx, log: MetricsLog):
    """Every step to the metrics JSONL; a console line every print_every steps and at each held-out loss."""
    log.write(step, m)
    if ctx.is_main and (step % cfg.print_every == 0 or "eval_loss" in m):
        print(f"step {step}/{cfg.steps} loss {m['loss']:.4f} lr {m['lr']:.2e} |g| {m['grad_norm']:.2f} {m['sec']:.2f}s"
              + (f" eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""))


# ----------------------------------------------------------------------------------------------------------------
# Data: JSONL -> checked, tokenised, truncated examples (a sample is its token ids with a mask on the assistant
# tokens) -> right-padded batches, in a seeded order

@dataclass
class Example:
    # tensors, not lists: a Python int costs ~36 bytes, a long-CoT dataset has ~10^8 tokens
    ids: torch.Tensor     # [T] int32, prompt + response token ids (after truncation)
    mask: torch.Tensor    # [T] bool, True on assistant tokens (response + <|im_end|>): the only ones with a loss
    images: list          # absolute image paths, in <image> order
    where: str            # "file:line", so every message about a sample points at it
    question: str = None  # for the held-out generation eval (question/response records only)
    answer: str = None


def make_batch(examples: list, pad_id: int, config: R1VConfig, max_tiles: int, device) -> dict:
    """Right-padded batch: input_ids, attention_mask (1 real, 0 pad), labels (token id on assistant tokens, -100
    elsewhere; unshifted: position t's label is the token at t), pixel_values [tiles, 3, H, W] in sample order, which
    is the order model.embed fills the <IMG_CONTEXT> rows in. Right padding keeps every real token's position and
    causal context what it is alone, so padding cannot change a sample's loss."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n], attn[i, :n] = e.ids, 1
        labels[i, :n] = torch.where(e.mask, e.ids.long(), -100)
    tiles = [image_tiles(p, config, max_tiles) for e in examples for p in e.images]
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device),
            "pixel_values": torch.cat(tiles).to(device) if tiles else None}


def step_indices(step: int, n: int, per_rank: int, seed: int, rank: int = 0, world: int = 1) -> list:
    """Dataset indices this rank trains on at `step`: the step's global batch is the next per_rank * world items of
    data.shuffled_indices' seeded stream (a fresh permutation per epoch), ranks interleaved. A function of (seed,
    step) alone, so a resumed run reads exactly the samples the interrupted one would have."""
    return shuffled_indices(step * per_rank * world, per_rank * world, n, seed)[rank::world]


def to_messages(rec: dict, where: str, allow_untagged: bool) -> list | None:
    """A record -> chat messages, or None if an assistant turn lacks the reasoning format (and that is not allowed).
    A response that starts inside its reasoning (`... </think> \\boxed{}`, R1-style data whose template put `<think>`
    in the prompt) gets `<think>\\n` prepended, so every sample reads exactly like a thinking-mode generation."""
    if "messages" in rec:
        messages = rec["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    else:
        missing = [k for k in ("question", "response") if not isinstance(rec.get(k), str)]
        if missing:
            raise ValueError(f"{where}: need 'messages', or 'question' and 'response' strings "
                             f"(missing or not a string: {', '.join(missing)})")
        messages = [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec["response"]}]
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str):
            if not format_reward(m["content"]):
                if not allow_untagged:
                    return None
            elif not m["content"].lstrip().startswith(THINK_START):
                m = {**m, "content": THINK_PREFIX + m["content"]}
        out.append(m)
    return out


def truncate(ids: list, mask: list, max_len: int, img_context_id: int):
    """Truncation policy: cut the tail, i.e. the end of the response, and keep the sample; drop it only if the cut
    would leave no assistant token or would split an image's tokens (their count must match the tiles).
    Why: every kept token is still a correct next-token target given its prefix, so a cut long chain of thought is
    valid supervision for its beginning; dropping long samples instead would bias the data towards short answers,
    i.e. towards the easy problems. -> (ids, mask) or None to drop."""
    if len(ids) <= max_len:
        return ids, mask
    if not any(mask[:max_len]) or img_context_id in ids[max_len:]:
        return None
    return ids[:max_len], mask[:max_len]


def load_sft(path: str, tok: Tokenizer, cfg: SFTConfig, config: R1VConfig):
    """JSONL -> ([Example], stats). Every record and image is checked here (data.read_jsonl decodes every image),
    so a bad one fails now with its file:line rather than hours into the run, and every problem of the file is
    reported at once. Untagged and dropped samples are skipped (that is the documented behaviour), listed by line.
    """
    records = read_records(path, need=(), columns=parse_columns(cfg.columns))  # JSONL, or parquet rows
    examples, problems = [], []
    stats = {"samples": len(records), "untagged": 0, "untagged_at": [], "truncated": 0, "dropped": 0, "dropped_at": []}
    for rec in records:
        try:
            messages = to_messages(rec, rec.where, cfg.allow_untagged)
            if messages is None:
                stats["untagged"] += 1
                stats["untagged_at"].append(rec.where)
                continue
            tiles = [tile_count(p, config, cfg.max_tiles) for p in rec["images"]]
            ids, mask = encode_chat(tok, messages, tiles, config.num_image_token)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e) if str(e).startswith(rec.where) else f"{rec.where}: {e}")
            continue
        if not any(mask):
            problems.append(f"{rec.where}: no assistant turn, so nothing to train on")
            continue
        cut = truncate(ids, mask, cfg.max_len, config.img_context_token_id)
        if cut is None:
            stats["dropped"] += 1
            stats["dropped_at"].append(f"{rec.where} ({len(ids)} tokens, {sum(tiles)} tiles)")
            continue
        stats["truncated"] += len(cut[0]) < len(ids)
        ids, mask = torch.tensor(cut[0], dtype=torch.int32), torch.tensor(cut[1], dtype=torch.bool)
        examples.append(Example(ids, mask, rec["images"], rec.where, rec.get("question"), rec.get("answer")))
    if problems:
        raise DataError(path, problems)
    if stats["untagged"]:
        print(f"{path}: skipped {stats['untagged']} sample(s) whose assistant turn lacks <think>...</think> and "
              f"\\boxed{{}} (--allow-untagged trains on them): {lines(stats['untagged_at'])}")
    if stats["truncated"]:
        print(f"{path}: --max-len {cfg.max_len}: cut the response tail of {stats['truncated']} sample(s)")
    if stats["dropped"]:
        print(f"{path}: dropped {stats['dropped']} sample(s) whose prompt alone does not fit --max-len {cfg.max_len}"
              f" (image tokens included: 256 a tile at --max-tiles {cfg.max_tiles}): {lines(stats['dropped_at'])}; "
              f"raise --max-len or lower --max-tiles to keep them")
    stats["untagged_at"], stats["dropped_at"] = stats["untagged_at"][:MAX_PROBLEMS], stats["dropped_at"][:MAX_PROBLEMS]
    if not examples:
        raise cli.UserError(f"{path}: no usable samples ({stats['samples']} read, {stats['untagged']} untagged, "
                            f"{stats['dropped']} too long)")
    return examples, stats


def lines(where: list) -> str:
    """Up to MAX_PROBLEMS "file:line" places, then how many more."""
    more = len(where) - MAX_PROBLEMS
    return ", ".join(where[:MAX_PROBLEMS]) + (f" and {more} more" if more > 0 else "")


def synthetic_data(out_dir: str, n_train: int, n_eval: int, seed: int) -> tuple[str, str]:
    """Cold-start data for the default run: data.make_visual_task (count the red shapes) with data.reasoning_trace's
    answer per problem (walk the shapes keeping a running count, reflect once, then \\boxed{}), written as ordinary
    SFT JSONL so it goes through the same reader as user data. -> (train path, held-out path)."""
    paths = []
    for split, n in (("train", n_train), ("heldout", n_eval)):
        task = make_visual_task(out_dir, n, seed, split)
        path = os.path.join(out_dir, f"sft_{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for rec in read_jsonl(task):
                f.write(json.dumps({"images": [os.path.relpath(p, out_dir) for p in rec["images"]],
                                    "question": rec["question"], "response": reasoning_trace(rec),
                                    "answer": rec["answer"]}) + "\n")
        paths.append(path)
    return tuple(paths)


def parse_args(argv=None) -> SFTConfig:
    return parse_config(SFTConfig, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    cli.main(main, parse_args())
