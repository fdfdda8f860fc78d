"""Skywork-R1V3: InternViT-6B -> pixel-shuffle MLP connector -> Qwen2.5-32B decoder, in plain PyTorch.

    image tiles [N,3,448,448] --InternViT--> [N,1024,3200] --pixel shuffle + mlp1--> [N,256,5120] ----+
    token ids   [B,T] --embed_tokens--> [B,T,5120], <IMG_CONTEXT> rows overwritten in order  <--------+
                --64 x (RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU MLP)--> norm --> lm_head --> [B,T,V]

Module names equal the release's parameter names (`vision_model.*`, `mlp1.*`, `language_model.model.*`,
`language_model.lm_head.*`), so a state dict moves in and out of the official checkpoint without renaming.
This file is the config, the architecture with its KV cache, and the per-token log-probs / entropy every trainer
computes from the final hidden states; files and config.json live in checkpoint.py, the decode loop in generate.py.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

import generate as gen
from checkpoint import check_supported, dataclass_from, img_context_id, load_weights, read_config, save_model
from connector import Connector
from generate import has_values
from vision import InternViT, RMSNorm, VisionConfig, run_block


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class LLMConfig:
    hidden_size: int = 5120
    num_hidden_layers: int = 64
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    intermediate_size: int = 27648
    vocab_size: int = 151674
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    tie_word_embeddings: bool = False  # the 38B's lm_head is its own matrix; the 0.5B/1.5B Qwen2.5 reuse embed_tokens
    head_dim: int = None  # Qwen2 derives it as hidden / heads

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"llm_config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")


@dataclass
class R1VConfig:
    vision: VisionConfig
    llm: LLMConfig
    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    force_image_size: int = 448
    template: str = "internvl2_5"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    img_context_token_id: int = None  # read from the tokenizer files beside config.json

    @property
    def num_image_token(self) -> int:  # tokens per tile: (448/14)^2 * 0.5^2 = 256
        return int((self.force_image_size // self.vision.patch_size) ** 2 * self.downsample_ratio ** 2)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "R1VConfig":
        """Parse the release's InternVL-style config.json as it is (unknown fields such as auto_map are ignored)."""
        check_supported(d, where)
        vision = dataclass_from(VisionConfig, d["vision_config"], f"{where}: vision_config",
                                 ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))
        llm = dataclass_from(LLMConfig, d["llm_config"], f"{where}: llm_config",
                              ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "intermediate_size", "vocab_size"))
        top = {k: v for k, v in d.items() if k not in ("vision_config", "llm_config")}
        return dataclass_from(cls, top, where, ("downsample_ratio",), vision=vision, llm=llm)

    @classmethod
    def from_dir(cls, ckpt_dir: str) -> "R1VConfig":  # the file is read in checkpoint.py, next to where it is written
        cfg = cls.from_dict(*read_config(ckpt_dir))
        cfg.img_context_token_id = img_context_id(ckpt_dir)
        return cfg


# ---------------------------------------------------------------------------------------------------- decoder
def rope_cos_sin(positions, head_dim: int, theta: float):
    """RoPE tables for integer positions [B,T] -> cos, sin [B,1,T,head_dim] in fp32.
    Computed per forward, not stored as buffers, so a model built on the meta device needs no re-initialisation."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # [B,T,head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # Qwen2 rotates halves (rotate_half), not interleaved pairs
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x [B,H,T,E]
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys/values of every layer, preallocated: k, v [layers, rows, kv_heads, length, head_dim], written one column
    per step in place, allocated at the first write in the dtype attention computes in (bf16 under FSDP mixed
    precision). Module buffers, as in gpt-fast: torch.compile treats them as static, so CUDA graphs can record a
    step that writes them. `start`: an int (eager: rows [:B], attention reads the columns written so far) or a
    tensor [1] (the fixed-shape step: every row at that column, attention reads the whole cache, later columns masked)."""

    def __init__(self, cfg: LLMConfig, rows: int, length: int):
        super().__init__()
        self.shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, length, cfg.head_dim)
        self.register_buffer("k", None, persistent=False)
        self.register_buffer("v", None, persistent=False)

    rows, length = property(lambda self: self.shape[1]), property(lambda self: self.shape[3])

    def update(self, layer: int, start, k, v):  # k, v [B,Hkv,t,E] -> keys/values [B,Hkv,start+t|length,E]
        if self.k is None or self.k.dtype != k.dtype:
            self.k, self.v = (k.new_zeros(self.shape) for _ in range(2))
        if torch.is_tensor(start):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        b, end = k.shape[0], start + k.shape[2]
        self.k[layer, :b, :, start:end] = k
        self.v[layer, :b, :, start:end] = v
        return self.k[layer, :b, :, :end], self.v[layer, :b, :, :end]

    def repeat_rows(self, n: int, rows: int, length: int):
        """Rows b < `rows` (first `length` columns) -> rows b*n .. b*n+n-1: one prompt -> n samples. A cache of
        `rows` rows grows into new buffers; one with room (the compiled step's) is filled in place, at its address."""
        if self.rows == rows:
            self.k, self.v = self.k.repeat_interleave(n, 1), self.v.repeat_interleave(n, 1)
            self.shape = self.k.shape
            return
        for z in (self.k, self.v):
            z[:, :rows * n, :, :length] = z[:, :rows, :, :length].repeat_interleave(n, dim=1)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.layer, self.head_dim = layer, cfg.head_dim
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)  # Qwen2: bias on q, k, v
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        q, k, v = (rearrange(proj(x), "b t (h e) -> b h t e", e=self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)
        return self.o_proj(rearrange(attend(q, k, v, mask), "b h t e -> b t (h e)"))


def attend(q, k, v, mask):
    """GQA attention, q [B,H,t,E], k/v [B,Hkv,S,E] -> [B,H,t,E]: each group of H/Hkv query heads shares one KV head.
    Written in the form whose fast CUDA kernel exists (flash takes no mask; the memory-efficient kernel takes a mask
    but not enable_gqa; the math kernel holds fp32 [B,H,t,S] scores):
      - no mask (a fresh or right-padded sequence: causal; one query: every key) -> enable_gqa, flash;
      - one query per row (decode) -> the group's queries become the query axis of their KV head [B,Hkv,group,E],
        one [B,1,1,S] mask for all of them -> memory-efficient, no K/V copy;
      - a mask over several queries (left-padded prefill and log-prob passes) -> K/V repeated to H heads ->
        memory-efficient (the copy is [B,H,S,E], the scores it avoids [B,H,t,S] in fp32)."""
    group = q.shape[1] // k.shape[1]
    if q.shape[2] == 1 and group > 1:
        y = F.scaled_dot_product_attention(rearrange(q, "b (h g) 1 e -> b h g e", g=group), k, v, attn_mask=mask)
        return rearrange(y, "b h g e -> b (h g) 1 e")
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=group > 1)
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):  # SwiGLU: down(silu(gate(x)) * up(x))
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.grad_checkpointing = False

    def forward(self, x, positions, mask, cache=None, start=0):  # x: input embeddings [B,T,D]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        for layer in self.layers:
            x = run_block(self.grad_checkpointing, layer, x, cos, sin, mask, cache, start)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.kept = {}  # the compiled step's KV cache (kv_cache); a dict, so not a submodule (state_dict, FSDP, .to)

    def decode(self, x, input_ids, attention_mask=None, **kw):  # tp.TPDecoder wraps it in its row gathering
        return gen.decode(self, x, input_ids, attention_mask, **kw)

    def kv_cache(self, rows: int, length: int, keep: bool = False) -> KVCache:
        """A cache for `rows` sequences of `length` tokens: a new one, or with keep (the compiled step) this decoder's
        one, replaced only when too small, with twice the length: log2(longest / shortest) + 2 graphs a run."""
        if not keep:
            return KVCache(self.config, rows, length)
        old = self.kept.get("cache")
        if old is None or old.rows < rows or old.length < length:
            if old is not None:  # grow geometrically: rising prompt lengths replace it only log2 times
                rows, length = max(rows, old.rows), max(length, old.length * (2 if old.length < length else 1))
            self.kept["cache"] = KVCache(self.config, rows, -(-length // 256) * 256)  # lengths: multiples of 256
        return self.kept["cache"]

    def prefill(self, x, input_ids, attention_mask=None, cache: KVCache = None):
        """Embeddings x [B,T,D] of ids [B,T] (attention_mask: 0 = left padding) -> final-norm states [B,T,D],
        positions [B,T], the padding mask or None; a cache gets their keys/values in rows [:B]."""
        pad = padding(attention_mask)
        pos = positions(input_ids, pad)
        return self.model(x, pos, make_mask(pad, x.shape[1], 0, x.device), cache, 0), pos, pad

    def decode_step(self, tok, pos, cache, start, real=None):
        """One new token per row [B] at cache column `start` -> final hidden state [B,1,D]. real: 1 = a real token,
        or None when nothing is padded. start an int: attention reads the start+1 columns written so far (real
        [B,start+1]); a tensor [1] (torch.compile, CUDA graphs: shapes never change): every cache row, the whole
        cache with the columns after `start` masked (real [rows,L])."""
        mask = (((torch.arange(cache.length, device=tok.device) <= start) & real)[:, None, None, :]  # [rows,1,1,L]
                if torch.is_tensor(start) else make_mask(real, 1, start, tok.device))
        return self.model(self.model.embed_tokens(tok[:, None]), pos, mask, cache, start)

    def tie_weights(self):
        """Tied models (tie_word_embeddings) read and write one [V,D] matrix as embedding and output layer: one
        parameter, two uses, so named_parameters() lists it once, as embed_tokens.weight."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def make_mask(pad_mask, t: int, start: int, device=None):
    """Boolean SDPA mask [B|1,1,t,start+t] for t new queries after `start` cached positions. pad_mask [B,start+t]
    marks real tokens (1) and left padding (0), or is None when nothing is padded. None means "let SDPA decide":
    is_causal for a fresh prompt, full attention for a single new query."""
    if pad_mask is None and (start == 0 or t == 1):
        return None
    q = torch.arange(start, start + t, device=device)[:, None]
    k = torch.arange(start + t, device=device)[None, :]
    mask = (k <= q)[None, None]  # [1,1,t,start+t]
    if pad_mask is not None:
        # a padded query would see no key at all (NaN from softmax); letting it see itself keeps it finite, and
        # padded positions are never read out
        mask = (mask & pad_mask[:, None, None, :].bool()) | (k == q)
    return mask


# ------------------------------------- per-token log-probs and entropy (SFT's loss, GRPO's ratio, entropy.py)

def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> entropy [...] fp32 (nats) of softmax(logits / temperature), differentiable: -sum p log p
    with log p = z - logsumexp(z) (no cancellation of two large numbers when one token dominates); 0 * log 0 = 0,
    so -inf logits (masked tokens) give no NaN."""
    return _entropy((logits.float() / temperature).log_softmax(-1))


def _entropy(logp):  # log-probs [..., V] -> entropy [...]
    return -(logp.exp() * logp.masked_fill(logp == float("-inf"), 0.0)).sum(-1)


def _chunk_logp_entropy(lm_head, h, targets, temperature):
    """h [c,D], targets [c] -> (log p(target) [c], entropy [c]) fp32."""
    logp = (lm_head(h).float() / temperature).log_softmax(-1)  # [c,V]
    return logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1), _entropy(logp)


def token_logprobs_and_entropy(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                               chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B,T,D] (final-norm states from model(..., return_hidden=True)), targets [B,T] next-token ids
    -> (log p(target) [B,T] fp32, entropy [B,T] fp32), both differentiable, at the sampling `temperature`.

    lm_head: any callable [N,D] -> [N,V], normally model.language_model.lm_head. Targets < 0 (an ignore index such
    as -100) get log p = 0; mask them out in the loss. The logits exist `chunk` tokens at a time only (a 16K-token
    response over a 152K vocabulary would need a 10 GB fp32 [T,V] tensor), and under grad each chunk is
    activation-checkpointed, or backward would keep every chunk's logits alive: forward keeps its [chunk,D] input,
    backward recomputes its lm_head (one extra lm_head matmul). A single chunk is not recomputed."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); for greedy decoding measure at 1.0")
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on [B,T]")
    B, T, D = hidden.shape
    h, t = hidden.reshape(B * T, D), targets.reshape(B * T)
    outs = []
    recompute = torch.is_grad_enabled() and B * T > chunk  # one chunk: nothing to save, so no extra matmul
    for i in range(0, B * T, chunk):
        args = (lm_head, h[i:i + chunk], t[i:i + chunk], temperature)
        outs.append(checkpoint(_chunk_logp_entropy, *args, use_reentrant=False) if recompute
                    else _chunk_logp_entropy(*args))
    if not outs:  # B*T == 0
        empty = hidden.new_zeros(B, T, dtype=torch.float32)
        return empty, empty.clone()
    logp, ent = (torch.cat(x).view(B, T) for x in zip(*outs))
    return torch.where(targets >= 0, logp, 0.0), ent


# ------------------------------------------------------------------------------------------------------ model
class SkyworkR1V(nn.Module):
    def __init__(self, config: R1VConfig):
        super().__init__()
        self.config = config
        self.vision_model = InternViT(config.vision)
        self.mlp1 = Connector(config.vision.hidden_size, config.llm.hidden_size, config.downsample_ratio)
        self.language_model = Qwen2ForCausalLM(config.llm)
        self.sharded_vit = False  # set by parallel.shard: the ViT's forward is then a collective

    @property
    def grad_checkpointing(self) -> bool:
        return self.language_model.model.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool):
        self.vision_model.grad_checkpointing = self.language_model.model.grad_checkpointing = on

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype=torch.float32, device="cpu", shard=None) -> "SkyworkR1V":
        """Config -> model on meta -> (optional `shard(model)`, e.g. FSDP2) -> weights -> eval mode.
        Any error raises before a model is returned, so nothing half-loaded escapes."""
        config = R1VConfig.from_dir(ckpt_dir)
        with torch.device("meta"):
            model = cls(config)
        model.to(dtype)
        if shard is not None:
            shard(model)
        if any(hasattr(p, "to_local") for p in model.parameters()):
            model.to_empty(device=device)  # FSDP: each rank allocates its rows, filled in place
        load_weights(model, ckpt_dir, device)
        model.language_model.tie_weights()  # loading replaced embed_tokens.weight: point lm_head at the new one
        model.ckpt_dir = ckpt_dir  # save_pretrained copies the tokenizer files from here
        return model.eval()

    def save_pretrained(self, out_dir: str, **kwargs):
        save_model(self, out_dir, **kwargs)

    def extract_feature(self, pixel_values):  # [N,3,H,W] -> [N, 256, D_llm]
        return self.mlp1(self.vision_model(pixel_values, self.config.select_layer))

    @torch.no_grad()
    def vit_features(self, pixel_values):  # [N,3,H,W] -> [N, 1024, D_vit]
        """The ViT's output alone, computed once and passed to forward / generate as vit_features while the ViT is
        frozen (the connector may still train). Under FSDP an entry point like forward (parallel.shard)."""
        return self.vision_model(pixel_values, self.config.select_layer)

    def embed(self, input_ids, pixel_values=None, vit_features=None):
        """Token embeddings with the <IMG_CONTEXT> rows replaced, in order, by the image tokens of the tiles.
        vit_features [N,1024,D_vit] (vit_features()'s output) stand in for pixel_values when they were computed
        once already, e.g. for every pass of a GRPO step while the ViT is frozen; the connector still runs here."""
        x = self.language_model.model.embed_tokens(input_ids)  # [B,T,D]
        is_img = input_ids == self.config.img_context_token_id
        tiles = vit_features if vit_features is not None else pixel_values
        n_tiles = 0 if tiles is None else tiles.shape[0]
        if has_values(input_ids) and int(is_img.sum()) != n_tiles * self.config.num_image_token:
            raise ValueError(f"the prompt has {int(is_img.sum())} <IMG_CONTEXT> tokens but {n_tiles} tiles were "
                             f"given, which need {n_tiles * self.config.num_image_token} "
                             f"({self.config.num_image_token} per tile)")
        if n_tiles == 0 and not self.sharded_vit:
            return x
        # sharded: a rank without images runs the ViT and connector on zero tiles (the lockstep rule, parallel.py)
        if vit_features is None:
            if n_tiles == 0:
                pixel_values = x.new_zeros(0, 3, self.config.force_image_size, self.config.force_image_size)
            vit_features = self.vision_model(pixel_values, self.config.select_layer)
        image_tokens = self.mlp1(vit_features).to(x.dtype)  # [N,256,D]
        # row-major: tiles fill in order; with zero tiles too, so the connector's backward runs on every rank
        return x.masked_scatter(is_img[..., None], image_tokens)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, return_hidden=False, vit_features=None):
        """input_ids [B,T], pixel_values [tiles,3,H,W] in image order (or their vit_features [tiles,1024,D_vit]),
        attention_mask [B,T] (1 real, 0 left pad) -> logits [B,T,V], or the final hidden states [B,T,D] with
        return_hidden (for chunked log-probs)."""
        h = self.language_model.prefill(self.embed(input_ids, pixel_values, vit_features), input_ids, attention_mask)[0]
        return h if return_hidden else self.language_model.lm_head(h)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, temperature=0.0,
                 top_p=1.0, repetition_penalty=1.0, eos_token_id=None, stream=None, generator=None,
                 num_return_sequences=1, vit_features=None, decoder=None, compile=False):
        """Sample up to max_new_tokens after left-padded prompts [B,T] -> [B*G, T+new], G = num_return_sequences
        (rows b*G .. b*G+G-1 answer prompt b; finished rows padded with eos; temperature 0: greedy). The ViT runs
        here, the decoder (language_model, or tp.py's copy) in generate.decode, which documents the arguments."""
        if input_ids.shape[1] + max_new_tokens > self.config.llm.max_position_embeddings:
            raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {self.config.llm.max_position_embeddings} tokens")
        x = self.embed(input_ids, pixel_values, vit_features)  # [B,T,D]
        eos = self.config.llm.eos_token_id if eos_token_id is None else eos_token_id
        # all_done: FSDP shards step until every rank's rows are done (parallel.py); tp.TPDecoder picks its own
        new = (decoder or self.language_model).decode(
            x, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos=eos, temperature=temperature,
            top_p=top_p, repetition_penalty=repetition_penalty, stream=stream, generator=generator,
            num_return_sequences=num_return_sequences, compile=compile,
            all_done=gen.all_ranks_done if self.sharded_vit else gen.rows_done)
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), new], dim=1)


def padding(attention_mask):
    """The [B,T] 0/1 mask if anything is padded, else None (the fast, unmasked attention path). While tracing
    the values are unknown: keep the mask (same result, the masked kernel)."""
    if attention_mask is None or (has_values(attention_mask) and bool(attention_mask.all())):
        return None
    return attention_mask

def positions(input_ids, attention_mask):
    """Position ids: 0, 1, 2, ... over the real tokens of each row; left padding does not shift them."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def count_params(config: R1VConfig) -> dict:
    """Parameter counts per part, from the module structure (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = SkyworkR1V(config)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in m.named_children()}
    return {**counts, "total": sum(counts.values())}
