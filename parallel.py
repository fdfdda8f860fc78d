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

The lockstep rule: every FSDP forward all-gathers its unit's weights and every backward reduce-scatters its
gradients, collectives that all ranks of the mesh must join in the same order. So every rank runs the same forwards
and backwards, whatever its data: a rank whose prompts have no image still runs the ViT on zero tiles, a rank whose
rows finished generating steps on until every rank's are done, ranks get equally many batches. The code points here
where it follows the rule.

Precision: parameters, gradients and AdamW moments stay fp32 ("master weights": bf16 weights lose updates of
lr ~1e-6 relative size); `MixedPrecisionPolicy` all-gathers bf16 copies for compute and reduces gradients in fp32.

Beyond one node (`LayoutFlags`, `--replicate N`, `--tp-size N`; docs/multinode.md): the ranks form a 2-D DeviceMesh,
`replicate` x `shard`, the ranks of one node in one shard group (torchrun numbers a node's ranks consecutively).
FSDP2 over it is HSDP: parameters are sharded inside a shard group and replicated across groups, so the per-layer
all-gathers and reduce-scatters stay on the node's links and only one all-reduce of the gradient shards per step
crosses nodes. With replicate 1 (one node, the default there) the mesh is 1-D: full sharding, as before. The
tensor-parallel rollout copy (tp.py) lives in groups of `tp_size` consecutive ranks inside a shard group.
"""
import atexit
import datetime
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from model import SkyworkR1V
from optim import freeze


# ------------------------------------------------------------------------------------------------------- set-up
class Layout(NamedTuple):
    """How the ranks are arranged, resolved: shard groups (HSDP replicas) and ranks per rollout copy."""
    replicate: int
    tp_size: int


@dataclass
class LayoutFlags:
    """The layout as flags (--replicate, --tp-size): every script's config inherits these two fields, and setup()
    builds the meshes from them. 0 = the job's default, resolved by resolve() from torchrun's WORLD_SIZE and
    LOCAL_WORLD_SIZE. A config's own __post_init__ calls super().__post_init__(), which checks the numbers at parse
    time: a layout that does not fit is one line naming them, exit 2 (cli.parse_config), before any weight is read."""
    replicate: int = 0  # shard groups (HSDP replicas); 0 = the number of nodes, WORLD_SIZE / LOCAL_WORLD_SIZE
    tp_size: int = 0    # ranks per tensor-parallel rollout copy; 0 = one node's ranks (at most a shard group)

    def __post_init__(self):
        layout = resolve(self)
        torchrun = int(os.environ.get("WORLD_SIZE", 1)) > 1
        if getattr(self, "compile", False) and not getattr(self, "tp", True) and torchrun:
            raise ValueError("--compile with --no-tp under torchrun: decoding from FSDP shards cannot be compiled "
                             "(dynamo cannot capture FSDP2's hooks); keep the tensor-parallel copy (--tp)")
        ckpt = getattr(self, "ckpt", "")  # a script with a rollout copy (a `tp` field) and a checkpoint: the heads
        if getattr(self, "tp", False) and isinstance(ckpt, str) and os.path.isfile(os.path.join(ckpt, "config.json")):
            from model import R1VConfig
            from tp import check_divisible
            check_divisible(R1VConfig.from_dir(ckpt).llm, layout.tp_size)


def resolve(layout: LayoutFlags = None, world: int = None, local_world: int = None) -> Layout:
    """-> the Layout with both numbers filled in for `world` ranks, `local_world` per node (default: torchrun's
    environment). Raises ValueError naming the numbers when they do not fit: replicate must divide the world; the
    tensor-parallel group must sit inside a shard group and inside a node (tp_size divides both)."""
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if local_world is None else local_world
    replicate, tp_size = (layout.replicate, layout.tp_size) if layout is not None else (0, 0)
    if replicate < 0 or tp_size < 0:
        raise ValueError(f"--replicate and --tp-size must be >= 0 (0 = the default), got {replicate} and {tp_size}")
    replicate = replicate or max(1, world // local_world)
    if world % replicate:
        raise ValueError(f"--replicate {replicate} must divide the world size {world} (each replica is a shard "
                         f"group of world / replicate ranks)")
    shard = world // replicate
    tp_size = tp_size or math.gcd(shard, local_world)
    if shard % tp_size or local_world % tp_size:
        raise ValueError(f"--tp-size {tp_size} must divide the shard group ({world} ranks / --replicate {replicate} "
                         f"= {shard}) and the ranks of one node ({local_world}): a rollout copy lives inside both")
    return Layout(replicate, tp_size)


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world: int = 1
    dtype: torch.dtype = torch.float32  # compute dtype: bf16 on GPU, fp32 on CPU unless asked
    layout: Layout = Layout(1, 1)
    mesh: object = None     # FSDP's DeviceMesh: ("shard",), or ("replicate", "shard") when replicate > 1
    tp_mesh: object = None  # this rank's tensor-parallel group, a 1-D DeviceMesh ("tp",) (tp.make_decoder)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ALLOC_CONF = "expandable_segments:True"
TIMEOUT_ENV, TIMEOUT_MINUTES = "NANOR1V_TIMEOUT_MIN", 60


def setup(dtype: str = None, seed: int = 0, layout: LayoutFlags = None) -> Context:
    """Pick device and backend; under torchrun (WORLD_SIZE > 1) join the process group and build the meshes of
    `layout` (resolve(): the defaults, and a ValueError if it does not fit, before any collective).

    On GPUs: the caching allocator gets expandable segments unless the user set PYTORCH_CUDA_ALLOC_CONF (the
    8 GB tensor-parallel copy and the KV cache are freed and re-allocated every GRPO step between variable-length
    training steps: fixed segments fragment, expandable ones grow in place); it is read at CUDA's first allocation,
    so it is set before anything touches CUDA. The process group is "cpu:gloo,cuda:nccl": CUDA tensors go through
    NCCL, CPU tensors (FSDP's --cpu-offload gradients when clipping) through gloo. Its timeout is
    $NANOR1V_TIMEOUT_MIN minutes (default 60, NCCL's own is 10): the other ranks wait in a collective while rank 0
    writes the release-format export (77 GB for the 38B) or reads slow shared storage before the first one."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    layout = resolve(layout, world)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # small CPU models are per-op overhead: a second intra-op thread mostly waits to be woken, and torchrun
        # starts one process per core anyway
        torch.set_num_threads(1)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout())
        atexit.register(leave)  # why a pause before leaving: leave()
    torch.manual_seed(seed + rank)  # different rollouts per rank, reproducible per run
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.bfloat16 if cuda else torch.float32}[dtype]
    mesh, tp_mesh = meshes(device.type, world, layout) if world > 1 else (None, None)
    return Context(device, rank, world, dtype, layout, mesh, tp_mesh)


def meshes(device_type: str, world: int, layout: Layout) -> tuple:
    """-> (FSDP's mesh, this rank's tensor-parallel mesh). Ranks r*S .. r*S+S-1 (S = world / replicate) form shard
    group r, one node under torchrun's numbering; tensor-parallel groups are tp_size consecutive ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    if layout.replicate == 1:  # full sharding over every rank: the 1-D mesh of one node
        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    else:
        mesh = init_device_mesh(device_type, (layout.replicate, world // layout.replicate),
                                mesh_dim_names=("replicate", "shard"))
    tp = init_device_mesh(device_type, (world // layout.tp_size, layout.tp_size), mesh_dim_names=("groups", "tp"))
    return mesh, tp["tp"]


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
    """FSDP2 over ctx.mesh (HSDP when it is 2-D; all ranks when there is none, as in the dry run): one unit per ViT
    block, the connector, the embedding, one per decoder block, the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = ctx.mesh if ctx.mesh is not None else init_device_mesh(ctx.device.type, (ctx.world,))
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
    model.tp_mesh = ctx.tp_mesh  # where tp.make_decoder puts the rollout copy
    if dist.get_backend() == "gloo":
        # gloo has no AVG reduce-scatter, so FSDP2 falls back to SUM and gradients come out world-size times too
        # large (pytorch#162338); an explicit divide factor makes FSDP divide by the world size itself. Under HSDP
        # that factor is not the shard group's size, for which FSDP would pick PREMUL_SUM, which gloo lacks: sum
        # in both collectives, then divide.
        for unit in [*units, model]:
            unit.set_gradient_divide_factor(float(ctx.world))
            unit.set_force_sum_reduction_for_comms(mesh.ndim > 1)
    return model


def load(ckpt_dir: str, ctx: Context, train: str = "all", grad_checkpointing: bool = False,
                      cpu_offload: bool = False, dtype=torch.float32) -> SkyworkR1V:
    """The one loading path of every script (training, inference, the frozen reference): fp32 master weights
    (`dtype`), frozen parts per `train`, FSDP2 when world > 1 (loaded shard by shard, each rank only its rows),
    activation checkpointing per block if asked."""
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
    """Leave the process group at exit (registered by setup). A pause first: gloo's worker threads may still be
    releasing a finished collective's tensors, which needs the GIL, and a thread that asks for it while the
    interpreter shuts down aborts the process (docs/notes.md)."""
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


def all_gather_objects(obj) -> list:
    """[each rank's obj] in rank order (picklable Python objects; [obj] on one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(metrics: dict) -> dict:
    """{name: number} averaged over ranks (identity on one process)."""
    keys = sorted(metrics)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {k: v / world for k, v in zip(keys, all_reduce_sum([metrics[k] for k in keys]))}
