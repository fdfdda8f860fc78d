"""One process or many: device and backend, FSDP2 sharding, the loading path of every trainer, small collectives.

One process (CPU, laptop) and `torchrun --nproc_per_node 8` (8xH100, the 38B) run the same code; only the
device and the collective backend picked in `setup()` differ (cuda + NCCL vs cpu + gloo), and `shard()` is the one
switch: loops never branch on "distributed".

Sharding (FSDP2, `torch.distributed.fsdp.fully_shard`), as in torchtitan: the model is built on the meta device,
each ViT block, the connector, the token embedding and each decoder block become one FSDP unit (all-gathered just
before its forward, freed after); the root holds the ViT embeddings, final norm and lm_head (which the chunked
log-prob code calls outside forward, so it must stay gathered until the backward is done). Only then are the
parameters materialised, each rank holding 1/world of the rows of every tensor, filled straight from the
safetensors shards (checkpoint.load_weights reads just those rows): no process ever holds the whole 77 GB state dict.

Precision: parameters, gradients and AdamW moments stay fp32 ("master weights": bf16 weights lose updates of
lr ~1e-6 relative size); `MixedPrecisionPolicy` all-gathers bf16 copies for compute and reduces gradients in fp32.
"""
import atexit
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import SkyworkR1V
from optim import freeze


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


ALLOC_CONF = "expandable_segments:True"
TIMEOUT_ENV, TIMEOUT_MINUTES = "NANOR1V_TIMEOUT_MIN", 60


def setup(dtype: str = None, seed: int = 0) -> Context:
    """Pick device and backend; under torchrun (WORLD_SIZE > 1) join the process group.

    On GPUs: the caching allocator gets expandable segments unless the user set PYTORCH_CUDA_ALLOC_CONF (the
    8 GB tensor-parallel copy and the KV cache are freed and re-allocated every GRPO step between variable-length
    training steps: fixed segments fragment, expandable ones grow in place); it is read at CUDA's first allocation,
    so it is set before anything touches CUDA. The process group is "cpu:gloo,cuda:nccl": CUDA tensors go through
    NCCL, CPU tensors (FSDP's --cpu-offload gradients when clipping) through gloo. Its timeout is
    $NANOR1V_TIMEOUT_MIN minutes (default 60, NCCL's own is 10): the other ranks wait in a collective while rank 0
    writes the release-format export (77 GB for the 38B) or reads slow shared storage before the first one."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
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
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout())
        atexit.register(leave)  # why a pause before leaving: leave()
    torch.manual_seed(seed + rank)  # different rollouts per rank, reproducible per run
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.bfloat16 if cuda else torch.float32}[dtype]
    return Context(device, rank, world, dtype)


def timeout() -> datetime.timedelta:
    """The process group's collective timeout: $NANOR1V_TIMEOUT_MIN minutes (a positive number), default 60."""
    value = os.environ.get(TIMEOUT_ENV, str(TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1
    if not minutes > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: the process-group timeout must be a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def shard(model: SkyworkR1V, ctx: Context, cpu_offload: bool = False):
    """FSDP2 over all ranks: one unit per ViT block, the connector, the embedding, one per decoder block, the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    kw = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=ctx.dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if cpu_offload else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    lm = model.language_model.model
    # a tied embedding is also lm_head's weight, which the root holds: it cannot be a unit of its own
    embed = [] if model.config.llm.tie_word_embeddings else [lm.embed_tokens]
    units = [*model.vision_model.encoder.layers, model.mlp1, *embed, *lm.layers]
    for unit in units:
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    model.sharded_vit = True
    # generate() uses the root's parameters (ViT patch embedding, lm_head) outside forward(): FSDP must gather them
    # around that call too
    register_fsdp_forward_method(model, "generate")
    register_fsdp_forward_method(model, "vit_features")  # the ViT once per GRPO step (grpo.py)
    if dist.get_backend() == "gloo":
        # gloo has no AVG reduce-scatter, so FSDP2 falls back to SUM and gradients come out world-size times too
        # large (pytorch#162338); an explicit divide factor makes FSDP divide by the world size itself.
        for unit in [*units, model]:
            unit.set_gradient_divide_factor(float(ctx.world))
    return model


def load(ckpt_dir: str, ctx: Context, train: str = "all", grad_checkpointing: bool = False,
                      cpu_offload: bool = False, dtype=torch.float32) -> SkyworkR1V:
    """The one loading path of every script (training, inference, the frozen reference): fp32 master weights (`dtype`), frozen parts per `train`, FSDP2 when
    world > 1 (loaded shard by shard, each rank only its rows), activation checkpointing per block if asked."""
    def prepare(model):
        n = freeze(model, train)
        if ctx.is_main and n:  # (a frozen model, e.g. sample.py's or the reference policy: nothing to say)
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


def leave():
    """Leave the process group at exit (registered by setup). A pause first: gloo's worker threads release a finished
    collective's tensors a moment after the caller sees it complete, and releasing a tensor Python made needs the
    GIL; a thread that asks for it while the interpreter shuts down is stopped inside C++, which aborts the process
    ("terminate called without an active exception": 1 in ~40 two-rank sample.py runs on a loaded CPU, the worker
    in ~AsyncAllgatherWork in the core dump)."""
    if dist.is_initialized():
        time.sleep(0.1)
        dist.destroy_process_group()


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


def mean_over_ranks(metrics: dict) -> dict:
    """{name: number} averaged over ranks (identity on one process)."""
    keys = sorted(metrics)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {k: v / world for k, v in zip(keys, all_reduce_sum([metrics[k] for k in keys]))}
