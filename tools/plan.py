"""Memory plan: bytes per GPU for each recipe of the paper under FSDP2, from a config alone, and checked by a trace.

    python -m tools.plan --config tiny_configs/r1v3-38b.json --gpus 8      # the formula, every recipe
    python -m tools.plan --trace                                           # the real code on fake tensors, next to it
    python -m tools.plan --config tiny_configs/internvl3-2b.json --gpus 1  # one GPU: no FSDP
    python -m tools.plan --nodes 2                                         # 2 nodes of 8: HSDP and full FSDP
    python -m tools.plan --trace --nodes 2                                 # both traced on 16 fake ranks

The formula. Persistent state, sharded over W GPUs (FSDP2 splits every tensor by rows):
    weights  4 B x all parameters            (fp32 master copies; bf16 weights lose lr~1e-6 updates)
    grads    4 B x trainable parameters      (fp32 reduce dtype; frozen parameters get none)
    adam     8 B x trainable (fp32 moments)  or 4 B with bf16 moments (optim.LowPrecisionAdamW)
    ref      2 B x all parameters            (GRPO with a KL term: a frozen bf16 reference policy)
    tp_copy  2 B x decoder / W               (GRPO on W > 1 GPUs: tp.py's rollout copy, 1/W of every decoder matrix;
                                              rollout phase only: grpo.py drops it for the update, rebuilds it after)
On top of it, each phase peaks at one moment, and the plan is the largest of them:
    rollout            the KV cache (2 x layers x kv_heads x head_dim x 2 B per token, every row of the generate
                       call), plus the 1/G of it that exists while the prefilled rows are copied G times
                       (KVCache.repeat_rows), the step's ViT features, and the gathered FSDP root unit
    backward start     every block's saved input (activation checkpointing) or inside (without), the chunked
                       log-prob's [chunk, V] fp32 temporaries or the last block's recompute and its gradients,
                       lm_head's gradient, the units in flight
    decoder backward end   the decoder's backward at its first blocks: the decoder's gradients all exist, lm_head's
                       still unsharded (the root unit reduces last), one block's inside and its gradients
    optimizer step     all gradients + the step's temporaries (torch's foreach AdamW: one fp32 copy of all moments;
                       LowPrecisionAdamW works one tensor at a time)
The per-block activation counts are the tensors autograd saves in model.py / vision.py blocks (block_bytes).

The trace (`--trace`, dryrun.py) runs one step of each recipe through the scripts' own functions on fake tensors
over a fake process group of --nodes x W ranks and counts live bytes by category; the table prints both and
which moment set the peak. What neither sees: the CUDA context, NCCL buffers, allocator fragmentation: leave ~10 GB
of an 80 GB GPU.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

from cli import Parser, at_least
from model import R1VConfig, count_params
from tools import ROOT

GB = 1e9


@dataclass
class Recipe:
    name: str
    train: tuple  # parts trained: vision_model, mlp1, language_model
    tokens: int  # training tokens per GPU per micro-batch (sequences x length)
    seq: int  # tokens per sequence (a padded batch's attention mask is [sequences, 1, seq, seq])
    head_tokens: int  # tokens per micro-batch that go through lm_head (GRPO: the responses only)
    rollout_tokens: int = 0  # KV-cache tokens per GPU of one generate call (its rows x max length)
    reference: bool = False  # GRPO's k3 KL to a frozen reference policy
    tiles: int = 0  # image tiles per GPU per micro-batch
    group: int = 1  # GRPO samples per prompt: one prefill is copied into G rows
    feature_tiles: int = 0  # GRPO: tiles whose ViT features live through the step (prompts per GPU x tiles)


def recipes(seq: int = 8192, micro_batch: int = 1, rollout_seqs: int = 8, tiles: int = 7, group: int = 8,
            step_prompts: int = 8, prompt: int = 2048):
    """The paper's recipes at grpo.py's 38B defaults: 8K-token sequences (a ~2K prompt with 7 tiles), 8 sequences
    per generate call, groups of 8, 64 prompts per step over 8 GPUs."""
    sft = dict(tokens=micro_batch * seq, seq=seq, head_tokens=micro_batch * seq, tiles=tiles)
    grpo = dict(sft, head_tokens=micro_batch * (seq - prompt), rollout_tokens=rollout_seqs * seq, group=group,
                feature_tiles=step_prompts * tiles)
    return [
        Recipe("cold-start SFT", ("vision_model", "mlp1", "language_model"), **sft),
        Recipe("GRPO", ("mlp1", "language_model"), **grpo),
        Recipe("GRPO + KL ref", ("mlp1", "language_model"), reference=True, **grpo),
        Recipe("connector-only", ("mlp1",), **sft),
    ]


# ------------------------------------------------------------------------------------------------- the pieces
_UNITS = {}  # units() by repr(config): count_params builds the model on the meta device, ~1 s for the 38B


def units(cfg: R1VConfig) -> dict:
    """Parameter counts by part and by FSDP unit (parallel.shard): one per ViT block, the connector, the token
    embedding (untied), one per decoder block; the root keeps the ViT embeddings, the final norm and lm_head (or
    the tied embedding, which is lm_head's weight too and is counted once)."""
    if repr(cfg) in _UNITS:
        return _UNITS[repr(cfg)]
    c, v, lm = count_params(cfg), cfg.vision, cfg.llm
    vd = lm.vocab_size * lm.hidden_size
    vit_embed = v.hidden_size * (v.num_patches + 1 + 1 + v.num_channels * v.patch_size ** 2 + 1)  # pos, cls, conv
    embed = 0 if lm.tie_word_embeddings else vd
    _UNITS[repr(cfg)] = {**c, "vd": vd, "embed_unit": embed, "root": vd + lm.hidden_size + vit_embed,
                         "dec_block": (c["language_model"] - vd - embed - lm.hidden_size) / lm.num_hidden_layers,
                         "vit_block": (c["vision_model"] - vit_embed) / v.num_hidden_layers}
    return _UNITS[repr(cfg)]


def decoder_block_bytes(cfg: R1VConfig, tokens: int, seq: int, ab: int = 2, trains: bool = True) -> float:
    """What autograd saves inside one decoder block (model.DecoderLayer; counted from its saved tensors), ab bytes
    per compute element: per RMSNorm an fp32 copy of its input, and when the weights train the normalised input
    and scaled output too (4 + 2 ab); q, k, v after RoPE and the attention output (SDPA's flash kernel keeps no
    T x T matrix, only a logsumexp per head); the MLP's gate, SiLU and up (and their product, which down_proj
    keeps only to compute its weight's gradient). A padded batch's boolean mask becomes a [B, 1, T, T] one in the
    compute dtype that SDPA keeps too (the trace always takes this path; an unpadded single sequence does not)."""
    lm = cfg.llm
    kv = lm.num_key_value_heads * lm.head_dim
    norms = 2 * (4 + 2 * ab if trains else 4) * lm.hidden_size
    d = norms + ab * (2 * lm.hidden_size + 2 * kv + (4 if trains else 3) * lm.intermediate_size)
    return tokens * (d + 4 * lm.num_attention_heads + ab * seq)


def vit_block_bytes(cfg: R1VConfig, tokens: int, ab: int = 2) -> float:
    """The same for one ViT block (vision.VisionBlock; counted from its saved tensors): InternViT-6B's RMSNorms and
    QK-norms keep fp32 copies (16 D), its fused qkv output stays alive as long as v does; InternViT-300M's
    LayerNorms keep none. Both: the GELU MLP's two [tokens, inner] tensors."""
    v = cfg.vision
    d, inner = v.hidden_size, v.intermediate_size
    if v.qk_normalization:
        return tokens * (16 * d + ab * (14 * d + 2 * inner) + 4 * v.num_attention_heads)
    return tokens * (ab * (9 * d + 2 * inner) + 4 * v.num_attention_heads)


def tp_copy_bytes(cfg: R1VConfig, gpus: int) -> float:
    """One rank's share of tp.TPDecoder in bf16: 1/W of every decoder matrix, the norms whole, and 1/W of the
    vocabulary rows (padded up to a multiple of W) of its own embedding and lm_head (also when tied)."""
    u, lm = units(cfg), cfg.llm
    norms = 2 * lm.hidden_size
    rows = -(-lm.vocab_size // gpus)
    return 2 * (lm.num_hidden_layers * ((u["dec_block"] - norms) / gpus + norms)
                + 2 * rows * lm.hidden_size + lm.hidden_size)


def state(cfg: R1VConfig, gpus: int, r: Recipe, bf16_moments: bool, tp_gpus: int) -> dict:
    """Persistent bytes per GPU, sharded over `gpus`: weights, grads (all of them, as after the backward), Adam,
    ref; tp_copy over `tp_gpus` (0: no tensor-parallel copy)."""
    u = units(cfg)
    n_train = sum(u[p] for p in r.train)
    return {"weights": 4 * u["total"] / gpus, "grads": 4 * n_train / gpus,
            "adam": (4 if bf16_moments else 8) * n_train / gpus, "ref": 2 * u["total"] / gpus if r.reference else 0,
            "tp_copy": tp_copy_bytes(cfg, tp_gpus) if tp_gpus > 1 and r.rollout_tokens else 0}


# ----------------------------------------------------------------------------------------------- the moments
def train_moments(cfg: R1VConfig, gpus: int, r: Recipe, grad_ckpt: bool, bf16_moments: bool, chunk: int,
                  ab: int) -> dict:
    """Transient bytes per GPU at the three moments of a training step that can set its peak."""
    u, v, lm = units(cfg), cfg.vision, cfg.llm
    T, W, fsdp = r.tokens, gpus, gpus > 1
    vit_tokens = r.tiles * (v.num_patches + 1) if "vision_model" in r.train else 0  # a frozen ViT saves nothing
    dec = decoder_block_bytes(cfg, T, r.seq, ab, "language_model" in r.train)
    vit = vit_block_bytes(cfg, vit_tokens, ab)
    if grad_ckpt:  # each block's input is kept; its inside exists for one block at a time (the recompute)
        dec_saved, vit_saved, block = lm.num_hidden_layers * T * lm.hidden_size * ab, \
            v.num_hidden_layers * vit_tokens * v.hidden_size * ab, max(dec, vit)
    else:
        dec_saved, vit_saved, block = lm.num_hidden_layers * dec, v.num_hidden_layers * vit, 0
    embeddings = 2 * T * lm.hidden_size * ab
    # the log-prob's [chunk, V] fp32 log-softmax, its exp, masked copy and product (+ a bool mask): 17 B per logit;
    # in several chunks each is recomputed in backward next to its gradient: ~20
    one_chunk = r.head_tokens <= chunk
    logits = (17 if one_chunk else 20) * min(chunk, r.head_tokens) * lm.vocab_size
    # FSDP: the root unit stays gathered (bf16) all step; a block runs while the next is prefetched; in backward
    # the block just done reduce-scatters its gradient in fp32, and lm_head's gradient waits, unsharded, for the
    # root's turn at the very end. One GPU: autocast keeps a bf16 copy of every trainable weight for the forward.
    # a block's backward: its inside, and its gradients in flight (3 [T, inner] tensors and a weight's gradient)
    block_bw = block + ab * (3 * T * lm.intermediate_size + lm.hidden_size * lm.intermediate_size)
    unit = max(u["dec_block"], u["vit_block"], u["mlp1"])
    llm = "language_model" in r.train
    gathered = 2 * u["root"] + 4 * unit if fsdp else 0
    reduce = 4 * unit if fsdp and llm else 0
    head_grad = (2 * u["root"] if fsdp else 4 * u["vd"]) if llm else 0
    cast = 2 * sum(u[p] for p in r.train) if not fsdp and ab == 2 else 0
    grads_dec = 4 * lm.num_hidden_layers * u["dec_block"] / W if llm else 0
    n_train = sum(u[p] for p in r.train)
    # the optimizer step's temporaries: foreach AdamW (fp32 moments) makes one fp32 tensor per parameter at once;
    # LowPrecisionAdamW (bf16 moments) a few fp32 copies of one parameter's shard at a time, the largest one's
    opt_temps = 4 * n_train / W if not bf16_moments else 4 * 4 * largest_tensor(cfg, r.train) / W
    # FSDP, backward start: lm_head's bf16 gradient waits from the first backward op (the log-prob chunks) to the
    # end, and the last block's gradient is reduce-scattered when its backward ends (this moment sets the peak when
    # the sharded gradients are small: full FSDP on 4 nodes of 8)
    return {"backward start": gathered + dec_saved + vit_saved + embeddings + (head_grad if fsdp else 0)
            + max(block_bw + reduce, logits) + cast,
            "decoder backward end": gathered + reduce + head_grad + grads_dec + vit_saved + block_bw,
            "optimizer step": 4 * n_train / W + opt_temps}


def largest_tensor(cfg: R1VConfig, train) -> int:
    """Elements of the largest trainable parameter: lm_head / embedding, an MLP matrix, the connector's first."""
    v, lm = cfg.vision, cfg.llm
    k = int(1 / cfg.downsample_ratio ** 2) * v.hidden_size  # the connector's input width after pixel shuffle
    sizes = {"language_model": max(lm.vocab_size, lm.intermediate_size) * lm.hidden_size,
             "vision_model": v.hidden_size * v.intermediate_size, "mlp1": k * lm.hidden_size}
    return max(sizes[p] for p in train)


def rollout_moment(cfg: R1VConfig, gpus: int, r: Recipe, tp: bool, ab: int) -> float:
    """Transient bytes per GPU of one generate call (rollout.generate_responses, generate.decode). With the
    tensor-parallel copy every GPU decodes all GPUs' rows with 1/W of the KV heads: the same bytes as its own rows
    with all heads. generate() is an FSDP entry point, so the root unit stays gathered through the call; without
    the copy every decoder block is gathered for every token. One GPU: autocast's bf16 weight copies."""
    u, v, lm = units(cfg), cfg.vision, cfg.llm
    kv = r.rollout_tokens * 2 * lm.num_hidden_layers * lm.num_key_value_heads * lm.head_dim * 2
    features = r.feature_tiles * v.num_patches * v.hidden_size * 2
    if gpus == 1:
        gathered = 2 * sum(u[p] for p in r.train) if ab == 2 else 0
    else:
        gathered = 2 * u["root"] + (0 if tp else 4 * max(u["dec_block"], u["vd"]))
    # before it, the step's tiles through the ViT in one no-grad call (rollout.vit_once): pixels, and inside one
    # block the MLP's [tokens, inner] input and output with the block's fp32 norm copy
    vit_tokens = r.feature_tiles * (v.num_patches + 1)
    vit_once = r.feature_tiles * 3 * cfg.force_image_size ** 2 * 4 + vit_tokens * ab * (2 * v.intermediate_size
                                                                                         + 6 * v.hidden_size)
    embed = 4 * u["embed_unit"] if gpus > 1 else 0  # the embedding unit gathered (buffer + parameter) to embed
    return max(kv * (1 + 1 / r.group), vit_once, embed) + features + gathered


def plan(cfg: R1VConfig, gpus: int, r: Recipe, grad_ckpt: bool = True, bf16_moments: bool = False,
         chunk: int = 1024, act_bytes: int = 2, tp: bool = True, nodes: int = 1, hsdp: bool = True) -> dict:
    """Bytes per GPU: the persistent columns of state(), "train" and "rollout" (each phase's peak: persistent +
    its largest moment; rollout 0 for recipes without one), "at" (the moment that sets the peak) and "peak".
    act_bytes: 2 for bf16 compute, 4 for fp32 (the CPU check). One GPU means no FSDP and no tensor-parallel copy;
    tp: GRPO keeps tp.py's rollout copy (grpo --tp, on when W divides the heads), over the `gpus` of a node.
    nodes of `gpus` GPUs each: HSDP shards the training state inside a node and replicates it across nodes (per
    GPU as on one node: the cross-node all-reduce works in place on the gradient shards); full FSDP
    (hsdp=False) shards it over every GPU. Activations, KV cache and the TP copy per GPU are the same either way."""
    tp = tp and gpus > 1
    shard = gpus if hsdp else gpus * nodes
    out = state(cfg, shard, r, bf16_moments, gpus if tp else 0)
    persistent = out["weights"] + out["adam"] + out["ref"] + out["tp_copy"]
    moments = train_moments(cfg, shard, r, grad_ckpt, bf16_moments, chunk, act_bytes)
    at = max(moments, key=moments.get)
    out["train"], out["train_at"] = persistent - out["tp_copy"] + moments[at], at  # grpo.release_rollout_copy
    out["rollout"] = persistent + rollout_moment(cfg, shard, r, tp, act_bytes) if r.rollout_tokens else 0
    out["peak"] = max(out["train"], out["rollout"])
    out["at"] = "rollout" if out["rollout"] > out["train"] else at
    return out


def table(cfg: R1VConfig, gpus: int, tp: bool = True, nodes: int = 1, hsdp: bool = True, **kw) -> str:
    cols = ["weights", "grads", "adam", "ref", "tp_copy", "rollout", "train", "peak"]
    lines = [f"| recipe | options | {' | '.join(cols)} | peak at |", "|---|---|" + "---|" * (len(cols) + 1)]
    for r in recipes(**kw):
        for ckpt, bf16 in ((True, False), (True, True), (False, True)):
            p = plan(cfg, gpus, r, grad_ckpt=ckpt, bf16_moments=bf16, tp=tp, nodes=nodes, hsdp=hsdp)
            opts = f"{'act-ckpt' if ckpt else 'no ckpt'}, {'bf16' if bf16 else 'fp32'} Adam"
            lines.append(f"| {r.name} | {opts} | " + " | ".join(f"{p[c] / GB:.1f}" for c in cols) + f" | {p['at']} |")
    return "\n".join(lines)


def measure(ckpt_dir: str, recipe: str, seq: int, tiles: int) -> dict:
    """Load the checkpoint and run one training step of `recipe` on CPU (fp32; FSDP2 under torchrun) and return
    the load time and the peak host memory added by the load and by the whole step, next to the plan. Run it in a
    fresh process: the peak is the process's high-water mark."""
    import resource

    import torch
    import torch._dynamo  # noqa: F401  (imported by torch.utils.checkpoint on first use: count it in the baseline)

    from model import token_logprobs_and_entropy
    from optim import PARTS, make_optimizer
    from parallel import load, setup

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    r = next(r for r in recipes(seq=seq, tiles=tiles) if r.name == recipe)
    torch.set_num_threads(2)
    base = rss()
    spec = ",".join(k for k, v in PARTS.items() if v in r.train)
    ctx, t0 = setup(), time.perf_counter()
    model = load(ckpt_dir, ctx, train=spec, grad_checkpointing=True)
    load_s, load_peak = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    cfg = model.config
    opt = make_optimizer(model, lr=1e-5)
    ids = torch.randint(0, 256, (1, seq))
    ids[0, 2:2 + tiles * cfg.num_image_token] = cfg.img_context_token_id
    h = model(ids, pixel_values=torch.randn(tiles, 3, cfg.force_image_size, cfg.force_image_size), return_hidden=True)
    # [0]: the entropy's graph is dropped at once, as sft.sft_loss does (held, it would keep the step's logits)
    logp = token_logprobs_and_entropy(model.language_model.lm_head, h[:, :-1], ids[:, 1:])[0]
    (-logp.mean()).backward()
    opt.step()
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    planned = plan(cfg, ctx.world, r, act_bytes=4)
    return {"recipe": recipe, "rank": ctx.rank, "world": ctx.world, "load_s": load_s, "load_peak": load_peak,
            "measured": measured, "planned": planned["peak"], "plan": planned}


# ------------------------------------------------------------------------------------- the trace next to it
def tp_divides(cfg: R1VConfig, gpus: int) -> bool:
    """Whether grpo.py can make its tensor-parallel rollout copy on `gpus` GPUs (tp.check_divisible)."""
    from tp import check_divisible

    try:
        check_divisible(cfg.llm, gpus)
    except ValueError:
        return False
    return gpus > 1


def trace(cfg: R1VConfig, gpus: int, s=None, grad_ckpt: bool = True, bf16_moments: bool = True, tp: bool = True,
          names=None, nodes: int = 1, hsdp: bool = True) -> list:
    """Trace every recipe (or those in `names`; dryrun.trace_recipe) -> rows {recipe, phase, traced bytes by
    column, peak, at, stages, plan, plan_at}. Recipes that train the same parts share one trace. GRPO + KL ref is
    GRPO's trace plus the reference's local shards: its forward (no grad, before the update) peaks below both.
    nodes of `gpus` ranks, HSDP or full FSDP (dryrun.trace_context), next to the formula of the same layout."""
    from tqdm import tqdm

    from tools.dryrun import Shape, reference_bytes, trace_recipe, train_spec

    s = s or Shape()
    tp = tp and tp_divides(cfg, gpus)
    rs = [r for r in recipes(s.seq, s.micro_batch, s.rollout_seqs, s.tiles, s.group, s.step_prompts, s.prompt)
          if (names is None or r.name in names) and (s.tiles or r.train != ("mlp1",))]  # text: no connector work
    if cfg.img_context_token_id is None:  # a bare config.json (no tokenizer): any id works
        cfg = dataclasses.replace(cfg, img_context_token_id=cfg.llm.vocab_size - 1)
    traced, rows = {}, []
    steps = {(r.train, bool(r.rollout_tokens)) for r in rs}
    with tqdm(total=sum(1 + grpo for _, grpo in steps), desc=f"trace on {gpus * nodes} fake ranks",
              unit="phase") as bar:
        for r in rs:
            key = (r.train, bool(r.rollout_tokens))
            if key not in traced:
                bar.set_postfix_str(r.name)
                traced[key] = trace_recipe(cfg, gpus, train_spec(r.train), key[1], s, grad_ckpt, bf16_moments, tp,
                                           nodes=nodes, hsdp=hsdp)
                bar.update(len(traced[key]))
            ref = reference_bytes(cfg, gpus, nodes, hsdp) if r.reference else 0
            p = plan(cfg, gpus, r, grad_ckpt, bf16_moments, s.chunk, tp=tp, nodes=nodes, hsdp=hsdp)
            for phase, got in traced[key].items():
                rows.append({"recipe": r.name, "phase": phase, **got, "ref": ref, "peak": got["peak"] + ref,
                             "plan": p[phase], "plan_at": "rollout" if phase == "rollout" else p["train_at"]})
    return rows


TRACE_COLS = ["weights", "grads", "adam", "ref", "tp_copy", "acts", "temps", "gathered", "peak"]


def trace_table(rows: list) -> str:
    """Markdown: traced bytes by category, the peak and where it happened, the formula's peak and moment."""
    unit, name = (GB, "GB") if max(t["peak"] for t in rows) >= GB else (1e6, "MB")
    lines = [f"| recipe | phase | {' | '.join(TRACE_COLS)} ({name}) | traced at | formula | formula/trace | "
             f"formula's moment |", "|---|---|" + "---:|" * len(TRACE_COLS) + "---|---:|---:|---|"]
    for t in rows:
        lines.append(f"| {t['recipe']} | {t['phase']} | " + " | ".join(f"{t[c] / unit:.1f}" for c in TRACE_COLS)
                     + f" | {t['at']} | {t['plan'] / unit:.1f} | {t['plan'] / t['peak']:.2f} | {t['plan_at']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_configs/r1v3-38b.json", help="a release-format config.json")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1, help="nodes of --gpus GPUs: > 1 prints HSDP and full FSDP")
    ap.add_argument("--seq", type=int, default=8192, help="tokens per sequence (prompt + response)")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per backward")
    ap.add_argument("--rollout-seqs", type=int, default=8, help="sequences per GPU generated at once")
    ap.add_argument("--tiles", type=int, default=7, help="image tiles per sequence (256 tokens each)")
    ap.add_argument("--group", type=int, default=8, help="GRPO samples per prompt (prefilled once, cache copied)")
    ap.add_argument("--step-prompts", type=int, default=8, help="GRPO prompts per GPU per step (ViT features kept)")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per lm_head chunk of the log-probs")
    ap.add_argument("--no-tp", action="store_true", help="GRPO rollouts from the FSDP shards, no tensor-parallel copy")
    ap.add_argument("--trace", action="store_true", help="run one step of each recipe on fake tensors over a fake "
                    "group of --nodes x --gpus ranks and print the traced peak per GPU next to the formula's")
    ap.add_argument("--prompt", type=int, default=2048, help="GRPO prompt tokens of --seq (image tokens included)")
    ap.add_argument("--fp32-adam", action="store_true", help="--trace: fp32 Adam moments (default bf16)")
    ap.add_argument("--no-ckpt", action="store_true", help="--trace: no activation checkpointing")
    ap.add_argument("--json", action="store_true", help="--trace: print the rows as JSON (bytes)")
    ap.add_argument("--measure", metavar="CKPT", help="measure one CPU training step of --recipe on this checkpoint")
    ap.add_argument("--recipe", action="append", choices=[r.name for r in recipes()],
                    help="--measure: the recipe (default cold-start SFT); --trace: only these (repeatable)")
    a = ap.parse_args(argv)
    try:
        at_least(a, 1, "gpus", "nodes", "seq", "micro_batch", "rollout_seqs", "group", "step_prompts", "chunk", "prompt")
        at_least(a, 0, "tiles")
    except ValueError as e:
        ap.error(str(e))
    if a.trace and a.gpus < 2:
        ap.error("--trace shards over a fake group of --gpus >= 2 ranks (one GPU: the formula alone)")
    if not a.measure:
        path = a.config if os.path.isfile(a.config) else os.path.join(ROOT, a.config)
        if not os.path.isfile(path):
            ap.error(f"--config {a.config}: no such file")
        with open(path) as f:
            a.cfg = R1VConfig.from_dict(json.load(f), a.config)
        tokens = a.tiles * a.cfg.num_image_token + 2  # <img> ... </img> around the tiles' tokens
        if a.trace and not tokens <= a.prompt < a.seq:
            ap.error(f"--prompt {a.prompt} must hold the {a.tiles} tiles' image tokens ({tokens}) and leave a "
                     f"response in --seq {a.seq}")
    return a


def layouts(a) -> list:
    """[(hsdp, label)]: one node, or HSDP and full FSDP on --nodes nodes."""
    return [(True, "")] if a.nodes == 1 else [
        (True, f"HSDP: sharded over each node's {a.gpus} GPUs, replicated over {a.nodes} nodes"),
        (False, f"full FSDP: sharded over all {a.nodes * a.gpus} GPUs")]


def print_tables(a, head: str):
    """The formula's table for one node, or for HSDP and full FSDP on --nodes nodes."""
    for hsdp, layout in layouts(a):
        print(f"{head}{', ' + layout if layout else ''}")
        print(table(a.cfg, a.gpus, tp=not a.no_tp and tp_divides(a.cfg, a.gpus), nodes=a.nodes, hsdp=hsdp,
                    seq=a.seq, micro_batch=a.micro_batch, rollout_seqs=a.rollout_seqs, tiles=a.tiles, group=a.group,
                    step_prompts=a.step_prompts, prompt=a.prompt))


def main(argv=None):
    a = parse_args(argv)
    if a.measure:
        return print(json.dumps(measure(a.measure, (a.recipe or ["cold-start SFT"])[0], a.seq, a.tiles)))
    cfg = a.cfg
    head = (f"GB per GPU on {a.gpus} GPUs, {a.config}: {count_params(cfg)['total'] / 1e9:.2f}B parameters, "
            f"seq {a.seq}, micro-batch {a.micro_batch}, rollout {a.rollout_seqs} seqs, {a.tiles} tiles, group "
            f"{a.group}")
    if not a.trace:
        return print_tables(a, head)
    from tools.dryrun import Shape

    s = Shape(a.seq, a.prompt, a.micro_batch, a.rollout_seqs, a.group, a.step_prompts, a.tiles, a.chunk)
    rollout = "tensor-parallel" if not a.no_tp and tp_divides(cfg, a.gpus) else "FSDP"
    for hsdp, layout in layouts(a):  # one process, one fake group of nodes x gpus ranks for both layouts
        t0 = time.perf_counter()
        rows = trace(cfg, a.gpus, s, not a.no_ckpt, not a.fp32_adam, not a.no_tp, a.recipe, a.nodes, hsdp)
        seconds = time.perf_counter() - t0
        if a.json:
            print(json.dumps({"config": a.config, "gpus": a.gpus, "nodes": a.nodes, "hsdp": hsdp,
                              "shape": dataclasses.asdict(s), "seconds": seconds, "rows": rows}))
            continue
        print(f"{head}, prompt {a.prompt}{', ' + layout if layout else ''}; traced "
              f"({'no ckpt' if a.no_ckpt else 'act-ckpt'}, {'fp32' if a.fp32_adam else 'bf16'} Adam, {rollout} "
              f"rollout) in {seconds:.0f} s")
        print(trace_table(rows), flush=True)


if __name__ == "__main__":
    main()
