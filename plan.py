"""Memory plan: bytes per GPU for each recipe of the paper under FSDP2, from a config alone.

    python plan.py --config tiny_configs/r1v3-38b.json --gpus 8

Persistent state, sharded over G GPUs (FSDP2 splits every tensor by rows):
    weights  4 B x all parameters            (fp32 master copies; bf16 weights lose lr~1e-6 updates)
    grads    4 B x trainable parameters      (fp32 reduce dtype; frozen parameters get none)
    Adam     8 B x trainable (fp32 moments)  or 4 B with bf16 moments (optim.LowPrecisionAdamW)
    ref      2 B x all parameters            (GRPO with a KL term: a frozen bf16 reference policy)
Transient, per GPU, not sharded:
    gathered  2 B x (root unit + 2 largest units)   (bf16 all-gather of the unit running and the one prefetched)
    acts      training activations: with checkpointing only each block's input is kept (2 B x tokens x D per
              block) plus one block's inside during its recompute; without, every block's inside
    kv        rollout KV cache: 2 (k, v) x layers x kv_heads x head_dim x 2 B per token (256 KiB for the 32B)
    logits    chunk x V x 4 B x 5 (logits, log-softmax, probs, masked log-probs, p log p) of the chunked log-prob
Training and rollout phases do not overlap (the KV cache is freed before the loss, gradients after the step), so
the peak is weights + Adam + ref + gathered + max(grads + activations + logits, KV cache). Activation formulas count the tensors autograd saves
in vision.py / model.py blocks (see block_activation_bytes).
"""
import argparse
import json
from dataclasses import dataclass

from model import R1VConfig, count_params

GB = 1e9


@dataclass
class Recipe:
    name: str
    train: tuple  # parts trained: vision, mlp1, language_model
    tokens: int  # training tokens per GPU per micro-batch (sequences x length)
    rollout_tokens: int = 0  # KV-cache tokens per GPU during generation (sequences x max length)
    reference: bool = False  # GRPO's k3 KL to a frozen reference policy
    tiles: int = 0  # image tiles per GPU per micro-batch


def recipes(seq: int = 8192, micro_batch: int = 1, rollout_seqs: int = 8, tiles: int = 7):
    return [
        Recipe("cold-start SFT", ("vision_model", "mlp1", "language_model"), micro_batch * seq, tiles=tiles),
        Recipe("GRPO", ("mlp1", "language_model"), micro_batch * seq, rollout_seqs * seq, tiles=tiles),
        Recipe("GRPO + KL ref", ("mlp1", "language_model"), micro_batch * seq, rollout_seqs * seq, True, tiles),
        Recipe("connector-only", ("mlp1",), micro_batch * seq, tiles=tiles),
    ]


def block_activation_bytes(d: int, inner: int, heads: int, kv_dim: int, tokens: int, bytes_per: int = 2) -> int:
    """What autograd keeps inside one pre-norm block: norm inputs/outputs (4D), q, k, v (D + 2 kv_dim), attention
    output (D), residuals (2D), MLP gate/up/act/product (4 inner); SDPA's flash/efficient kernels keep no T^2."""
    return tokens * bytes_per * (8 * d + 2 * kv_dim + 4 * inner) + tokens * 4 * heads  # + fp32 logsumexp per head


def plan(cfg: R1VConfig, gpus: int, r: Recipe, grad_ckpt: bool = True, bf16_moments: bool = False,
         chunk: int = 1024, act_bytes: int = 2) -> dict:
    """Bytes per GPU. act_bytes: 2 for bf16 compute, 4 for fp32 (the CPU check). One GPU means no FSDP at all."""
    counts = count_params(cfg)
    n_all, n_train = counts["total"], sum(counts[p] for p in r.train)
    v, lm = cfg.vision, cfg.llm
    out = {"weights": 4 * n_all / gpus, "grads": 4 * n_train / gpus,
           "adam": (4 if bf16_moments else 8) * n_train / gpus, "ref": 2 * n_all / gpus if r.reference else 0.0}
    # FSDP units: each ViT block, the connector, the embedding, each decoder block; the root keeps the rest
    vit_block = (counts["vision_model"] - (v.num_patches + 1) * v.hidden_size - v.hidden_size * (
        3 * v.patch_size ** 2 + 1)) / v.num_hidden_layers
    dec_block = (counts["language_model"] - 2 * lm.vocab_size * lm.hidden_size - lm.hidden_size) / lm.num_hidden_layers
    root = lm.vocab_size * lm.hidden_size + lm.hidden_size + (v.num_patches + 1) * v.hidden_size
    gathered = 0 if gpus == 1 else 2 * (root + 2 * max(vit_block, dec_block, counts["mlp1"], lm.vocab_size * lm.hidden_size))
    kv_dim = lm.num_key_value_heads * lm.head_dim
    dec = block_activation_bytes(lm.hidden_size, lm.intermediate_size, lm.num_attention_heads, kv_dim, r.tokens,
                                 act_bytes)
    vit_tokens = r.tiles * (v.num_patches + 1)
    vit = block_activation_bytes(v.hidden_size, v.intermediate_size // 2, v.num_attention_heads, v.hidden_size,
                                 vit_tokens, act_bytes)  # GELU MLP: 2 saved tensors of `inner`, not 4
    if "vision_model" not in r.train:
        vit_tokens = vit = 0  # frozen ViT on pixels: autograd records nothing inside it
    if grad_ckpt:
        acts = (lm.num_hidden_layers * act_bytes * r.tokens * lm.hidden_size + dec
                + v.num_hidden_layers * act_bytes * vit_tokens * v.hidden_size + vit)
    else:
        acts = lm.num_hidden_layers * dec + v.num_hidden_layers * vit
    out["activations"] = acts + 2 * r.tokens * lm.hidden_size * act_bytes  # + embeddings in/out
    out["logits"] = 5 * 4 * min(chunk, r.tokens) * lm.vocab_size
    out["gathered"] = gathered
    out["kv_cache"] = r.rollout_tokens * 2 * lm.num_hidden_layers * kv_dim * 2
    persistent = out["weights"] + out["adam"] + out["ref"]
    train_peak = out["grads"] + out["activations"] + out["logits"]  # gradients are freed after each step
    out["peak"] = persistent + gathered + max(train_peak, out["kv_cache"])
    return out


def table(cfg: R1VConfig, gpus: int, **kw) -> str:
    cols = ["weights", "grads", "adam", "ref", "activations", "logits", "gathered", "kv_cache", "peak"]
    lines = [f"| recipe | options | {' | '.join(cols)} |", "|---|---|" + "---|" * len(cols)]
    for r in recipes(**kw):
        for ckpt, bf16 in ((True, False), (True, True), (False, True)):
            p = plan(cfg, gpus, r, grad_ckpt=ckpt, bf16_moments=bf16)
            opts = f"{'act-ckpt' if ckpt else 'no ckpt'}, {'bf16' if bf16 else 'fp32'} Adam"
            lines.append(f"| {r.name} | {opts} | " + " | ".join(f"{p[c] / GB:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def measure(ckpt_dir: str, recipe: str, seq: int, tiles: int) -> dict:
    """Load the checkpoint and run one training step of `recipe` on CPU (fp32; FSDP2 under torchrun) and return
    the load time and the peak host memory added by the load and by the whole step, next to the plan. Run it in a
    fresh process: the peak is the process's high-water mark."""
    import time
    import resource

    import torch
    import torch._dynamo  # noqa: F401  (imported by torch.utils.checkpoint on first use: count it in the baseline)

    from model import token_logprobs_and_entropy
    from optim import PARTS, make_optimizer
    from parallel import load_for_training, setup

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    r = next(r for r in recipes(seq=seq, tiles=tiles) if r.name == recipe)
    torch.set_num_threads(2)
    base = rss()
    spec = ",".join(k for k, v in PARTS.items() if v in r.train)
    ctx, t0 = setup(), time.perf_counter()
    model = load_for_training(ckpt_dir, ctx, train=spec, grad_checkpointing=True)
    load_s, load_peak = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    cfg = model.config
    opt = make_optimizer(model, lr=1e-5)
    ids = torch.randint(0, 256, (1, seq))
    ids[0, 2:2 + tiles * cfg.num_image_token] = cfg.img_context_token_id
    h = model(ids, pixel_values=torch.randn(tiles, 3, cfg.force_image_size, cfg.force_image_size), return_hidden=True)
    logp, _ = token_logprobs_and_entropy(model.language_model.lm_head, h[:, :-1], ids[:, 1:])
    (-logp.mean()).backward()
    opt.step()
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    planned = plan(cfg, ctx.world, r, act_bytes=4)
    return {"recipe": recipe, "rank": ctx.rank, "world": ctx.world, "load_s": load_s, "load_peak": load_peak,
            "measured": measured, "planned": planned["peak"], "plan": planned}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_configs/r1v3-38b.json", help="a release-format config.json")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seq", type=int, default=8192, help="tokens per sequence (prompt + response)")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per backward")
    ap.add_argument("--rollout-seqs", type=int, default=8, help="sequences per GPU generated at once")
    ap.add_argument("--tiles", type=int, default=7, help="image tiles per GPU per micro-batch")
    ap.add_argument("--measure", metavar="CKPT", help="measure one CPU training step of --recipe on this checkpoint")
    ap.add_argument("--recipe", default="cold-start SFT")
    a = ap.parse_args(argv)
    if a.measure:
        return print(json.dumps(measure(a.measure, a.recipe, a.seq, a.tiles)))
    with open(a.config) as f:
        cfg = R1VConfig.from_dict(json.load(f), a.config)
    print(f"GB per GPU on {a.gpus} GPUs, {a.config}: {count_params(cfg)['total'] / 1e9:.2f}B parameters, "
          f"seq {a.seq}, micro-batch {a.micro_batch}, rollout {a.rollout_seqs} seqs, {a.tiles} tiles")
    print(table(cfg, a.gpus, seq=a.seq, micro_batch=a.micro_batch, rollout_seqs=a.rollout_seqs, tiles=a.tiles))


if __name__ == "__main__":
    main()
