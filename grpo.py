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
    4. update       ppo_epochs passes of AdamW on the clipped surrogate, token-mean over each minibatch; the
                    rollout copy of the decoder is dropped for it and rebuilt with the new weights after it
    5. log          reward, accuracy, entropy, clip fractions, held-out accuracy every eval_every steps

Work done once per step, not per sample: each prompt's tiles go through the ViT once (the rollout and every
log-prob pass reuse the features while the ViT is frozen); each prompt is prefilled once and its KV cache copied
into its G sample rows. On W > 1 ranks the rollout decodes with a tensor-parallel copy of the decoder (tp.py),
not from the FSDP shards, which would all-gather every layer for every new token.

    python grpo.py                                        # tiny default: SFT first if out/sft is missing, CPU, minutes
    torchrun --nproc_per_node 8 grpo.py --ckpt Skywork-R1V3-38B --data math.jsonl    # the 38B, FSDP2 (parallel.py)
"""
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from tqdm import tqdm

from checkpoint import latest_checkpoint, resume, save_checkpoint
from cli import at_least, parse_config
from data import Tokenizer, encode_prompt, make_visual_task, read_jsonl, shuffled_indices
from logs import MetricsLog, plot_curves
from model import R1VConfig, token_logprobs_and_entropy
from optim import clip_grads, lr_at, make_optimizer, parse_train_spec
from parallel import LayoutFlags, autocast, barrier, load, mean_over_ranks, setup
from rewards import accuracy_reward, format_reward, reward  # noqa: F401  (format_reward: re-exported)
from rollout import cat_pixels, generate_responses, heldout_accuracy, vit_once
from tp import check_divisible, make_decoder


@dataclass
class GRPOConfig(LayoutFlags):  # + --replicate, --tp-size (parallel.py)
    # model and data
    ckpt: str = "out/sft"         # starting point: the cold-start SFT model (release format)
    data: str = ""                # training JSONL {"images": [...], "question", "answer"}; "" = synthetic visual task
    eval_data: str = ""           # held-out JSONL; with the synthetic task, its held-out split
    out_dir: str = "out/grpo"     # metrics.jsonl, curves.png, step_N/ (release format + train_state/)
    train: str = "connector,llm"  # parts updated; the ViT stays frozen (R1V3: freezing it hurts least; saves memory)
    resume: bool = False          # continue from out_dir/ckpt
    seed: int = 0
    synthetic_size: int = 2048    # synthetic training problems
    # rollouts
    steps: int = 200
    prompts_per_step: int = 64    # over all ranks; each rank generates for its share
    group_size: int = 8           # G responses per prompt
    max_new_tokens: int = 6144    # prompt (~2K with 7 tiles) + response <= 8K: the 38B memory plan (plan.py)
    temperature: float = 1.0      # sampling temperature; log-probs are taken at the same temperature
    max_tiles: int = 12           # dynamic tiling limit per image
    rollout_batch_size: int = 8   # sequences per generate call per rank (bounds the KV cache: 8 x 8K x 256 KiB);
                                  # each call takes rollout_batch_size // group_size prompts, prefilled once each
    tp: bool = True               # on W > 1 ranks, generate from a tensor-parallel copy of the decoder (tp.py),
                                  # dropped for each update, rebuilt after it; --no-tp: from the FSDP shards (slow)
    compile: bool = False         # torch.compile the fixed-shape decode step (CUDA graphs on a GPU)
    # objective
    clip_low: float = 0.2         # ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher, DAPO)
    clip_high: float = 0.28
    beta: float = 0.0             # k3 KL weight; 0 = off: no reference model is built, no extra forward
    scale_adv: bool = True        # A = (r - mean) / (std + eps); False: A = r - mean (Dr. GRPO, arXiv 2503.20783)
    format_weight: float = 0.5    # reward = accuracy + format_weight * format
    # optimisation
    lr: float = 1e-6              # peers' value for 32B decoders; constant after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1           # optimisation passes over each rollout batch
    minibatch_size: int = 128     # sequences per optimizer step (per rank)
    micro_batch_size: int = 1     # sequences per forward/backward (gradient accumulation inside a minibatch)
    grad_checkpointing: bool = True   # recompute each block in backward; the 38B plan needs it
    bf16_moments: bool = True     # Adam moments in bf16 (fp32 weights): 38B GRPO fits 80 GB with it (plan.py)
    logprob_chunk: int = 1024     # tokens per lm_head chunk when computing log-probs / entropy
    # selective sample buffer (R1V2)
    buffer_capacity: int = 64     # samples kept
    buffer_max_age: int = 4       # steps a buffered sample stays usable (it gets staler every step)
    flat_threshold: float = 0.5   # mix buffered samples in when more than this fraction of groups is flat
    # bookkeeping
    eval_every: int = 10          # held-out accuracy (greedy decoding) every this many steps, and at 0 and the end
    eval_size: int = 256          # held-out problems evaluated
    save_every: int = 50

    def __post_init__(self):  # a bad value is one line naming the flag (cli.parse_config), before any work
        super().__post_init__()  # the layout
        at_least(self, 1, "steps", "prompts_per_step", "group_size", "max_new_tokens", "max_tiles",
                 "rollout_batch_size", "ppo_epochs", "minibatch_size", "micro_batch_size", "logprob_chunk",
                 "buffer_capacity", "eval_every", "save_every", "synthetic_size")
        at_least(self, 0, "clip_low", "clip_high", "beta", "lr", "warmup_steps", "weight_decay", "eval_size",
                 "buffer_max_age")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (log-probs are taken at it), got {self.temperature}")
        parse_train_spec(self.train)


# The default run (`python grpo.py`, no --ckpt): tiny model from `python sft.py`, synthetic task, CPU, minutes.
TINY_RUN = dict(steps=40, prompts_per_step=4, max_new_tokens=256, rollout_batch_size=32, lr=1e-4, ppo_epochs=2,
                minibatch_size=16, micro_batch_size=16, synthetic_size=512, eval_every=10, eval_size=64,
                save_every=20, grad_checkpointing=False, bf16_moments=False)


# ----------------------------------------------------------------------------------------------------------------
# 1. Rollout: G responses per prompt from the current policy, scored.

class Prompt(NamedTuple):
    """A problem as the policy sees it, built once per step and shared by the rollout and every log-prob pass."""
    ids: torch.Tensor              # [P] long: the chat template, opening the assistant turn with <think>
    pixels: torch.Tensor | None    # [tiles,3,H,W]
    vit: torch.Tensor              # [tiles,1024,D_vit]: the ViT's output for those tiles (zero tiles: no image)


def encode_problems(problems: list, idxs: list, tok, m, cfg, ctx) -> dict:
    """{problem index: Prompt}. The images of all of them go through the ViT in one call (rollout.vit_once): a
    prompt's tiles are seen by the ViT once per step, not once per sample and pass (8 x (2 + ppo_epochs) before)."""
    idxs = list(dict.fromkeys(idxs))  # a problem drawn twice in a step (a small data set) is encoded once
    enc = [encode_prompt(tok, m.config, problems[i]["question"], problems[i]["images"], cfg.max_tiles) for i in idxs]
    vit = vit_once(m, [pixels for _, pixels in enc], ctx)
    return {i: Prompt(torch.tensor(ids), pixels, v) for i, (ids, pixels), v in zip(idxs, enc, vit)}


@torch.no_grad()
def rollout(m, tok, problems, idxs, prompts: dict, cfg, ctx, gen, reward_fn, decoder=None) -> tuple[list[dict], dict]:
    """Problems idxs, encoded in prompts -> (samples [{"problem": i, "response": ids [L] long}], stats incl.
    "rewards" [N] with N = len(idxs) * G,
    groups contiguous). Each prompt is prefilled once and its G responses sampled from copies of its KV cache
    (rollout.generate_responses), by the tensor-parallel decoder when there is one. Each response ends at
    <|im_end|> (kept: the policy must learn to stop) or after max_new_tokens. A sampled <IMG_CONTEXT> also ends
    it: fed back as input it would ask for an image that does not exist."""
    groups = generate_responses(m, [(prompts[i].ids, prompts[i].pixels) for i in idxs], ctx, pad_id=tok.pad_id,
                                group_size=cfg.group_size, stop_ids=[tok.eos_id, m.config.img_context_token_id],
                                generator=gen, batch_size=cfg.rollout_batch_size,
                                vit_features=[prompts[i].vit for i in idxs], decoder=decoder, compile=cfg.compile,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    samples, scores = [], []
    for i, group in zip(idxs, groups):
        answer = str(problems[i]["answer"])
        for resp in group:
            text = tok.decode(resp, skip_special=True)
            samples.append({"problem": i, "response": torch.tensor(resp, dtype=torch.long)})
            scores.append((reward_fn(text, answer), accuracy_reward(text, answer), format_reward(text), len(resp)))
    r, acc, fmt, length = (torch.tensor(x, dtype=torch.float64) for x in zip(*scores))
    return samples, {"rewards": r.float(), "reward": r.mean().item(), "accuracy": acc.mean().item(),
                     "format": fmt.mean().item(), "response_len": length.mean().item(), "tokens": length.sum().item()}


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
        self.items: list[tuple[int, float, object]] = []               # (step added, advantage, sample)

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
        """Flat {name: tensor} (safetensors-friendly): each item's step, advantage and sample fields
        (samples are dicts of tensors / ints / floats)."""
        out = {}
        for i, (step, adv, sample) in enumerate(self.items):
            for key, v in {"step": step, "adv": adv, **{f"sample.{k}": x for k, x in sample.items()}}.items():
                out[f"{i}.{key}"] = v if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float64 if
                                                                               isinstance(v, float) else torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        items = {}
        for name, t in state.items():
            i, key = name.split(".", 1)
            items.setdefault(int(i), {})[key] = t.item() if t.dim() == 0 else t
        self.items = [(it.pop("step"), it.pop("adv"), {k.removeprefix("sample."): v for k, v in it.items()})
                      for _, it in sorted(items.items())]


# ----------------------------------------------------------------------------------------------------------------
# 3. Log-probs of the sampled responses (old policy, reference, and the policy being updated) and the loss.

def response_logprobs(m, samples: list[dict], prompts: dict, pad_id: int, cfg: GRPOConfig, ctx, features=True):
    """-> (log p [B,R] fp32, entropy [B,R] fp32, mask [B,R] bool) of each response token under m. The images enter
    as the step's ViT features (features=True), or as pixels through m's ViT (when the ViT trains: with grad).

    Rows are [left pad | prompt | response | right pad] with every prompt ending at column P, so the hidden
    states at columns P-1 .. P+R-2 predict the R response columns; only those go through the chunked lm_head."""
    ps = [prompts[s["problem"]] for s in samples]
    P, R = max(len(p.ids) for p in ps), max(len(s["response"]) for s in samples)
    ids, attn = torch.full((len(samples), P + R), pad_id), torch.zeros(len(samples), P + R, dtype=torch.long)
    targets = torch.full((len(samples), R), -100)
    for b, (p, s) in enumerate(zip(ps, samples)):
        lp, lr = len(p.ids), len(s["response"])
        ids[b, P - lp:P], ids[b, P:P + lr], attn[b, P - lp:P + lr], targets[b, :lr] = p.ids, s["response"], 1, s["response"]
    # A response can end with a sampled <IMG_CONTEXT> (see rollout). As an input it only feeds positions after
    # the response, which are never read, but m.embed would count it as an image slot: blank it.
    ids[:, P:][ids[:, P:] == m.config.img_context_token_id] = pad_id
    # features: always a tensor (maybe of zero tiles), so under FSDP every rank takes the same path through embed
    vit = torch.cat([p.vit for p in ps]).to(ctx.device) if features else None
    pix = None if features else cat_pixels([p.pixels for p in ps])
    with autocast(ctx):
        h = m(ids[:, :-1].to(ctx.device), None if pix is None else pix.to(ctx.device), attn[:, :-1].to(ctx.device),
              return_hidden=True, vit_features=vit)[:, P - 1:]                         # [B,R,D]
        logp, ent = token_logprobs_and_entropy(m.language_model.lm_head, h, targets.to(ctx.device),
                                               cfg.temperature, cfg.logprob_chunk)
    return logp, ent, (targets >= 0).to(ctx.device)


@torch.no_grad()
def batch_logprobs(m, samples, prompts, pad_id, cfg, ctx, features=True) -> list[torch.Tensor]:
    """Per-sample response log-probs [Lr] under m (old policy or reference), in micro-batches."""
    out = []
    for b in range(0, len(samples), cfg.micro_batch_size):
        chunk = samples[b:b + cfg.micro_batch_size]
        logp, _, _ = response_logprobs(m, chunk, prompts, pad_id, cfg, ctx, features)
        out += [lp[:len(s["response"])] for lp, s in zip(logp, chunk)]
    return out


def on_policy(cfg: GRPOConfig, n_samples: int) -> bool:
    """One epoch and one minibatch: the update is a single optimizer step from the rollout's policy."""
    return cfg.ppo_epochs == 1 and cfg.minibatch_size >= n_samples


def old_logprobs(m, samples, prompts, pad_id, cfg, ctx) -> list[torch.Tensor] | None:
    """log pi_old of every response, or None when the update is on-policy: one epoch and one minibatch make a single
    optimizer step, so the policy the update differentiates is pi_old itself and its log-probs, detached, are the
    old ones (ratio 1; the clipped surrogate's gradient is then -A grad log pi). optimise uses them and the separate
    no-grad pass over every sequence is skipped, as verl does for on-policy updates."""
    if on_policy(cfg, len(samples)):
        return None
    return batch_logprobs(m, samples, prompts, pad_id, cfg, ctx)


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
# 4. Update: ppo_epochs passes of AdamW over the rollout batch.

def pad_right(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)


def optimise(m, opt, samples, adv, old, ref, prompts, pad_id, cfg, ctx, gen, step, features=True) -> dict:
    """ppo_epochs passes over the batch in shuffled minibatches, one AdamW step each. The loss is the token-mean
    over the minibatch, accumulated over micro-batches; old None: on-policy (old_logprobs). A non-finite loss or
    gradient skips the step (warning): the weights and the optimizer state stay untouched. features=False when the
    ViT trains: pixels, with grad."""
    sums, skipped, updates = {}, 0, 0
    lengths = torch.tensor([len(s["response"]) for s in samples])      # on the host: token counts without a sync
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(samples), generator=gen, device=gen.device).cpu()  # (gen: on the GPU there)
        for mb in order.split(cfg.minibatch_size):
            opt.zero_grad(set_to_none=True)
            n_tokens, loss_sum, parts = lengths[mb].sum().item(), 0.0, []
            for micro in mb.split(cfg.micro_batch_size):
                micro = micro.tolist()
                logp, ent, mask = response_logprobs(m, [samples[i] for i in micro], prompts, pad_id, cfg, ctx,
                                                    features)
                logp_old = logp.detach() if old is None else pad_right([old[i] for i in micro])  # (old_logprobs)
                loss, metrics = grpo_loss(logp, logp_old, adv[micro].to(ctx.device), mask,
                                          cfg.clip_low, cfg.clip_high, cfg.beta,
                                          pad_right([ref[i] for i in micro]) if ref else None, num_tokens=n_tokens)
                loss.backward()
                metrics["entropy"] = (ent.detach() * mask).sum() / mask.sum().clamp(min=1)  # of the policy updated
                loss_sum = loss_sum + loss.detach()
                parts.append((lengths[micro].sum().item(), metrics))
            grad_norm = clip_grads(m, cfg.grad_clip)
            if not torch.isfinite(loss_sum + grad_norm):  # the one host sync of an optimizer step
                warnings.warn(f"step {step}: non-finite loss {float(loss_sum)} / grad norm {float(grad_norm)}: "
                              f"update skipped")
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            opt.step()
            updates += 1
            for k, v in [("loss", loss_sum), ("grad_norm", grad_norm)] + [
                    (k, sum(w * mt[k] for w, mt in parts) / max(n_tokens, 1)) for k in parts[0][1]]:
                sums[k] = sums.get(k, 0.0) + v
    opt.zero_grad(set_to_none=True)
    return {**{k: float(v) / max(updates, 1) for k, v in sums.items()}, "skipped_updates": skipped}


def release_rollout_copy(run: dict):
    """After the rollout, drop the tensor-parallel copy of the decoder (1/W of it in bf16 per GPU: 8.2 GB on each of
    8 GPUs at 38B) so the log-prob passes and the update do not carry it: their peak is the step's peak
    (docs/memory.md). verl frees its rollout engine's weights between phases the same way. Kept while the decoder is
    frozen (connector-only tuning): nothing would change in it."""
    if not run["decoder_frozen"]:
        run["decoder"] = None


def refresh_rollout_copy(run: dict, cfg: GRPOConfig) -> float:
    """After the update, rebuild the rollout copy from the new FSDP shards (tp.make_decoder: an empty copy, then
    tp.refresh: local copies and one all-to-all per row-parallel matrix) -> seconds. On one process there is no
    copy (the rollout uses the policy itself)."""
    if run["decoder"] is not None or not cfg.tp:
        return 0.0
    t0 = time.perf_counter()
    run["decoder"] = make_decoder(run["policy"], run["ctx"].dtype)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# The loop. Everything but the five steps (set-up, resume, evaluation, logging, saving) is in the helpers below it.

def train(cfg: GRPOConfig, reward_fn=None) -> list[dict]:
    """Run GRPO; returns the metrics of every step (also in out_dir/metrics.jsonl). reward_fn(text, answer) ->
    float defaults to accuracy + format_weight * format."""
    reward_fn = reward_fn or (lambda text, answer: reward(text, answer, cfg.format_weight))
    run = start(cfg)
    ctx, tok, policy, opt, buffer = run["ctx"], run["tok"], run["policy"], run["opt"], run["buffer"]
    bar = tqdm(range(run["step"] + 1, cfg.steps + 1), initial=run["step"], total=cfg.steps, disable=not ctx.is_main,
               desc="grpo")
    for step in bar:
        t0, gen = time.perf_counter(), step_generator(cfg, ctx, step, opt)
        idxs = prompt_indices(step, len(run["train"]), cfg.prompts_per_step, cfg.seed)[ctx.rank::ctx.world]
        prompts = encode_problems(run["train"], idxs, tok, policy, cfg, ctx)                      # ViT: once
        samples, stats = rollout(policy, tok, run["train"], idxs, prompts, cfg, ctx, gen, reward_fn,      # 1
                                 run["decoder"])
        t_rollout = time.perf_counter() - t0
        release_rollout_copy(run)                                       # the update's memory peak without it
        adv, flat = group_advantages(stats.pop("rewards"), cfg.group_size, cfg.scale_adv)                # 2
        flat_frac = flat.float().mean().item()
        batch, batch_adv, n_mixed = buffer.mix(samples, adv.tolist(), flat.repeat_interleave(cfg.group_size).tolist(),
                                               flat_frac, cfg.flat_threshold)
        buffer.add(samples, adv.tolist(), step)
        prompts.update(encode_problems(run["train"], buffered_problems(batch, prompts), tok, policy, cfg, ctx))
        old = old_logprobs(policy, batch, prompts, tok.pad_id, cfg, ctx)                                # 3
        ref = batch_logprobs(run["ref"], batch, prompts, tok.pad_id, cfg, ctx, run["vit_frozen"]) if run["ref"] \
            else None
        metrics = optimise(policy, opt, batch, torch.tensor(batch_adv), old, ref, prompts, tok.pad_id, cfg, ctx,  # 4
                           gen, step, features=run["vit_frozen"])
        metrics["refresh_time"] = refresh_rollout_copy(run, cfg)
        metrics.update(stats, flat_frac=flat_frac, buffer_mixed=n_mixed,  # 5
                       buffer_size=len(buffer), lr=opt.param_groups[0]["lr"], rollout_time=t_rollout,
                       **work_saved(prompts, idxs, batch, cfg, run))
        end_step(run, cfg, step, metrics, t0)
        bar.set_postfix(reward=f"{run['history'][-1]['reward']:.2f}", acc=f"{run['history'][-1]['accuracy']:.2f}")
    finish(run, cfg)
    return run["history"]


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping: set-up and resume, data, per-step RNG and learning rate, evaluation, logging, saving.

def start(cfg: GRPOConfig) -> dict:
    """Everything the loop needs, fresh or resumed from the newest out_dir/step_N: the run's state as a dict."""
    if not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        hint = " Run `python sft.py` first: GRPO starts from the cold-start SFT model." if cfg.ckpt == "out/sft" else ""
        raise FileNotFoundError(f"no checkpoint at {cfg.ckpt!r} (config.json missing).{hint}")
    ctx = setup(seed=cfg.seed, layout=cfg)
    if cfg.prompts_per_step % ctx.world:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} must be a multiple of the world size {ctx.world}")
    ckpt_dir = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if cfg.resume and ckpt_dir is None and ctx.is_main:
        print(f"--resume: no step_* checkpoint in {cfg.out_dir}, starting from {cfg.ckpt}")
    if cfg.tp and ctx.world > 1:  # before any weight is read
        check_divisible(R1VConfig.from_dir(cfg.ckpt).llm, ctx.layout.tp_size)
    train_set, heldout = load_problems(cfg, ctx.is_main)
    policy = load(ckpt_dir or cfg.ckpt, ctx, train=cfg.train, grad_checkpointing=cfg.grad_checkpointing)
    # the reference (frozen initial policy) exists only when beta > 0: sharded like the policy, in the compute
    # dtype (2 B/param), as it is only ever read
    ref = load(cfg.ckpt, ctx, train="none", dtype=ctx.dtype).eval() if cfg.beta else None
    opt = make_optimizer(policy, cfg.lr, cfg.weight_decay,
                         moments_dtype=torch.bfloat16 if cfg.bf16_moments else torch.float32)
    run = dict(ctx=ctx, tok=Tokenizer.from_dir(cfg.ckpt), train=train_set, heldout=heldout, policy=policy, ref=ref,
               opt=opt, buffer=SampleBuffer(cfg.buffer_capacity, cfg.buffer_max_age), step=0, history=[])
    if ckpt_dir:
        run["step"], _, tensors = resume(ckpt_dir, policy, opt)
        run["buffer"].load_state_dict({k.removeprefix("buffer."): v for k, v in tensors.items()
                                       if k.startswith("buffer.")})
    # the rollout copy of the decoder is made from the (resumed) policy; None on one process (tp.make_decoder)
    run["decoder"] = make_decoder(policy, ctx.dtype) if cfg.tp else None
    run["vit_frozen"] = not any(p.requires_grad for p in policy.vision_model.parameters())
    run["decoder_frozen"] = not any(p.requires_grad for p in policy.language_model.parameters())
    run["log"] = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), ctx.is_main, run["step"] if ckpt_dir else None)
    if run["step"] == 0 and heldout:
        run["history"].append({"step": 0, "heldout_accuracy": evaluate(run, cfg)})
        run["log"].write(0, {"heldout_accuracy": run["history"][-1]["heldout_accuracy"]})
    return run


def load_problems(cfg: GRPOConfig, is_main: bool = True) -> tuple[list[dict], list[dict]]:
    """-> (train, held-out) problem lists. Bad records raise with the file and line (data.read_jsonl)."""
    need = ("question", "answer")
    if cfg.data:
        return read_jsonl(cfg.data, need), read_jsonl(cfg.eval_data, need) if cfg.eval_data else []
    # RL problems are new to the SFT model (seed + 1; sft.py trains on `seed`, as the paper's RL set is not its
    # cold-start set); the held-out split is the one sft.py evaluates on. Same seeds -> same files on resume.
    root = os.path.join(cfg.out_dir, "data")
    if is_main:
        make_visual_task(root, cfg.synthetic_size, cfg.seed + 1, "train")
        make_visual_task(root, cfg.eval_size, cfg.seed, "heldout")
    barrier()
    heldout = read_jsonl(os.path.join(root, "heldout.jsonl"), need) if cfg.eval_size else []
    return read_jsonl(os.path.join(root, "train.jsonl"), need), heldout


def prompt_indices(step: int, n: int, k: int, seed: int) -> list[int]:
    """The k problems of step `step` (1-based), from data.shuffled_indices: a pure function of the step."""
    return shuffled_indices((step - 1) * k, k, n, seed)


def step_generator(cfg: GRPOConfig, ctx, step: int, opt) -> torch.Generator:
    """Sets this step's learning rate; returns the generator every random choice of the step (sampling, minibatch
    order) comes from, seeded by (seed, step, rank): a resumed run makes exactly the same choices."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step - 1, cfg.steps, cfg.lr, cfg.warmup_steps, min_lr_ratio=1.0)
    return torch.Generator(ctx.device).manual_seed(cfg.seed * 1_000_003 + step * 1_009 + ctx.rank)


def evaluate(run: dict, cfg: GRPOConfig) -> float:
    """Held-out accuracy with greedy decoding (rollout.heldout_accuracy)."""
    return heldout_accuracy(run["policy"], run["tok"], run["heldout"], run["ctx"], max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.rollout_batch_size, max_tiles=cfg.max_tiles, decoder=run["decoder"],
                        compile=cfg.compile)["accuracy"]


def buffered_problems(batch: list, prompts: dict) -> list:
    """Problems of buffered samples mixed into the batch that this step did not encode (in first-seen order)."""
    return list(dict.fromkeys(s["problem"] for s in batch if s["problem"] not in prompts))


def work_saved(prompts: dict, idxs: list, batch: list, cfg: GRPOConfig, run: dict) -> dict:
    """What computing each prompt once saves this step, against running the ViT and the prefill per sample and
    per pass: vit_tiles (tiles through the ViT), vit_tiles_saved, prefill_tokens_saved (rollout prompts)."""
    tiles = {i: p.vit.shape[0] for i, p in prompts.items()}
    passes = (not on_policy(cfg, len(batch))) + bool(run["ref"]) + (cfg.ppo_epochs if run["vit_frozen"] else 0)
    per_sample = cfg.group_size * sum(tiles[i] for i in idxs) + passes * sum(tiles[s["problem"]] for s in batch)
    used = sum(tiles.values())
    return {"vit_tiles": used, "vit_tiles_saved": per_sample - used,
            "prefill_tokens_saved": (cfg.group_size - 1) * sum(len(prompts[i].ids) for i in idxs)}


def end_step(run: dict, cfg: GRPOConfig, step: int, metrics: dict, t0: float):
    """Average the step's metrics over ranks, evaluate / log / save when due."""
    metrics = mean_over_ranks(metrics)
    metrics.update(tokens_per_s=metrics["tokens"] / metrics["rollout_time"], step_time=time.perf_counter() - t0)
    if run["heldout"] and (step % cfg.eval_every == 0 or step == cfg.steps):
        metrics["heldout_accuracy"] = evaluate(run, cfg)
    run["log"].write(step, metrics)
    run["history"].append({"step": step, **metrics})
    if step % cfg.save_every == 0 or step == cfg.steps:
        save_checkpoint(os.path.join(cfg.out_dir, f"step_{step:06d}"), run["policy"], run["opt"], step,
                        extra={"config": asdict(cfg)},
                        tensors={f"buffer.{k}": v for k, v in run["buffer"].state_dict().items()})


def finish(run: dict, cfg: GRPOConfig):
    if run["ctx"].is_main:
        plot_curves(run["log"].path, os.path.join(cfg.out_dir, "curves.png"),
                    ["reward", "accuracy", "heldout_accuracy", "format", "response_len", "entropy", "clip_frac",
                     "flat_frac"])


def parse_args(argv=None) -> GRPOConfig:
    """Without --ckpt the default run's tiny settings (TINY_RUN) apply; with --ckpt the recipe defaults do.
    Explicit flags win either way."""
    return parse_config(GRPOConfig, argv, __doc__.splitlines()[0],
                        defaults=lambda flags: {} if "ckpt" in flags else TINY_RUN)


if __name__ == "__main__":
    cfg = parse_args()
    t = time.perf_counter()
    if cfg.ckpt == GRPOConfig.ckpt and not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        # the paper's pipeline: RL starts from the cold-start SFT model, so make it first.
        # A short cold start (110 of sft.py's 300 steps: about a quarter of held-out answers well formed) leaves RL
        # something to show in minutes; from the full 300-step model the toy task has little headroom (README).
        import sft
        print(f"no {cfg.ckpt}: running the cold-start SFT stage first (python sft.py --steps 110)")
        sft.main(sft.SFTConfig(out=cfg.ckpt, steps=110))
    try:
        history = train(cfg)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    if history and "heldout_accuracy" in history[-1] and os.environ.get("RANK", "0") == "0":
        first = next(h["heldout_accuracy"] for h in history if "heldout_accuracy" in h)
        print(f"held-out accuracy {first:.3f} -> {history[-1]['heldout_accuracy']:.3f} in "
              f"{time.perf_counter() - t:.0f} s; metrics and curves in {cfg.out_dir}/")
