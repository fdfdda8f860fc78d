"""Training plumbing shared by sft.py and grpo.py: devices, FSDP2 sharding, freezing, optimizer, checkpoints, logs.

One process (CPU, laptop) and `torchrun --nproc_per_node 8` (8xH100, the 38B) run the same code; only the
device and the collective backend picked in `setup()` differ (cuda + NCCL vs cpu + gloo).

Sharding (FSDP2, `torch.distributed.fsdp.fully_shard`), as in torchtitan: the model is built on the meta device,
each ViT block, the connector, the token embedding and each decoder block become one FSDP unit (all-gathered just
before its forward, freed after); the root holds the ViT embeddings, final norm and lm_head (which the chunked
log-prob code calls outside forward, so it must stay gathered until the backward is done). Only then are the parameters materialised,
each rank holding 1/world of the rows of every tensor, filled straight from the safetensors shards
(checkpoint.load_weights reads just those rows): no process ever holds the whole 77 GB state dict.

Precision: parameters, gradients and AdamW moments stay fp32 ("master weights": bf16 weights lose updates of
lr ~1e-6 relative size); `MixedPrecisionPolicy` all-gathers bf16 copies for compute and reduces gradients in fp32.
"""
import argparse
import json
import os
import shutil
from dataclasses import MISSING, dataclass, fields

import warnings

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from checkpoint import named_shards
from model import SkyworkR1V

PARTS = {"vision": "vision_model", "connector": "mlp1", "llm": "language_model"}
# torch.distributed.checkpoint saves and loads the optimizer state on one process too, and says so every time
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# ------------------------------------------------------------------------------------------------------- set-up
@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world: int = 1
    dtype: torch.dtype = torch.float32  # compute dtype: bf16 on GPU, fp32 on CPU unless asked

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(dtype: str = None, seed: int = 0) -> Context:
    """Pick device and backend; under torchrun (WORLD_SIZE > 1) join the process group."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # small CPU models are per-op overhead: a second intra-op thread adds a wake-up wait per op (measured 10-30x
        # slower steps for the tiny config on a busy 2-core machine) and torchrun starts one process per core anyway
        torch.set_num_threads(1)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(seed + rank)  # different rollouts per rank, reproducible per run
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.bfloat16 if cuda else torch.float32}[dtype]
    return Context(device, rank, world, dtype)


def parse_train_spec(spec: str) -> set:
    """'all' | 'none' | 'llm' | 'connector' | 'vision,connector' ... -> the set of top-level module names to train."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return set(PARTS.values())
    if names == ["none"]:  # a frozen model, e.g. GRPO's reference policy
        return set()
    bad = [n for n in names if n not in PARTS]
    if bad or not names:
        raise ValueError(f"--train {spec!r}: unknown part(s) {bad}; use 'all', 'none' or a comma list of {sorted(PARTS)}")
    return {PARTS[n] for n in names}


def freeze(model: SkyworkR1V, spec: str) -> int:
    """requires_grad only on the parts named in spec; returns the trainable parameter count. Frozen parameters get
    no .grad, no optimizer state and, under FSDP2, no gradient reduction."""
    train = parse_train_spec(spec)
    for name, part in model.named_children():
        part.requires_grad_(name in train)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def shard(model: SkyworkR1V, ctx: Context, cpu_offload: bool = False):
    """FSDP2 over all ranks: one unit per ViT block, the connector, the embedding, one per decoder block, the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    kw = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=ctx.dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy() if cpu_offload else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    lm = model.language_model.model
    units = [*model.vision_model.encoder.layers, model.mlp1, lm.embed_tokens, *lm.layers]
    for unit in units:
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    # generate() uses the root's parameters (ViT patch embedding, lm_head) outside forward(): FSDP must gather them
    # around that call too
    register_fsdp_forward_method(model, "generate")
    if dist.get_backend() == "gloo":
        # gloo has no AVG reduce-scatter, so FSDP2 falls back to SUM and gradients come out world-size times too
        # large (pytorch#162338); an explicit divide factor makes FSDP divide by the world size itself.
        for unit in [*units, model]:
            unit.set_gradient_divide_factor(float(ctx.world))
    return model


def load_for_training(ckpt_dir: str, ctx: Context, train: str = "all", grad_checkpointing: bool = False,
                      cpu_offload: bool = False, dtype=torch.float32) -> SkyworkR1V:
    """The one loading path of every training script: fp32 master weights (`dtype`), frozen parts per `train`, FSDP2 when
    world > 1 (loaded shard by shard, each rank only its rows), activation checkpointing per block if asked."""
    def prepare(model):
        n = freeze(model, train)
        if ctx.is_main:
            print(f"trainable parameters ({train}): {n:,} of {sum(p.numel() for p in model.parameters()):,}")
        model.grad_checkpointing = grad_checkpointing
        if ctx.world > 1:
            shard(model, ctx, cpu_offload)

    device = "cpu" if cpu_offload else ctx.device
    return SkyworkR1V.from_pretrained(ckpt_dir, dtype=dtype, device=device, shard=prepare).train()


def autocast(ctx: Context):
    """Single-process bf16: autocast does what MixedPrecisionPolicy does under FSDP (bf16 matmuls, fp32 weights)."""
    enabled = ctx.world == 1 and ctx.dtype == torch.bfloat16
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------------------------- optimizer
def make_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), moments_dtype=torch.float32):
    """AdamW over the trainable parameters only (frozen ones cost no optimizer memory). moments_dtype=bf16 keeps
    the two Adam moments in bf16 (4 instead of 8 bytes per parameter; the 38B GRPO plan needs it to fit 80 GB)
    while weights and the update stay fp32."""
    params = [p for _, p in named_shards(model) if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check --train")
    if moments_dtype == torch.float32:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, foreach=True)
    return LowPrecisionAdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, moments_dtype=moments_dtype)


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) whose moments are stored in a low-precision dtype and updated in fp32."""

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, moments_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments_dtype

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # which casts every state tensor to its parameter's dtype (fp32): undo
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = st[k].to(self.moments_dtype)

    @torch.no_grad()
    def step(self, closure=None):  # closure: the Optimizer interface (DCP calls step to create empty states)
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                st["step"] += 1
                t, g = st["step"].item(), p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(m / (1 - b1 ** t), (v / (1 - b2 ** t)).sqrt_().add_(group["eps"]), value=-lr)


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to base_lr, then cosine decay to min_lr_ratio * base_lr at total_steps."""
    import math
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_grad_norm(model, max_norm: float) -> float:
    """Global gradient norm over all ranks (DTensor grads reduce across the mesh inside clip_grad_norm_)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# -------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out_dir: str, model, optimizer, step: int, extra: dict = None, tensors: dict = None):
    """out_dir = the model in the release format + train_state/ (optimizer shards, per-rank RNG and tensors,
    step, world size). Written under out_dir.partial, then renamed: a crash never leaves a half checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    partial = out_dir.rstrip("/") + ".partial"
    model.save_pretrained(partial)  # gathers tensor by tensor; rank 0 writes
    state = os.path.join(partial, "train_state")
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=os.path.join(state, "optimizer"))
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    save_file({**{f"rng.{k}": v for k, v in rng.items()}, **(tensors or {})}, os.path.join(state, f"rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(state, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                       "extra": extra or {}}, f, indent=2)
    barrier()
    if rank == 0:
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(partial, out_dir)
    barrier()


def resume(ckpt_dir: str, model, optimizer):
    """Restore optimizer state and RNG from save_checkpoint's train_state/ -> (step, extra, tensors).
    The model weights come from loading ckpt_dir itself (load_for_training)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = os.path.join(ckpt_dir, "train_state")
    meta_path = os.path.join(state, "trainer_state.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{ckpt_dir}: no train_state/trainer_state.json, so it cannot be resumed "
                                f"(a release checkpoint is a starting point: pass it as --ckpt instead)")
    with open(meta_path) as f:
        meta = json.load(f)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if meta["world_size"] != world:
        raise ValueError(f"{meta_path}: saved by {meta['world_size']} rank(s), resumed with {world}; resume with "
                         f"--nproc_per_node {meta['world_size']} (per-rank RNG and data order depend on it)")
    optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    # parameters that never had a gradient have no Adam state in the checkpoint, but the template built here has
    # (zero) state for every trainable parameter: a partial load leaves those at zero, as they were when saved
    dcp.load(optim_state, checkpoint_id=os.path.join(state, "optimizer"),
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, optimizer, optim_state["optimizer"])
    tensors = load_file(os.path.join(state, f"rank{rank}.safetensors"))
    torch.set_rng_state(tensors.pop("rng.cpu"))
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors.pop("rng.cuda"))
    return meta["step"], meta["extra"], tensors


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list) -> list:
    """Sum a few Python numbers over ranks (identity on one process); NCCL needs them on the GPU."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def parse_flags(cls, argv=None, description: str = "") -> dict:
    """Every field of the config dataclass `cls` is a flag (--max-len or --max_len; --flag / --no-flag for booleans,
    one or more values, repeatable, for list fields). Returns only the flags given, so callers can layer them over
    any defaults."""
    p = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        names = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
        if isinstance(default, bool):
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, (list, tuple)):  # --image a.png --image b.png, or --ckpts a b
            p.add_argument(*names, dest=f.name, action="extend", nargs="+", default=None)
        else:
            p.add_argument(*names, dest=f.name, type=type(default) if default is not None else str, default=None)
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


# -------------------------------------------------------------------------------------------------------- logs
class MetricsLog:
    """One JSON object per step, appended (main rank only); resuming truncates entries after the resumed step."""

    def __init__(self, path: str, enabled: bool = True, resume_step: int = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        rows = read_metrics(path) if resume_step is not None and os.path.isfile(path) else []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step)

    def write(self, step: int, metrics: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl_path: str, png_path: str, keys) -> bool:
    """One panel per metric over steps. matplotlib is optional: without it, say so and skip."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {png_path} (pip install matplotlib)")
        return False
    rows = read_metrics(jsonl_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*pts), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
