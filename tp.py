"""Tensor-parallel generation: a copy of the decoder split across all ranks, refreshed from the FSDP2 shards.

Why: under FSDP2 (parallel.py) every forward all-gathers the weights it uses. Training amortises that over a long
sequence; decoding does it once per token, so a rollout from FSDP shards moves the whole 32B decoder (56 GB in
bf16) into every GPU for every new token. Tensor parallelism (Megatron-LM, arXiv 1909.08053; gpt-fast's tp.py)
keeps each rank's slice of every matrix resident and moves activations instead: two all-reduces of [B,1,D] per
layer per token. RL frameworks (verl, OpenRLHF, TRL, NeMo-RL) all generate from such a copy and refresh it from the
trained weights before each rollout; this file does that in plain PyTorch (grpo.py rebuilds the copy after each
update and drops it during the update, whose memory peak it would otherwise raise).

The split, per decoder layer (world = W ranks, each holding 1/W of the heads and of the MLP width):

    x --RMSNorm--> q,k,v_proj (column-parallel: this rank's heads) --RoPE, attention over its own KV heads-->
      o_proj (row-parallel: its heads' columns) --> partial [B,t,D] --all-reduce(sum)--> + x
    x --RMSNorm--> gate,up_proj (column-parallel) --SwiGLU--> down_proj (row-parallel) --all-reduce--> + x

Embedding and lm_head are vocabulary-parallel (each rank 1/W of the rows, padded so W divides the vocabulary:
151,674 rows do not divide by 8); the norms are replicated. The layers are model.py's own DecoderLayer, built
from an LLMConfig with W times fewer heads and a W times narrower MLP, so there is no second copy of the math:
the all-reduces are forward hooks, as in gpt-fast.

Where the slices come from: FSDP2 shards every parameter on dim 0 in torch.chunk blocks. For q/k/v and gate/up
those rows are exactly the column-parallel slice (when W divides the head counts), so the refresh is a local copy;
o_proj and down_proj need columns, which `DTensor.redistribute(Shard(0) -> Shard(1))` delivers (an all-to-all on
NCCL; no rank ever holds a full matrix). Embedding and lm_head rows are FSDP's rows, zero-padded. Only the decode
loop (generate.decode) runs here, on plain tensors: DTensor is used for the one-off refresh only
(its per-op overhead in a decode loop is the gap gpt-fast removed).

The copy lives in a tensor-parallel group (parallel.Context.tp_mesh: tp_size consecutive ranks, by default one
node's; "W" above is tp_size), and the groups roll out data-parallel: the ranks of one group decode one batch
together (their prompts are gathered, sampled identically on each of them: same logits after the all-gather, same
generator seed), each keeps its own rows of the result, and no group ever sees another group's rows. Inside a shard
group of HSDP (parallel.py) the parameter's mesh has a replicate dimension too; the redistributions above act on
its shard dimension only (the replicas hold the same rows), so a refresh never crosses a node. A group smaller than
its shard group (tp_size < world / replicate) cannot take FSDP's rows as they are: it all-gathers each parameter
inside the shard group and keeps its slice (one full tensor at a time). A rank that
sampled other tokens is an error (generate.tokens_agree), not a hang.
"""
import functools
import logging
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Shard

import generate
from checkpoint import resharded_parameters
from model import LLMConfig, Qwen2ForCausalLM, SkyworkR1V

# On gloo (CPU) DTensor's Shard(0) -> Shard(1) falls back from all-to-all to all-gather + chunk and says so: the
# same result, and a CPU-only message (NCCL has all-to-all); every refresh would print it on every rank.
logging.getLogger("torch.distributed.tensor._collective_utils").addFilter(
    lambda record: "does not support alltoall" not in record.getMessage())


def check_divisible(cfg: LLMConfig, world: int):
    """Each rank of a tensor-parallel group of `world` ranks must own whole query and KV heads (and an equal MLP
    slice): checked before any weight is read."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(cfg, name) % world:
            raise ValueError(f"tensor-parallel generation over {world} ranks (--tp-size) needs llm_config.{name} "
                             f"({getattr(cfg, name)}) divisible by {world}; pass a --tp-size that divides it, "
                             f"or --no-tp to generate from the FSDP shards")


def tp_fits(cfg: LLMConfig, world: int) -> bool:
    """Can W ranks split this decoder (check_divisible)? Scripts that only read (entropy.py, SFT's held-out answers)
    generate from the FSDP shards when it cannot."""
    try:
        check_divisible(cfg, world)
        return True
    except ValueError:
        return False


def vocab_rows(vocab: int, world: int) -> int:
    """Rows per rank of the vocabulary-parallel embedding / lm_head: FSDP's torch.chunk block, ceil(V / W)."""
    return -(-vocab // world)


class VocabParallelEmbedding(nn.Module):
    """Rows [rank*n, (rank+1)*n) of the embedding. A token outside them contributes zeros; the all-reduce adds the
    one rank that has it."""

    def __init__(self, rows: int, dim: int, rank: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim), requires_grad=False)
        self.first, self.group = rank * rows, group

    def forward(self, ids):  # [B,t] -> [B,t,D]
        local = ids - self.first
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[..., None]
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelHead(nn.Module):
    """lm_head rows of this rank -> logits of its vocabulary slice -> all-gathered into [.., V] on every rank
    (the padding rows are cut off, so they can never be sampled)."""

    def __init__(self, rows: int, dim: int, vocab: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim), requires_grad=False)
        self.vocab, self.group = vocab, group

    def forward(self, h):  # [B,D] -> [B,V]
        local = F.linear(h, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab]


class AllReduceOutput:
    """Forward hook on attention and MLP: their row-parallel output projection left a partial sum per rank."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, module, inputs, output):
        dist.all_reduce(output, group=self.group)
        return output


class TPDecoder(Qwen2ForCausalLM):
    """model.py's decoder with 1/W of the heads, MLP width and vocabulary per rank of its group (None: all ranks);
    the same decode loop."""

    def __init__(self, cfg: LLMConfig, rank: int, world: int, group=None):
        check_divisible(cfg, world)
        rows = vocab_rows(cfg.vocab_size, world)
        local = replace(cfg, num_attention_heads=cfg.num_attention_heads // world, head_dim=cfg.head_dim,
                        num_key_value_heads=cfg.num_key_value_heads // world, tie_word_embeddings=False,
                        intermediate_size=cfg.intermediate_size // world, vocab_size=rows)
        super().__init__(local)
        self.config = replace(local, vocab_size=cfg.vocab_size)  # sampling sees the real vocabulary
        self.tp_rank, self.tp_size, self.group = rank, world, group
        self.model.embed_tokens = VocabParallelEmbedding(rows, cfg.hidden_size, rank, group)
        self.lm_head = VocabParallelHead(rows, cfg.hidden_size, cfg.vocab_size, group)
        for layer in self.model.layers:
            layer.self_attn.register_forward_hook(AllReduceOutput(group))
            layer.mlp.register_forward_hook(AllReduceOutput(group))
        self.requires_grad_(False)

    @torch.no_grad()
    def decode(self, x, input_ids, attention_mask=None, *, generator=None, num_return_sequences=1, all_done=None,
               **kw):
        """Gather the prompts of the group's ranks, decode them all on each of them, return this rank's rows. Every
        rank of the group holds every row, so they agree on when all rows are done if they agree on the tokens:
        checked, not asked. A group without rows (a rank of it may still have run the FSDP embedding with none)
        decodes nothing."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        (x, input_ids, attention_mask), mine = gather_rows([x, input_ids, attention_mask], self.group)
        generator = shared_generator(generator, x.device, self.group)
        if x.shape[0] == 0:  # the same on every rank of the group: all of them skip
            return input_ids.new_zeros(0, 0)
        new = super().decode(x, input_ids, attention_mask, generator=generator,
                             num_return_sequences=num_return_sequences,
                             all_done=functools.partial(generate.tokens_agree, group=self.group), **kw)
        G = num_return_sequences
        return generate.cut_finished(new[mine.start * G:mine.stop * G], kw["eos"])


def gather_rows(tensors: list, group=None) -> tuple[list, slice]:
    """Left-padded [B_r, T_r, ...] tensors of each rank of `group` (None: all ranks) -> the same for all its ranks'
    rows, padded on the left to the longest T, rank order; plus the slice of rows that are this rank's. Two
    collectives inside the group: the shapes, then the rows."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    b, t = tensors[0].shape[:2]
    shapes = [torch.zeros(2, dtype=torch.long, device=tensors[0].device) for _ in range(world)]
    dist.all_gather(shapes, torch.tensor([b, t], device=tensors[0].device), group=group)
    sizes = [s.tolist() for s in shapes]
    B, T = max(s[0] for s in sizes), max(s[1] for s in sizes)
    out = []
    for z in tensors:
        padded = z.new_zeros(B, T, *z.shape[2:])
        padded[:b, T - t:] = z  # left padding: a zero attention mask hides it
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:s[0]] for p, s in zip(parts, sizes)]))
    first = sum(s[0] for s in sizes[:rank])
    return out, slice(first, first + b)


def shared_generator(generator, device, group=None) -> torch.Generator | None:
    """Every rank of a group must draw the same samples from the same logits: one seed, drawn by the group's first
    rank, for all of them."""
    if generator is None:
        return None
    seed = torch.randint(2**62, (1,), generator=generator, device=generator.device).to(device)
    dist.broadcast(seed, group=group, group_src=0)
    return torch.Generator(device).manual_seed(int(seed))


# ------------------------------------------------------------------------------------------------- the refresh
def make_decoder(model: SkyworkR1V, dtype: torch.dtype, mesh=None) -> TPDecoder | None:
    """The tensor-parallel copy of an FSDP-sharded model's decoder, filled from its shards, in this rank's group:
    `mesh` (a 1-D DeviceMesh), by default the one parallel.shard recorded (Context.tp_mesh), else all ranks. None
    on one process (the model's own decoder is used there: tensor parallelism of degree 1 is the model itself)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    mesh = mesh if mesh is not None else getattr(model, "tp_mesh", None)
    rank, world, group = (dist.get_rank(), dist.get_world_size(), None) if mesh is None else \
        (mesh.get_local_rank(), mesh.size(), mesh.get_group())
    with torch.device("meta"):  # allocated once, by to_empty, in `dtype`: never an fp32 copy on the GPU
        decoder = TPDecoder(model.config.llm, rank, world, group).to(dtype)
    decoder.to_empty(device=next(model.parameters()).device)
    refresh(decoder, model)
    return decoder


@torch.no_grad()
def refresh(decoder: TPDecoder, model: SkyworkR1V) -> float:
    """Copy the FSDP shards of the language model into the tensor-parallel decoder, in place -> seconds taken.
    make_decoder fills a new copy with it; the ViT is not in the decoder at all."""
    t0 = time.perf_counter()
    params = dict(decoder.named_parameters())
    # reshard the root FSDP unit (it holds lm_head and stays unsharded after a no-grad forward such as generate):
    # resharding language_model alone would leave lm_head a plain gathered Parameter, not a DTensor
    prefix = "language_model."
    for name, p in resharded_parameters(model):
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        if name == "lm_head.weight" and model.config.llm.tie_word_embeddings:
            continue  # listed once, as embed_tokens.weight; the copy below fills both
        local = tp_slice(name, p, decoder.tp_rank, decoder.tp_size)
        targets = ["model.embed_tokens.weight", "lm_head.weight"] if name == "model.embed_tokens.weight" and \
            model.config.llm.tie_word_embeddings else [name]
        for target in targets:
            dst = params[target]
            if local.shape[0] < dst.shape[0]:
                dst.zero_()  # the padding rows of the last vocabulary slice
            dst[:local.shape[0]].copy_(local)
    if next(decoder.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def tp_slice(name: str, p, rank: int, world: int) -> torch.Tensor:
    """Slice `rank` of `world` (tensor-parallel) of one FSDP parameter, a DTensor sharded on dim 0 over its shard
    mesh dimension and replicated over any other (HSDP): collectives run inside the shard group only."""
    row_parallel = name.endswith(("o_proj.weight", "down_proj.weight"))  # this rank's input columns
    shards = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if "norm" not in name and [p.device_mesh.size(d) for d in shards] != [world]:
        # a group smaller than the shard group: FSDP's rows are not the group's; the whole tensor, then the slice
        full = p.full_tensor()
        if row_parallel:
            return full.chunk(world, dim=1)[rank]
        rows = vocab_rows(full.shape[0], world)  # = chunk(world) for the head-aligned matrices (world divides them)
        return full[rank * rows:(rank + 1) * rows]
    if row_parallel:
        return p.redistribute(p.device_mesh, [Shard(1) if isinstance(pl, Shard) else pl for pl in p.placements]
                              ).to_local()
    if "norm" in name:  # replicated
        return p.full_tensor()
    return p.to_local()  # column-parallel (q/k/v, gate/up, biases) and vocabulary rows: FSDP's own rows
