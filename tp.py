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
loop (model.Qwen2ForCausalLM.decode) runs here, on plain tensors: DTensor is used for the one-off refresh only
(its per-op overhead in a decode loop is the gap gpt-fast removed).

All ranks decode one batch together: every rank's prompts are gathered, sampled identically on every rank (same
logits after the all-gather, same generator seed), and each rank keeps its own rows of the result.
"""
import logging
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Shard

from checkpoint import resharded_parameters
from model import LLMConfig, Qwen2ForCausalLM, SkyworkR1V

# On gloo (CPU) DTensor's Shard(0) -> Shard(1) falls back from all-to-all to all-gather + chunk and says so: the
# same result, and a CPU-only message (NCCL has all-to-all); every refresh would print it on every rank.
logging.getLogger("torch.distributed.tensor._collective_utils").addFilter(
    lambda record: "does not support alltoall" not in record.getMessage())


def check_divisible(cfg: LLMConfig, world: int):
    """Each rank must own whole query and KV heads (and an equal MLP slice): checked before any weight is read."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(cfg, name) % world:
            raise ValueError(f"tensor-parallel generation over {world} ranks needs llm_config.{name} "
                             f"({getattr(cfg, name)}) divisible by {world}; run with a world size that divides it, "
                             f"or pass --no-tp to generate from the FSDP shards")


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

    def __init__(self, rows: int, dim: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim), requires_grad=False)
        self.first = rank * rows

    def forward(self, ids):  # [B,t] -> [B,t,D]
        local = ids - self.first
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[..., None]
        dist.all_reduce(x)
        return x


class VocabParallelHead(nn.Module):
    """lm_head rows of this rank -> logits of its vocabulary slice -> all-gathered into [.., V] on every rank
    (the padding rows are cut off, so they can never be sampled)."""

    def __init__(self, rows: int, dim: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim), requires_grad=False)
        self.vocab = vocab

    def forward(self, h):  # [B,D] -> [B,V]
        local = F.linear(h, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., :self.vocab]


def all_reduce_output(module, inputs, output):
    """Forward hook on attention and MLP: their row-parallel output projection left a partial sum per rank."""
    dist.all_reduce(output)
    return output


class TPDecoder(Qwen2ForCausalLM):
    """model.py's decoder with 1/W of the heads, MLP width and vocabulary per rank; the same decode loop."""
    sync_done = False  # every rank holds every row: all ranks agree when all rows are done, no need to ask

    def __init__(self, cfg: LLMConfig, rank: int, world: int):
        check_divisible(cfg, world)
        rows = vocab_rows(cfg.vocab_size, world)
        local = replace(cfg, num_attention_heads=cfg.num_attention_heads // world, head_dim=cfg.head_dim,
                        num_key_value_heads=cfg.num_key_value_heads // world, tie_word_embeddings=False,
                        intermediate_size=cfg.intermediate_size // world, vocab_size=rows)
        super().__init__(local)
        self.config = replace(local, vocab_size=cfg.vocab_size)  # sampling sees the real vocabulary
        self.model.embed_tokens = VocabParallelEmbedding(rows, cfg.hidden_size, rank)
        self.lm_head = VocabParallelHead(rows, cfg.hidden_size, cfg.vocab_size)
        for layer in self.model.layers:
            layer.self_attn.register_forward_hook(all_reduce_output)
            layer.mlp.register_forward_hook(all_reduce_output)
        self.requires_grad_(False)

    @torch.no_grad()
    def decode(self, x, input_ids, attention_mask=None, *, generator=None, num_return_sequences=1, **kw):
        """Gather every rank's prompts, decode them all on every rank, return this rank's rows."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        (x, input_ids, attention_mask), mine = gather_rows([x, input_ids, attention_mask])
        new = super().decode(x, input_ids, attention_mask, generator=shared_generator(generator, x.device),
                             num_return_sequences=num_return_sequences, **kw)
        G = num_return_sequences
        return new[mine.start * G:mine.stop * G]


def gather_rows(tensors: list) -> tuple[list, slice]:
    """Left-padded [B_r, T_r, ...] tensors of each rank -> the same for all ranks' rows, padded on the left to the
    longest T, rank order; plus the slice of rows that are this rank's. Two collectives: the shapes, then the rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    b, t = tensors[0].shape[:2]
    shapes = [torch.zeros(2, dtype=torch.long, device=tensors[0].device) for _ in range(world)]
    dist.all_gather(shapes, torch.tensor([b, t], device=tensors[0].device))
    sizes = [s.tolist() for s in shapes]
    B, T = max(s[0] for s in sizes), max(s[1] for s in sizes)
    out = []
    for z in tensors:
        padded = z.new_zeros(B, T, *z.shape[2:])
        padded[:b, T - t:] = z  # left padding: a zero attention mask hides it
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:s[0]] for p, s in zip(parts, sizes)]))
    first = sum(s[0] for s in sizes[:rank])
    return out, slice(first, first + b)


def shared_generator(generator, device) -> torch.Generator | None:
    """Every rank must draw the same samples from the same logits: one seed, drawn by rank 0, for all."""
    if generator is None:
        return None
    seed = torch.randint(2**62, (1,), generator=generator, device=generator.device).to(device)
    dist.broadcast(seed, src=0)
    return torch.Generator(device).manual_seed(int(seed))


# ------------------------------------------------------------------------------------------------- the refresh
def make_decoder(model: SkyworkR1V, dtype: torch.dtype) -> TPDecoder | None:
    """The tensor-parallel copy of an FSDP-sharded model's decoder, filled from its shards; None on one process
    (the model's own decoder is used there: tensor parallelism of degree 1 is the model itself)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    decoder = meta_decoder(model.config.llm, dtype).to_empty(device=next(model.parameters()).device)
    refresh(decoder, model)
    return decoder


def meta_decoder(cfg: LLMConfig, dtype: torch.dtype) -> TPDecoder:
    """This rank's TPDecoder on the meta device, already in `dtype`: to_empty then allocates it once, in the
    compute dtype (never an fp32 copy on the GPU, even for a moment)."""
    with torch.device("meta"):
        return TPDecoder(cfg, dist.get_rank(), dist.get_world_size()).to(dtype)


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
        local = tp_slice(name, p)
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


def tp_slice(name: str, p) -> torch.Tensor:
    """This rank's tensor-parallel slice of one FSDP parameter (a DTensor sharded on dim 0)."""
    if name.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel: this rank's input columns
        return p.redistribute(p.device_mesh, [Shard(1)]).to_local()
    if "norm" in name:  # replicated
        return p.full_tensor()
    return p.to_local()  # column-parallel (q/k/v, gate/up, biases) and vocabulary rows: FSDP's own rows
