"""GRPO for the vision-language model, top to bottom in one file.

Group Relative Policy Optimisation (DeepSeekMath, arXiv 2402.03300) as used for Skywork-R1V2/R1V3's RL stage:
for each prompt sample a group of G responses, score them with verifiable rewards (format + accuracy, rewards.py),
turn the rewards into group-relative advantages, and maximise a token-level clipped surrogate (PPO, arXiv
1707.06347) with clip-higher (DAPO, arXiv 2503.14476), token-mean aggregation and an optional k3 KL to a frozen
reference policy. R1V2's Selective Sample Buffer (arXiv 2504.16656) counters vanishing advantages (groups whose
rewards are all equal). One step:

    1. rollout      G responses per prompt from the current policy, each scored: r_i
    2. advantages   A_i = (r_i - mean_G r) / (std_G r + 1e-6); flat groups replaced from the sample buffer
    3. old log-probs  log pi_old(o_t) of every response token, once per rollout batch (and log pi_ref if beta > 0);
                    none when the update is one optimizer step: pi_old is then the policy being differentiated
    4. update       ppo_epochs passes of AdamW on the clipped surrogate, token-mean over each minibatch
    5. log          reward, accuracy, entropy, clip fractions, held-out accuracy every eval_every steps

Work done once per step, not per sample: each prompt's tiles go through the ViT once (the rollout and every
log-prob pass reuse the features while the ViT is frozen); each prompt is prefilled once and its KV cache copied
into its G sample rows. On W > 1 ranks the rollout decodes with a tensor-parallel copy of the decoder (tp.py),
not from the FSDP shards, which would all-gather every layer for every new token; the copy is made from the
current shards before the rollout and dropped before the update, whose memory peak it would otherwise raise.

    python grpo.py                                        # preset tiny: SFT first if out/sft is missing, CPU, minutes
    torchrun --nproc_per_node 8 grpo.py --ckpt Skywork-R1V3-38B --data math.jsonl    # the 38B, FSDP2 (parallel.py)
"""
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from checkpoint import latest_checkpoint, resume, save_checkpoint, trained_step
import cli
from cli import at_least, choice, parse_config
from data import Tokenizer, check_prompts, encode_prompt, make_visual_task, parse_columns, read_records, shuffled_indices
from logs import FlatWatch, MetricsLog, changed_fields, keep_last, plot_curves, prepare_run, truncation_rate
from model import R1VConfig, SkyworkR1V, token_logprobs_and_entropy
from optim import clip_grads, lr_at, make_optimizer, parse_train_spec
from parallel import Context, LayoutFlags, autocast, barrier, load, mean_over_ranks, setup
from rewards import accuracy_reward, format_reward, reward  # noqa: F401  (format_reward: re-exported)
from rollout import cat_pixels, generate_responses, heldout_accuracy, vit_once
from tp import check_divisible, make_decoder


@dataclass
class GRPOConfig(LayoutFlags):  # + --replicate, --tp-size (parallel.py)
    # model and data
    ckpt: str = "out/sft"         # starting point: the cold-start SFT model (release format)
    data: str = ""                # training problems: JSONL {"images": [...], "question", "answer"} or parquet
                                  # (a file or folder; --columns); "" = the synthetic visual task
    eval_data: str = ""           # held-out problems (same formats); with the synthetic task, its held-out split
    columns: str = ""             # parquet column names, e.g. question=problem,answer=solution,images=image
    out_dir: str = "out/grpo"     # metrics.jsonl, curves.png, rollouts.jsonl, step_N/ (release format + train_state/)
    train: str = "connector,llm"  # parts updated; the ViT stays frozen (R1V3: freezing it hurts least; saves memory)
    resume: bool = False          # continue the run in out_dir from its newest step_N
    overwrite: bool = False       # delete a previous run in out_dir first (without it, or --resume, it is refused)
    seed: int = 0                 # data order, sampling and minibatch order are functions of (seed, step, rank)
    synthetic_size: int = 2048    # synthetic training problems
    # rollouts
    steps: int = 200              # GRPO steps (each: a rollout batch, then ppo_epochs of updates)
    prompts_per_step: int = 64    # over all ranks; each rank generates for its share
    group_size: int = 8           # G responses per prompt
    max_new_tokens: int = 6144    # prompt (~2K with 7 tiles) + response <= 8K: the 38B memory plan (tools/plan.py)
    temperature: float = 1.0      # sampling temperature; log-probs are taken at the same temperature
    max_tiles: int = 12           # dynamic tiling limit per image
    rollout_batch_size: int = 8   # sequences per generate call per rank (bounds the KV cache: 8 x 8K x 256 KiB);
                                  # each call takes rollout_batch_size // group_size prompts, prefilled once each
    tp: bool = True               # on W > 1 ranks, generate from a tensor-parallel copy of the decoder (tp.py),
                                  # dropped for each update, rebuilt after it; --no-tp: from the FSDP shards (slow)
    compile: bool = False         # torch.compile the fixed-shape decode step (CUDA graphs on a GPU)
    # objective
    clip_low: float = 0.2         # ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher, DAPO)
    clip_high: float = 0.28       # the upper clip, wider than the lower one (DAPO's clip-higher)
    beta: float = 0.0             # k3 KL weight; 0 = off: no reference model is built, no extra forward
    scale_adv: bool = True        # A = (r - mean) / (std + eps); False: A = r - mean (Dr. GRPO, arXiv 2503.20783)
    format_weight: float = 0.5    # reward = accuracy + format_weight * format
    # optimisation
    lr: float = 1e-6              # peers' value for 32B decoders; constant after warmup
    warmup_steps: int = 0         # linear warmup steps of the learning rate
    weight_decay: float = 0.0     # AdamW's decoupled weight decay
    grad_clip: float = 1.0        # the gradient's global norm is clipped to this
    ppo_epochs: int = 1           # optimisation passes over each rollout batch
    minibatch_size: int = 128     # sequences per optimizer step (per rank)
    micro_batch_size: int = 1     # sequences per forward/backward (gradient accumulation inside a minibatch)
    grad_checkpointing: bool = True   # recompute each block in backward; the 38B plan needs it
    bf16_moments: bool = True     # Adam moments in bf16 (fp32 weights): 38B GRPO fits 80 GB with it (tools/plan.py)
    logprob_chunk: int = 1024     # tokens per lm_head chunk when computing log-probs / entropy
    # selective sample buffer (R1V2)
    buffer_capacity: int = 64     # samples kept
    buffer_max_age: int = 4       # steps a buffered sample stays usable (it gets staler every step)
    flat_threshold: float = 0.5   # mix buffered samples in when more than this fraction of groups is flat
    # bookkeeping
    eval_every: int = 10          # held-out accuracy (greedy decoding) every this many steps, and at 0 and the end
    eval_size: int = 256          # held-out problems evaluated
    save_every: int = 50          # checkpoint every this many steps (and at the end)
    keep_last: int = 0            # keep only the newest N step_* checkpoints (0 = all)
    log_rollouts: int = 2         # prompts per step whose G responses go to rollouts.jsonl, as text
    flat_patience: int = 5        # warn when every group is flat, or the gradient is 0, this many steps in a row
    preset: str = choice("r1v3", "tiny")  # where the defaults come from: r1v3 = the fields above; tiny = TINY_RUN
                                          # (`python grpo.py` without --ckpt picks tiny)

    def __post_init__(self):  # a bad value is one line naming the flag (cli.parse_config), before any work
        super().__post_init__()  # the layout
        at_least(self, 1, "steps", "prompts_per_step", "group_size", "max_new_tokens", "max_tiles",
                 "rollout_batch_size", "ppo_epochs", "minibatch_size", "micro_batch_size", "logprob_chunk",
                 "buffer_capacity", "eval_every", "save_every", "synthetic_size")
        at_least(self, 0, "clip_low", "clip_high", "beta", "lr", "warmup_steps", "weight_decay", "eval_size",
                 "buffer_max_age", "keep_last", "log_rollouts")
        parse_columns(self.columns)
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (log-probs are taken at it), got {self.temperature}")
        parse_train_spec(self.train)


# The default run (`python grpo.py`, no --ckpt): tiny model from `python sft.py`, synthetic task, CPU, minutes.
# The fields above are the 38B recipe (preset r1v3); `--preset` picks either, and the run prints what differs.
TINY_RUN = dict(steps=40, prompts_per_step=4, max_new_tokens=256, rollout_batch_size=32, lr=1e-4, ppo_epochs=2,
                minibatch_size=16, micro_batch_size=16, synthetic_size=512, eval_every=10, eval_size=64,
                save_every=20, grad_checkpointing=False, bf16_moments=False)
PRESETS = {"r1v3": {}, "tiny": TINY_RUN}


# ----------------------------------------------------------------------------------------------------------------
# 1. Rollout: G responses per prompt from the current policy, then their rewards.

class Prompt(NamedTuple):
    """A problem as the policy sees it, built once per step and shared by the rollout and every log-prob pass."""
    ids: torch.Tensor              # [P] long: the chat template, opening the assistant turn with <think>
    pixels: torch.Tensor | None    # [tiles,3,H,W]
    vit: torch.Tensor              # [tiles,1024,D_vit]: the ViT's output for those tiles (zero tiles: no image)


class Sample(NamedTuple):
    problem: int                   # index into the training problems (its Prompt is encoded once per step)
    response: torch.Tensor         # [L] long, ending at <|im_end|> unless cut at max_new_tokens


def encode_problems(problems: list, idxs: list, tok, m, cfg, ctx) -> dict:
    """{problem index: Prompt}. The images of all of them go through the ViT in one call (rollout.vit_once): a
    prompt's tiles are seen by the ViT once per step, not once per sample and pass."""
    idxs = list(dict.fromkeys(idxs))  # a problem drawn twice in a step (a small data set) is encoded once
    enc = [encode_prompt(tok, m.config, problems[i]["question"], problems[i]["images"], cfg.max_tiles) for i in idxs]
    vit = vit_once(m, [pixels for _, pixels in enc], ctx)
    return {i: Prompt(torch.tensor(ids), pixels, v) for i, (ids, pixels), v in zip(idxs, enc, vit)}


@torch.no_grad()
def sample_groups(m, tok, prompts: list[Prompt], cfg: GRPOConfig, ctx, gen, decoder=None) -> list[list[list[int]]]:
    """G responses per prompt. Each prompt is prefilled once and its G responses sampled from copies of its KV
    cache (rollout.generate_responses), by the tensor-parallel decoder when there is one. A response ends at
    <|im_end|> (kept: the policy must learn to stop) or after max_new_tokens. A sampled <IMG_CONTEXT> also ends it:
    fed back as input it would ask for an image that does not exist."""
    return generate_responses(m, [(p.ids, p.pixels) for p in prompts], ctx, pad_id=tok.pad_id,
                              group_size=cfg.group_size, stop_ids=[tok.eos_id, m.config.img_context_token_id],
                              generator=gen, batch_size=cfg.rollout_batch_size, vit_features=[p.vit for p in prompts],
                              decoder=decoder, compile=cfg.compile, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature)


def score(tok, groups: list, answers: list, reward_fn: Callable, max_new_tokens: int) -> tuple[torch.Tensor, dict]:
    """Responses (groups of token lists) and each group's gold answer -> (rewards [N], N = prompts * G, groups
    contiguous; stats: mean reward, accuracy, format, response length, tokens, and the truncation rate: responses
    cut at max_new_tokens, never answered)."""
    scores = []
    for answer, group in zip(answers, groups):
        for resp in group:
            text = tok.decode(resp, skip_special=True)
            scores.append((reward_fn(text, str(answer)), accuracy_reward(text, str(answer)), format_reward(text),
                           len(resp)))
    r, acc, fmt, length = (torch.tensor(x, dtype=torch.float64) for x in zip(*scores))
    return r.float(), {"reward": r.mean().item(), "accuracy": acc.mean().item(), "format": fmt.mean().item(),
                       "response_len": length.mean().item(), "tokens": length.sum().item(),
                       "truncation_rate": truncation_rate(sum(groups, []), [tok.eos_id], max_new_tokens)}


# ----------------------------------------------------------------------------------------------------------------
# 2. Advantages: group-relative, and the selective sample buffer for groups that carry none.

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [N] (N = prompts * G, groups contiguous) -> (advantages [N], flat [N // G] bool).

    A_i = (r_i - mean_g r) / (std_g r + 1e-6), unbiased std (GRPO eq. 3); scale=False gives r_i - mean_g r.
    A flat group (all rewards equal, including G = 1) has no signal: its advantages are exactly 0."""
    r = rewards.float().view(-1, group_size)                            # [P, G]
    flat = r.amax(1) == r.amin(1)                                       # [P]
    adv = r - r.mean(1, keepdim=True)
    if scale and group_size > 1:
        adv = adv / (r.std(1, keepdim=True) + 1e-6)
    return torch.where(flat[:, None], 0.0, adv).flatten(), flat


# Selective sample buffer (R1V2 sec. 3): when most groups are flat the batch carries little gradient. Keep recent
# samples whose advantage was large and re-inject them in place of samples from flat groups. Each buffered sample
# keeps the advantage it had in its own group; it is used once.

class SampleBuffer:
    def __init__(self, capacity: int = 64, max_age: int = 4, min_abs_adv: float = 1e-6):
        self.capacity, self.max_age, self.min_abs_adv = capacity, max_age, min_abs_adv
        self.items: list[tuple[int, float, Sample]] = []               # (step added, advantage, sample)

    def __len__(self):
        return len(self.items)

    def add(self, samples: list, advantages: list[float], step: int):
        """Keep samples with |A| > min_abs_adv; drop those older than max_age steps, then the smallest |A|."""
        self.items += [(step, float(a), s) for s, a in zip(samples, advantages) if abs(a) > self.min_abs_adv]
        self.items = [it for it in self.items if step - it[0] < self.max_age]
        self.items.sort(key=lambda it: (-abs(it[1]), -it[0]))          # largest |A| first, then newest
        del self.items[self.capacity:]

    def mix(self, samples: list, advantages: list[float], sample_is_flat: list[bool], flat_frac: float,
            threshold: float) -> tuple[list, list[float], int]:
        """If flat_frac > threshold, replace flat-group samples (A = 0) by buffered ones, best first.
        Returns (samples, advantages, number replaced); the inputs are not modified."""
        samples, advantages = list(samples), list(advantages)
        if flat_frac <= threshold or not self.items:
            return samples, advantages, 0
        slots = [i for i, f in enumerate(sample_is_flat) if f][:len(self.items)]
        for i, (_, a, s) in zip(slots, self.items):
            samples[i], advantages[i] = s, a
        del self.items[:len(slots)]
        return samples, advantages, len(slots)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat {name: tensor} (safetensors-friendly): each item's step, advantage and sample fields."""
        out = {}
        for i, (step, adv, sample) in enumerate(self.items):
            out.update({f"{i}.step": torch.tensor(step), f"{i}.adv": torch.tensor(adv, dtype=torch.float64),
                        f"{i}.sample.problem": torch.tensor(sample.problem), f"{i}.sample.response": sample.response})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        items = {}
        for name, t in state.items():
            i, key = name.split(".", 1)
            items.setdefault(int(i), {})[key] = t
        self.items = [(it["step"].item(), it["adv"].item(), Sample(it["sample.problem"].item(), it["sample.response"]))
                      for _, it in sorted(items.items())]


# ----------------------------------------------------------------------------------------------------------------
# 3. The update's batch, built once per step, and log-probs of its responses (old policy, reference, the policy
#    being updated) and the loss.

@dataclass
class Batch:
    """The update's sequences, one row per sample: [left pad | prompt | response | right pad], every prompt ending
    at column P, so the hidden states at columns P-1 .. P+R-2 predict the R response tokens. On the host; a
    micro-batch moves its rows to the device."""
    ids: torch.Tensor                    # [B, P+R] long
    attn: torch.Tensor                   # [B, P+R] 1 = real token
    targets: torch.Tensor                # [B, R] the response tokens, -100 after each response's end
    adv: torch.Tensor                    # [B] advantages
    prompt_len: torch.Tensor             # [B]
    images: list                         # per row: its prompt's ViT features (features=True) or pixels (or None)
    features: bool                       # images are ViT features (the ViT is frozen) rather than pixels
    old_logp: torch.Tensor | None = None  # [B, R] log pi_old; None: the update is on-policy (old_logprobs)
    ref_logp: torch.Tensor | None = None  # [B, R] log pi_ref when beta > 0

    def __len__(self) -> int:
        return len(self.adv)

    @property
    def lengths(self) -> torch.Tensor:  # [B] response tokens, counted on the host (no device sync)
        return (self.targets >= 0).sum(1)

    def rows(self, idx: list[int]) -> "Batch":
        """Rows idx, cut to their own longest prompt and response: the same tensors as padding them alone."""
        p, r = int(self.prompt_len[idx].max()), int(self.lengths[idx].max())
        P = self.ids.shape[1] - self.targets.shape[1]                  # where every prompt ends
        cut = lambda t: None if t is None else t[idx, :r]  # noqa: E731
        return Batch(self.ids[idx, P - p:P + r], self.attn[idx, P - p:P + r], self.targets[idx, :r], self.adv[idx],
                     self.prompt_len[idx], [self.images[i] for i in idx], self.features, cut(self.old_logp),
                     cut(self.ref_logp))


def make_batch(samples: list[Sample], adv: list[float], prompts: dict, pad_id: int, img_id: int,
               features: bool = True) -> Batch:
    """Samples (after the buffer mix) and their advantages -> the update's Batch."""
    ps = [prompts[s.problem] for s in samples]
    P, R = max(len(p.ids) for p in ps), max(len(s.response) for s in samples)
    ids, attn = torch.full((len(samples), P + R), pad_id), torch.zeros(len(samples), P + R, dtype=torch.long)
    targets = torch.full((len(samples), R), -100)
    for b, (p, s) in enumerate(zip(ps, samples)):
        lp, lr = len(p.ids), len(s.response)
        ids[b, P - lp:P], ids[b, P:P + lr], attn[b, P - lp:P + lr], targets[b, :lr] = p.ids, s.response, 1, s.response
    # A response can end with a sampled <IMG_CONTEXT> (sample_groups). As an input it only feeds positions after
    # the response, which are never read, but m.embed would count it as an image slot: blank it.
    ids[:, P:][ids[:, P:] == img_id] = pad_id
    images = [p.vit if features else p.pixels for p in ps]
    return Batch(ids, attn, targets, torch.tensor(adv, dtype=torch.float32), torch.tensor([len(p.ids) for p in ps]),
                 images, features)


def response_logprobs(m, batch: Batch, cfg: GRPOConfig, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (log p [B,R] fp32, entropy [B,R] fp32, mask [B,R] bool) of each response token under m. The images enter
    as the step's ViT features, or as pixels through m's ViT (when the ViT trains: with grad). Only the R response
    columns go through the chunked lm_head."""
    P = batch.ids.shape[1] - batch.targets.shape[1]
    # features: always a tensor (maybe of zero tiles): every rank takes the same path (the lockstep rule, parallel.py)
    vit = torch.cat(batch.images).to(ctx.device) if batch.features else None
    pix = None if batch.features else cat_pixels(batch.images)
    with autocast(ctx):
        h = m(batch.ids[:, :-1].to(ctx.device), None if pix is None else pix.to(ctx.device),
              batch.attn[:, :-1].to(ctx.device), return_hidden=True, vit_features=vit)[:, P - 1:]   # [B,R,D]
        logp, ent = token_logprobs_and_entropy(m.language_model.lm_head, h, batch.targets.to(ctx.device),
                                               cfg.temperature, cfg.logprob_chunk)
    return logp, ent, (batch.targets >= 0).to(ctx.device)


@torch.no_grad()
def batch_logprobs(m, batch: Batch, cfg: GRPOConfig, ctx) -> torch.Tensor:
    """log p [B,R] (0 after each response's end) of every response token under m (old policy or reference), in
    micro-batches, on the host."""
    out = torch.zeros(batch.targets.shape)
    for b in range(0, len(batch), cfg.micro_batch_size):
        rows = list(range(b, min(b + cfg.micro_batch_size, len(batch))))
        logp, _, _ = response_logprobs(m, batch.rows(rows), cfg, ctx)
        out[rows, :logp.shape[1]] = logp.float().cpu()
    return out


def on_policy(cfg: GRPOConfig, n_samples: int) -> bool:
    """One epoch and one minibatch: the update is a single optimizer step from the rollout's policy."""
    return cfg.ppo_epochs == 1 and cfg.minibatch_size >= n_samples


def old_logprobs(m, batch: Batch, cfg: GRPOConfig, ctx) -> torch.Tensor | None:
    """log pi_old of every response, or None when the update is on-policy: one epoch and one minibatch make a single
    optimizer step, so the policy the update differentiates is pi_old itself and its log-probs, detached, are the
    old ones (ratio 1; the clipped surrogate's gradient is then -A grad log pi). optimise uses them and the separate
    no-grad pass over every sequence is skipped, as verl does for on-policy updates."""
    return None if on_policy(cfg, len(batch)) else batch_logprobs(m, batch, cfg, ctx)


def ref_logprobs(ref, batch: Batch, cfg: GRPOConfig, ctx) -> torch.Tensor | None:
    """log pi_ref of every response for the k3 KL term, or None without a reference (beta = 0)."""
    return None if ref is None else batch_logprobs(ref, batch, cfg, ctx)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 0.2, clip_high: float = 0.28, beta: float = 0.0, logp_ref: torch.Tensor | None = None,
              num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """Token-level clipped surrogate. logp, logp_old, logp_ref, mask [B,T] (mask 1 = response token), adv [B].

    ratio = exp(clamp(logp - logp_old, -20, 20))
    L_t   = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))  (+ beta k3_t)
    k3_t  = exp(x) - x - 1, x = logp_ref - logp  (unbiased, >= 0, Schulman's "Approximating KL")
    loss  = sum_t L_t mask_t / num_tokens: token-mean over the batch (DAPO), num_tokens defaults to mask.sum();
            pass the whole batch's count when accumulating gradients over micro-batches."""
    mask = mask.float()
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    log_ratio = (logp - logp_old).clamp(-20, 20)
    ratio = log_ratio.exp()
    a = adv[:, None].float()
    unclipped, clipped = -a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    metrics = {}
    tokens = mask.sum().clamp(min=1)
    if beta:
        x = logp_ref - logp
        kl = x.exp() - x - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * mask).sum() / tokens
    loss = (per_token * mask).sum() / n
    with torch.no_grad():  # 0-dim tensors, read when logging: no host sync per micro-batch
        is_clipped = (clipped > unclipped).float() * mask               # the clipped branch won: zero gradient
        metrics.update(
            clip_frac=is_clipped.sum() / tokens,
            clip_frac_high=(is_clipped * (ratio > 1 + clip_high)).sum() / tokens,
            clip_frac_low=(is_clipped * (ratio < 1 - clip_low)).sum() / tokens,
            approx_kl_old=((ratio - 1 - log_ratio) * mask).sum() / tokens,   # k3 of old vs new
            ratio_mean=(ratio * mask).sum() / tokens,
        )
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# 4. Update: ppo_epochs passes of AdamW over the batch, in shuffled minibatches, accumulated over micro-batches.

def optimise(policy, opt, batch: Batch, cfg: GRPOConfig, ctx, gen) -> dict:
    """One AdamW step per minibatch; a non-finite loss or gradient skips the step (warning): the weights and the
    optimizer state stay untouched. -> metrics averaged over the steps taken, and skipped_updates."""
    sums, skipped, updates = {}, 0, 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(batch), generator=gen, device=gen.device).cpu()  # (gen: on the GPU there)
        for mb in order.split(cfg.minibatch_size):
            opt.zero_grad(set_to_none=True)
            loss, grad_norm, metrics = minibatch_gradients(policy, batch.rows(mb.tolist()), cfg, ctx)
            if not torch.isfinite(loss + grad_norm):  # the one host sync of an optimizer step
                warnings.warn(f"non-finite loss {float(loss)} / grad norm {float(grad_norm)}: update skipped")
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            opt.step()
            updates += 1
            for k, v in {"loss": loss, "grad_norm": grad_norm, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
    opt.zero_grad(set_to_none=True)
    return {**{k: float(v) / max(updates, 1) for k, v in sums.items()}, "skipped_updates": skipped}


def minibatch_gradients(policy, mb: Batch, cfg: GRPOConfig, ctx) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Gradients of the minibatch's token-mean loss, accumulated over micro-batches, clipped -> (loss, gradient norm,
    token-weighted metrics), all 0-dim tensors: nothing here waits for the device."""
    n_tokens = mb.lengths.sum().item()                                  # host tensor: no device sync
    loss_sum, parts = 0.0, []
    for b in range(0, len(mb), cfg.micro_batch_size):
        micro = mb.rows(list(range(b, min(b + cfg.micro_batch_size, len(mb)))))
        logp, ent, mask = response_logprobs(policy, micro, cfg, ctx)
        old = logp.detach() if micro.old_logp is None else micro.old_logp.to(ctx.device)  # (old_logprobs)
        ref = None if micro.ref_logp is None else micro.ref_logp.to(ctx.device)
        loss, metrics = grpo_loss(logp, old, micro.adv.to(ctx.device), mask, cfg.clip_low, cfg.clip_high, cfg.beta,
                                  ref, num_tokens=n_tokens)
        loss.backward()
        metrics["entropy"] = (ent.detach() * mask).sum() / mask.sum().clamp(min=1)  # of the policy being updated
        loss_sum = loss_sum + loss.detach()
        parts.append((micro.lengths.sum().item(), metrics))
    grad_norm = clip_grads(policy, cfg.grad_clip)
    metrics = {k: sum(w * mt[k] for w, mt in parts) / max(n_tokens, 1) for k in parts[0][1]}
    return loss_sum, grad_norm, metrics


# ----------------------------------------------------------------------------------------------------------------
# The loop. Everything but the five steps (set-up, resume, evaluation, logging, saving) is in the helpers below it.

def train(cfg: GRPOConfig, reward_fn=None) -> list[dict]:
    """Run GRPO; returns the metrics of every step (also in out_dir/metrics.jsonl). reward_fn(text, answer) ->
    float defaults to accuracy + format_weight * format."""
    run = start(cfg, reward_fn or (lambda text, answer: reward(text, answer, cfg.format_weight)))
    ctx, tok, policy, opt, buffer, decoder = run.ctx, run.tok, run.policy, run.opt, run.buffer, None
    for step in tqdm(range(run.step + 1, cfg.steps + 1), initial=run.step, total=cfg.steps, desc="grpo",
                     disable=not ctx.is_main):
        t0, gen = time.perf_counter(), step_generator(cfg, ctx, step, "sampling")
        set_lr(opt, cfg, step)
        idxs = prompt_indices(step, len(run.problems), cfg.prompts_per_step, cfg.seed)[ctx.rank::ctx.world]
        prompts = encode_problems(run.problems, idxs, tok, policy, cfg, ctx)                   # the ViT, once
        decoder, t_copy = rollout_copy(run, decoder)              # tp.py: from the current shards (None: 1 process)
        groups = sample_groups(policy, tok, [prompts[i] for i in idxs], cfg, ctx, gen, decoder)          # 1
        rewards, stats = score(tok, groups, [run.problems[i]["answer"] for i in idxs], run.reward_fn,
                               cfg.max_new_tokens)
        t_rollout = time.perf_counter() - t0
        decoder = decoder if run.decoder_frozen else None         # dropped: the update's memory peak is without it
        adv, flat = group_advantages(rewards, cfg.group_size, cfg.scale_adv)                               # 2
        samples = [Sample(i, torch.tensor(r, dtype=torch.long)) for i, group in zip(idxs, groups) for r in group]
        flat_frac = flat.float().mean().item()
        mixed, mixed_adv, n_mixed = buffer.mix(samples, adv.tolist(), flat.repeat_interleave(cfg.group_size).tolist(),
                                               flat_frac, cfg.flat_threshold)
        buffer.add(samples, adv.tolist(), step)
        prompts.update(encode_problems(run.problems, [s.problem for s in mixed if s.problem not in prompts], tok,
                                       policy, cfg, ctx))                                 # buffered problems
        batch = make_batch(mixed, mixed_adv, prompts, tok.pad_id, policy.config.img_context_token_id, run.vit_frozen)
        batch.old_logp = old_logprobs(policy, batch, cfg, ctx)                                             # 3
        batch.ref_logp = ref_logprobs(run.ref, batch, cfg, ctx)
        metrics = optimise(policy, opt, batch, cfg, ctx, step_generator(cfg, ctx, step, "minibatches"))   # 4
        metrics.update(stats, flat_frac=flat_frac, buffer_mixed=n_mixed, buffer_size=len(buffer),         # 5
                       lr=opt.param_groups[0]["lr"], rollout_time=t_rollout, refresh_time=t_copy,
                       vit_tiles=sum(p.vit.shape[0] for p in prompts.values()))
        run.rollouts.write_rows(step, rollout_rows(run, idxs, groups, rewards))                 # as text
        end_step(run, step, metrics, t0, decoder)
    return run.history


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping: set-up and resume, data, per-step RNG and learning rate, the rollout copy, evaluation, logging, saving.

@dataclass
class Run:
    """What the loop works with, built once by start(): fresh, or resumed from the newest out_dir/step_N."""
    cfg: GRPOConfig
    ctx: Context
    tok: Tokenizer
    problems: list[dict]                 # the training problems
    heldout: list[dict]
    policy: SkyworkR1V
    ref: SkyworkR1V | None               # the frozen initial policy, only when beta > 0
    opt: torch.optim.Optimizer
    buffer: SampleBuffer
    reward_fn: Callable
    log: MetricsLog = None               # metrics.jsonl; rollouts.jsonl and heldout_answers.jsonl: text to read
    rollouts: MetricsLog = None
    answers: MetricsLog = None
    watch: FlatWatch = None
    step: int = 0                        # the last step done
    history: list = field(default_factory=list)

    @property
    def vit_frozen(self) -> bool:        # the step's ViT features stand for the pixels in every pass
        return not any(p.requires_grad for p in self.policy.vision_model.parameters())

    @property
    def decoder_frozen(self) -> bool:    # connector-only tuning: the rollout copy never changes, keep it
        return not any(p.requires_grad for p in self.policy.language_model.parameters())


def start(cfg: GRPOConfig, reward_fn: Callable) -> Run:
    """Checks (checkpoint, data, run directory) before any weight is read, then the policy (and reference),
    optimizer and sample buffer; resumed state if asked."""
    if not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        hint = " Run `python sft.py` first: GRPO starts from the cold-start SFT model." if cfg.ckpt == "out/sft" else ""
        raise FileNotFoundError(f"no checkpoint at {cfg.ckpt!r} (config.json missing).{hint}")
    ctx = setup(seed=cfg.seed, layout=cfg)
    if cfg.prompts_per_step % ctx.world:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} must be a multiple of the world size {ctx.world}")
    if cfg.tp and ctx.world > 1:  # (checked when the flags were read too, unless the checkpoint was made since)
        check_divisible(R1VConfig.from_dir(cfg.ckpt).llm, ctx.layout.tp_size)
    ckpt_dir = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if cfg.resume and ckpt_dir is None and ctx.is_main:
        print(f"--resume: no step_* checkpoint in {cfg.out_dir}, starting from {cfg.ckpt}")
    data = load_problems(cfg, ctx.is_main) if cfg.data else None        # the user's data: checked first
    claim_run(cfg, ctx, ckpt_dir)
    problems, heldout = data or load_problems(cfg, ctx.is_main)         # the synthetic task is written in out_dir
    policy = load(ckpt_dir or cfg.ckpt, ctx, train=cfg.train, grad_checkpointing=cfg.grad_checkpointing)
    # the reference is only ever read: sharded like the policy, in the compute dtype (2 B/param)
    ref = load(cfg.ckpt, ctx, train="none", dtype=ctx.dtype).eval() if cfg.beta else None
    opt = make_optimizer(policy, cfg.lr, cfg.weight_decay,
                         moments_dtype=torch.bfloat16 if cfg.bf16_moments else torch.float32)
    run = Run(cfg, ctx, Tokenizer.from_dir(cfg.ckpt), problems, heldout, policy, ref, opt,
              SampleBuffer(cfg.buffer_capacity, cfg.buffer_max_age), reward_fn, watch=FlatWatch(cfg.flat_patience))
    if ckpt_dir:
        run.step, _, tensors = resume(ckpt_dir, policy, opt)
        run.buffer.load_state_dict({k.removeprefix("buffer."): v for k, v in tensors.items() if k.startswith("buffer.")})
    run.log, run.rollouts, run.answers = (
        MetricsLog(os.path.join(cfg.out_dir, name), ctx.is_main, run.step if ckpt_dir else None)
        for name in ("metrics.jsonl", "rollouts.jsonl", "heldout_answers.jsonl"))
    if run.step == 0 and heldout:
        run.history.append({"step": 0, "heldout_accuracy": evaluate(run, 0)})
        run.log.write(0, {"heldout_accuracy": run.history[-1]["heldout_accuracy"]})
    return run


def claim_run(cfg: GRPOConfig, ctx, ckpt_dir):
    """out_dir holding a previous run is refused unless --resume or --overwrite (logs.prepare_run); the resolved
    config is printed and written to out_dir/run_config.json."""
    prepare_run([cfg.out_dir], cfg, resume=cfg.resume, overwrite=cfg.overwrite,
                config_path=os.path.join(cfg.out_dir, "run_config.json"), preset=cfg.preset,
                step=trained_step(ckpt_dir) if ckpt_dir else None, schedule=("steps", "lr", "warmup_steps"),
                lr_at=lambda c, s: lr_at(s, c["steps"], c["lr"], c["warmup_steps"], min_lr_ratio=1.0),
                is_main=ctx.is_main, prog="grpo.py", barrier=barrier)
    barrier()


def load_problems(cfg: GRPOConfig, is_main: bool = True) -> tuple[list[dict], list[dict]]:
    """-> (train, held-out) problem lists. User data is checked whole before anything else happens: every record,
    image and prompt (data.read_jsonl, data.check_prompts), every problem as FILE:LINE."""
    if cfg.data:
        need, columns = ("question", "answer"), parse_columns(cfg.columns)
        sets = [read_records(cfg.data, need, columns), read_records(cfg.eval_data, need, columns) if cfg.eval_data
                else []]
        tok, config = Tokenizer.from_dir(cfg.ckpt), R1VConfig.from_dir(cfg.ckpt)
        for records in sets:
            check_prompts(records, tok, config, cfg.max_tiles, cfg.max_new_tokens)
        return sets[0], sets[1]
    # RL problems are new to the SFT model (seed + 1; sft.py trains on `seed`, as the paper's RL set is not its
    # cold-start set); the held-out split is the one sft.py evaluates on. Same seeds -> same files on resume.
    root = os.path.join(cfg.out_dir, "data")
    if is_main:
        make_visual_task(root, cfg.synthetic_size, cfg.seed + 1, "train")
        make_visual_task(root, cfg.eval_size, cfg.seed, "heldout")
    barrier()
    heldout = read_records(os.path.join(root, "heldout.jsonl"), ("question", "answer")) if cfg.eval_size else []
    return read_records(os.path.join(root, "train.jsonl"), ("question", "answer")), heldout


def prompt_indices(step: int, n: int, k: int, seed: int) -> list[int]:
    """The k problems of step `step` (1-based), from data.shuffled_indices: a pure function of the step."""
    return shuffled_indices((step - 1) * k, k, n, seed)


STREAMS = {"sampling": 0, "minibatches": 1 << 40}  # one random stream per use, apart by far more than any seed


def step_generator(cfg: GRPOConfig, ctx, step: int, use: str) -> torch.Generator:
    """The generator of one use ("sampling" the rollout, or the "minibatches" order of the update) in a step,
    seeded by (seed, step, rank, use): a resumed run makes exactly the same choices. One stream per use because how
    many numbers the rollout draws depends on where its rows finish and how often the host checks
    (generate.CHECK_EVERY): a shared stream let that knob reshuffle the update."""
    return torch.Generator(ctx.device).manual_seed(cfg.seed * 1_000_003 + step * 1_009 + ctx.rank + STREAMS[use])


def set_lr(opt, cfg: GRPOConfig, step: int):
    for group in opt.param_groups:
        group["lr"] = lr_at(step - 1, cfg.steps, cfg.lr, cfg.warmup_steps, min_lr_ratio=1.0)


def rollout_copy(run: Run, decoder=None) -> tuple[object, float]:
    """The tensor-parallel copy of the policy's decoder for generation (tp.make_decoder: an empty copy filled from
    the FSDP shards) -> (copy, seconds). An existing copy is kept (a frozen decoder); None on one process or with
    --no-tp (generation then uses the policy itself)."""
    if decoder is not None or not run.cfg.tp:
        return decoder, 0.0
    t0 = time.perf_counter()
    decoder = make_decoder(run.policy, run.ctx.dtype)
    return decoder, time.perf_counter() - t0


def evaluate(run: Run, step: int, decoder=None) -> float:
    """Held-out accuracy with greedy decoding (rollout.heldout_accuracy), from a rollout copy of the current policy;
    the answers go to heldout_answers.jsonl."""
    decoder, _ = rollout_copy(run, decoder)
    ev = heldout_accuracy(run.policy, run.tok, run.heldout, run.ctx, max_new_tokens=run.cfg.max_new_tokens,
                          batch_size=run.cfg.rollout_batch_size, max_tiles=run.cfg.max_tiles, decoder=decoder,
                          compile=run.cfg.compile)
    run.answers.write_rows(step, ev["answers"])
    return ev["accuracy"]


def rollout_rows(run: Run, idxs: list, groups: list, rewards: torch.Tensor) -> list[dict]:
    """The first log_rollouts prompts of the step with their G responses as text, rewards and gold answers."""
    G, rows = run.cfg.group_size, []
    for k, (i, group) in enumerate(zip(idxs[:run.cfg.log_rollouts], groups)):
        p = run.problems[i]
        rows += [{"problem": i, "question": p["question"], "images": p.get("images", []), "answer": p["answer"],
                  "response": run.tok.decode(r), "reward": rewards[k * G + j].item(), "tokens": len(r)}
                 for j, r in enumerate(group)]
    return rows


def end_step(run: Run, step: int, metrics: dict, t0: float, decoder=None):
    """Average the step's metrics over ranks, evaluate / log / save when due; the curves are redrawn after each
    evaluation and at the end, from the log with this step in it (a killed run keeps them)."""
    cfg = run.cfg
    metrics = mean_over_ranks(metrics)
    metrics.update(tokens_per_s=metrics["tokens"] / metrics["rollout_time"], step_time=time.perf_counter() - t0)
    run.watch.update(step, metrics["flat_frac"], metrics.get("grad_norm"))  # warns when nothing is being learnt
    if run.heldout and (step % cfg.eval_every == 0 or step == cfg.steps):
        metrics["heldout_accuracy"] = evaluate(run, step, decoder)
    run.log.write(step, metrics)
    run.history.append({"step": step, **metrics})
    if "heldout_accuracy" in metrics or step == cfg.steps:
        draw_curves(run)
    if step % cfg.save_every == 0 or step == cfg.steps:
        save_checkpoint(os.path.join(cfg.out_dir, f"step_{step:06d}"), run.policy, run.opt, step,
                        extra={"config": asdict(cfg)},
                        tensors={f"buffer.{k}": v for k, v in run.buffer.state_dict().items()})
        if run.ctx.is_main:
            keep_last(cfg.out_dir, cfg.keep_last)
        barrier()


CURVES = ["reward", "accuracy", "heldout_accuracy", "format", "response_len", "truncation_rate", "entropy",
          "clip_frac", "flat_frac", "grad_norm", "lr", "step_time"]


def draw_curves(run: Run):
    if run.ctx.is_main:
        plot_curves(run.log.path, os.path.join(run.cfg.out_dir, "curves.png"), CURVES)


def parse_args(argv=None) -> GRPOConfig:
    """Flags over a preset's defaults: --preset, else tiny without --ckpt (the default run) and r1v3 with it."""
    def defaults(flags):
        name = flags.get("preset") or ("r1v3" if "ckpt" in flags else "tiny")
        return {"preset": name, **PRESETS.get(name, {})}
    return parse_config(GRPOConfig, argv, __doc__.splitlines()[0], defaults=defaults, preset_name="preset tiny")


def describe_preset(cfg: GRPOConfig) -> str:
    """'preset: tiny (steps=40, ...)': the values in force that differ from GRPOConfig's defaults (the recipe)."""
    differ = changed_fields(cfg) - {"preset"}
    changed = [f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg) if f.name in differ]
    return f"preset: {cfg.preset} ({', '.join(changed) or 'the recipe defaults'})"


def main(argv=None) -> int:
    cfg = parse_args(argv)
    t = time.perf_counter()
    if os.environ.get("RANK", "0") == "0":
        print(describe_preset(cfg))
    if cfg.ckpt == GRPOConfig.ckpt and not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        # the paper's pipeline: RL starts from the cold-start SFT model, so make it first. A short cold start
        # (110 of sft.py's 300 steps) leaves RL something to show in minutes (docs/results.md).
        import sft
        print(f"no {cfg.ckpt}: running the cold-start SFT stage first (python sft.py --steps 110)")
        sft.main(sft.SFTConfig(out=cfg.ckpt, steps=110))
    history = train(cfg)
    if history and "heldout_accuracy" in history[-1] and os.environ.get("RANK", "0") == "0":
        first = next(h["heldout_accuracy"] for h in history if "heldout_accuracy" in h)
        print(f"held-out accuracy {first:.3f} -> {history[-1]['heldout_accuracy']:.3f} in "
              f"{time.perf_counter() - t:.0f} s; metrics and curves in {cfg.out_dir}/")
    return 0


if __name__ == "__main__":
    cli.main(main, prog="grpo.py")
