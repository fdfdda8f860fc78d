"""Skywork-R1V3: InternViT-6B -> pixel-shuffle MLP connector -> Qwen2.5-32B decoder, in plain PyTorch.

    image tiles [N,3,448,448] --InternViT--> [N,1024,3200] --pixel shuffle + mlp1--> [N,256,5120] ----+
    token ids   [B,T] --embed_tokens--> [B,T,5120], <IMG_CONTEXT> rows overwritten in order  <--------+
                --64 x (RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU MLP)--> norm --> lm_head --> [B,T,V]

Module names equal the release's parameter names (`vision_model.*`, `mlp1.*`, `language_model.model.*`,
`language_model.lm_head.*`), so a state dict moves in and out of the official checkpoint without renaming.
Checkpoint files are handled in checkpoint.py; this file is the architecture, the config, the per-token
log-probs / entropy every trainer computes from the final hidden states, and `generate`.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.checkpoint import checkpoint

from checkpoint import load_weights, save_model, save_state_dict
from connector import Connector
from data import train_tokenizer
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


def check_supported(d: dict, where: str):
    """Refuse, before any weight is read, the release options this code does not compute: a model that loads but
    computes something else is worse than an error. The InternVL family shares config.json's format with other
    decoders (InternLM2, Llama, Phi-3) and with LoRA and long-context settings."""
    llm = d["llm_config"]
    for arch in llm.get("architectures") or ["Qwen2ForCausalLM"]:
        if arch != "Qwen2ForCausalLM":
            raise ValueError(f"{where}: llm_config.architectures is {arch!r}: only Qwen2ForCausalLM (Qwen2/2.5 "
                             f"decoders: Skywork-R1V3, InternVL3) is implemented")
    for key in ("use_backbone_lora", "use_llm_lora"):
        if d.get(key):
            raise ValueError(f"{where}: {key} = {d[key]}: LoRA adapters are not implemented (merge them into the "
                             f"weights first)")
    scaling = llm.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if scaling and kind != "dynamic":  # dynamic NTK equals plain RoPE up to max_position_embeddings
        raise ValueError(f"{where}: llm_config.rope_scaling {scaling} is not supported (plain RoPE, or 'dynamic', "
                         f"which equals it within max_position_embeddings)")
    if llm.get("use_sliding_window"):
        raise ValueError(f"{where}: llm_config.use_sliding_window = true: sliding-window attention is not "
                         f"implemented")


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
        for key in ("vision_config", "llm_config"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"{where}: missing required field {key!r}")
        check_supported(d, where)
        vision = _dataclass_from(VisionConfig, d["vision_config"], f"{where}: vision_config",
                                 ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))
        llm = _dataclass_from(LLMConfig, d["llm_config"], f"{where}: llm_config",
                              ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "intermediate_size", "vocab_size"))
        top = {k: v for k, v in d.items() if k not in ("vision_config", "llm_config")}
        cfg = _dataclass_from(cls, top, where, ("downsample_ratio",), vision=vision, llm=llm)
        if cfg.ps_version != "v2":
            raise ValueError(f"{where}: ps_version {cfg.ps_version!r} is not supported (the release uses 'v2')")
        if cfg.force_image_size != vision.image_size:
            raise ValueError(f"{where}: force_image_size {cfg.force_image_size} != vision_config.image_size "
                             f"{vision.image_size} (position-embedding interpolation is not implemented)")
        return cfg

    @classmethod
    def from_dir(cls, ckpt_dir: str) -> "R1VConfig":
        path = os.path.join(ckpt_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in checkpoint directory {ckpt_dir!r}")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON: {e}") from None
        cfg = cls.from_dict(d, path)
        cfg.img_context_token_id = _img_context_id(ckpt_dir)
        return cfg


def _dataclass_from(cls, d: dict, where: str, required=(), **extra):
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names}, **extra)


def _img_context_id(ckpt_dir: str) -> int:
    """The id of <IMG_CONTEXT> from tokenizer.json, else added_tokens.json / tokenizer_config.json."""
    token = "<IMG_CONTEXT>"
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            d = json.load(f)
        if name == "tokenizer.json":
            ids = [t["id"] for t in d.get("added_tokens", []) if t["content"] == token]
        elif name == "added_tokens.json":
            ids = [d[token]] if token in d else []
        else:
            ids = [int(i) for i, t in d.get("added_tokens_decoder", {}).items() if t.get("content") == token]
        if ids:
            return ids[0]
    raise ValueError(f"{ckpt_dir}: no {token} token in tokenizer.json, added_tokens.json or tokenizer_config.json")


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


class KVCache:
    """Preallocated keys/values for every layer: [layers, B, kv_heads, max_len, head_dim]. Decoding writes one
    column per step in place, so a step costs the same Python work at token 10 as at token 10,000. Allocated at
    the first write, in the dtype attention computes in (bf16 under FSDP mixed precision even if weights are fp32).

    `start` is a Python int (eager: attend to the columns written so far) or a position tensor (the fixed-shape
    step that torch.compile captures: the write goes to a position held in a tensor and attention reads the whole
    cache, future columns masked, so no shape changes from one token to the next)."""

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int):
        self.shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = self.v = None

    def update(self, layer: int, start, k, v):  # k, v [B,Hkv,t,E] -> keys/values up to start+t
        if self.k is None:
            self.k, self.v = (k.new_zeros(self.shape) for _ in range(2))
        if torch.is_tensor(start):  # fixed shape: start [t] positions
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_rows(self, n: int):
        """Row b -> rows b*n .. b*n+n-1: one prompt's prefilled keys/values become the start of n samples."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        self.shape = self.k.shape


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
        q = rearrange(self.q_proj(x), "b t (h e) -> b h t e", e=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h e) -> b h t e", e=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h e) -> b h t e", e=self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)
        # GQA: each group of n_head/n_kv query heads shares one key/value head (8 KV heads serve 40 query heads).
        # No mask means causal for a fresh prompt; a single new query after the cache sees every key.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(rearrange(y, "b h t e -> b t (h e)"))


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

    sync_done = True  # sharded by FSDP, ranks hold different rows: "all done?" is asked of every rank

    @torch.no_grad()
    def decode(self, x, input_ids, attention_mask=None, *, max_new_tokens: int, eos: int, temperature=0.0,
               top_p=1.0, repetition_penalty=1.0, stream=None, generator=None, num_return_sequences=1,
               compile=False):
        """Prompt embeddings x [B,T,D] (ids [B,T] for the repetition penalty, left padding in attention_mask)
        -> new tokens [B*G, new]. One prefill per prompt; its KV cache is then copied into G rows, and each row
        samples its own first token and continuation: G samples cost one prompt's prefill, not G (nanochat's
        engine, vLLM's n > 1). Then one cached single-token step per new token."""
        G, t = num_return_sequences, input_ids.shape[1]
        pad = padding(attention_mask)
        pos = positions(input_ids, pad)
        length = t + max_new_tokens
        if compile:  # a bucketed cache length: batches of similar prompt lengths reuse one compiled step
            length = -(-length // CACHE_BUCKET) * CACHE_BUCKET
        cache = KVCache(self.model.config, x.shape[0], length)
        h = self.model(x, pos, make_mask(pad, t, 0, x.device), cache, 0)[:, -1:]          # prefill: [B,1,D]
        if G > 1:  # one prompt -> G samples: copy its cache row, last state, positions, padding and ids G times
            cache.repeat_rows(G)
            h, pos, input_ids = (z.repeat_interleave(G, 0) for z in (h, pos, input_ids))
            pad = None if pad is None else pad.repeat_interleave(G, 0)
        b = input_ids.shape[0]
        real = torch.ones(b, length, dtype=torch.bool, device=x.device)                   # generated tokens are real
        if pad is not None:
            real[:, :t] = pad.bool()
        seen = seen_tokens(input_ids, real[:, :t], self.config.vocab_size) if repetition_penalty != 1.0 else None
        step = compiled(self.decode_step_static, compile, x.is_cuda) if compile else self.decode_step
        out, done = [], torch.zeros(b, dtype=torch.bool, device=x.device)
        for i in range(max_new_tokens):
            logits = self.lm_head(h[:, -1]).float()  # [B,V]
            tok = sample(logits, seen, temperature, top_p, repetition_penalty, generator)
            tok = torch.where(done, torch.full_like(tok, eos), tok)
            out.append(tok)
            if stream is not None:
                stream(tok)
            if seen is not None:
                seen[torch.arange(b), tok] = True
            done |= tok == eos
            if i == max_new_tokens - 1 or not any_unfinished(done, self.sync_done):
                break
            pos = pos[:, -1:] + 1
            if compile:  # the same shapes every token: position as a tensor, the mask over the whole cache
                h = step(tok, pos, cache, torch.full((1,), t + i, device=x.device), None if pad is None else real)
            else:
                h = step(tok, pos, cache, t + i, None if pad is None else real[:, :t + i + 1])
        return torch.stack(out, dim=1)

    def decode_step(self, tok, pos, cache, start: int, real=None):
        """One new token per row [B] at position `start` -> final hidden state [B,1,D] (eager: the attention reads
        the start+1 columns written so far)."""
        mask = make_mask(real, 1, start, tok.device)
        return self.model(self.model.embed_tokens(tok[:, None]), pos, mask, cache, start)

    def decode_step_static(self, tok, pos, cache, at, real=None):
        """decode_step with shapes that never change (for torch.compile / CUDA graphs): the position `at` [1] is a
        tensor, and attention reads the whole preallocated cache with the columns after `at` masked, and the left
        padding too (real [B,L]: 1 = a real token, over the cache's full length)."""
        cols = torch.arange(cache.shape[3], device=tok.device)
        mask = (cols <= at)[None, None, None, :]                                                # [1,1,1,L]
        mask = mask.expand(tok.shape[0], 1, 1, -1) if real is None else mask & real[:, None, None, :].bool()
        return self.model(self.model.embed_tokens(tok[:, None]), pos, mask, cache, at)

    def tie_weights(self):
        """Tied models (tie_word_embeddings) read and write one [V,D] matrix as embedding and output layer: one
        parameter, two uses, so named_parameters() lists it once, as embed_tokens.weight."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


CACHE_BUCKET = 256  # KV cache lengths of a compiled decode step are multiples of this


def compiled(step, backend, cuda: bool):
    """torch.compile of the fixed-shape decode step: one graph (fullgraph: a graph break is an error, not a slow
    path), shapes static. On a GPU mode="reduce-overhead" replays it as a CUDA graph, which removes the per-kernel
    launch cost that dominates single-token steps. backend: True (inductor) or a backend name ("aot_eager": the
    same capture without code generation, for fast tests)."""
    backend = "inductor" if backend is True else backend
    mode = {"mode": "reduce-overhead"} if cuda and backend == "inductor" else {}
    return torch.compile(step, backend=backend, dynamic=False, fullgraph=True, **mode)


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


# -----------------------------------------------------------------------------------------------------------
# Per-token log-probs and entropy from final hidden states, chunked over the vocabulary-sized logits
# (the loss of SFT, the ratio of GRPO, the measurement of entropy.py)

def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> entropy [...] fp32 (nats) of softmax(logits / temperature), differentiable.

    H = logsumexp(z) - sum softmax(z) z, computed as -sum p log p with log p = z - logsumexp(z) (same value, but no
    cancellation between two large numbers when one token dominates); 0 * log 0 counts as 0, so -inf logits
    (masked tokens) give no NaN."""
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
    as -100) get log p = 0; mask them out in the loss. The logits exist `chunk` tokens at a time only: a 16K-token
    response over a 152K vocabulary would otherwise need a 10 GB fp32 [T,V] tensor. Chunking alone does not bound
    memory under autograd, because backward would keep every chunk's [chunk,V] logits / softmax alive until the
    loss is differentiated; so under grad each chunk is activation-checkpointed: forward keeps only its [chunk,D]
    input, and backward recomputes that chunk's lm_head (one extra lm_head matmul, small next to the decoder). A single
    chunk is not recomputed: its logits are the peak either way."""
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

    # -- the release's checkpoint format; file handling lives in checkpoint.py (which does not import this file)
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

    # -- forward
    def extract_feature(self, pixel_values):  # [N,3,H,W] -> [N, 256, D_llm]
        return self.mlp1(self.vision_model(pixel_values, self.config.select_layer))

    @torch.no_grad()
    def vit_features(self, pixel_values):  # [N,3,H,W] -> [N, 1024, D_vit]
        """The ViT's output alone, to compute once and pass to forward / generate as vit_features: while the ViT
        is frozen its output for a prompt never changes, and the connector after it may still train. Under FSDP
        this is an entry point like forward (registered in parallel.shard)."""
        return self.vision_model(pixel_values, self.config.select_layer)

    def embed(self, input_ids, pixel_values=None, vit_features=None):
        """Token embeddings with the <IMG_CONTEXT> rows replaced, in order, by the image tokens of the tiles.
        vit_features [N,1024,D_vit] (vit_features()'s output) stand in for pixel_values when they were computed
        once already, e.g. for every pass of a GRPO step while the ViT is frozen; the connector still runs here."""
        x = self.language_model.model.embed_tokens(input_ids)  # [B,T,D]
        is_img = input_ids == self.config.img_context_token_id
        tiles = vit_features if vit_features is not None else pixel_values
        n_tiles = 0 if tiles is None else tiles.shape[0]
        if has_values(input_ids):
            check_image_tokens(int(is_img.sum()), n_tiles, self.config.num_image_token)
        if n_tiles == 0 and not self.sharded_vit:
            return x
        # FSDP: each ViT block and the connector all-gather their weights in forward, a collective all ranks must
        # join, so a rank whose prompts have no image runs them on zero tiles while the others run theirs. (Ranks
        # agree on the path: all pass vit_features, or none does.)
        if vit_features is None:
            if n_tiles == 0:
                pixel_values = x.new_zeros(0, 3, self.config.force_image_size, self.config.force_image_size)
            vit_features = self.vision_model(pixel_values, self.config.select_layer)
        image_tokens = self.mlp1(vit_features).to(x.dtype)  # [N,256,D]
        # row-major: tiles fill in order. With zero tiles too: the connector must be in the autograd graph on every
        # rank, or FSDP reduces its gradient at the end of backward on the ranks without images and in order on the
        # others, and the ranks' reduce-scatters no longer pair up
        return x.masked_scatter(is_img[..., None], image_tokens)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, return_hidden=False, vit_features=None):
        """input_ids [B,T], pixel_values [tiles,3,H,W] in image order (or their vit_features [tiles,1024,D_vit]),
        attention_mask [B,T] (1 real, 0 left pad) -> logits [B,T,V], or the final hidden states [B,T,D] with
        return_hidden (for chunked log-probs)."""
        pad = padding(attention_mask)
        h = self.language_model.model(self.embed(input_ids, pixel_values, vit_features), positions(input_ids, pad),
                                      make_mask(pad, input_ids.shape[1], 0, input_ids.device))
        return h if return_hidden else self.language_model.lm_head(h)

    # -- generation
    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, temperature=0.0,
                 top_p=1.0, repetition_penalty=1.0, eos_token_id=None, stream=None, generator=None,
                 num_return_sequences=1, vit_features=None, decoder=None, compile=False):
        """Sample up to max_new_tokens after left-padded prompts [B,T] -> [B*G, T+new] with G =
        num_return_sequences (rows b*G .. b*G+G-1 answer prompt b). Rows that finished are padded with eos;
        temperature 0 is greedy. The images go through the ViT here; the decoder (this model's language_model,
        or a tensor-parallel copy, tp.py) prefills each prompt once and samples G continuations of it."""
        if input_ids.shape[1] + max_new_tokens > self.config.llm.max_position_embeddings:
            raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {self.config.llm.max_position_embeddings} tokens")
        x = self.embed(input_ids, pixel_values, vit_features)  # [B,T,D]
        eos = self.config.llm.eos_token_id if eos_token_id is None else eos_token_id
        new = (decoder or self.language_model).decode(
            x, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos=eos, temperature=temperature,
            top_p=top_p, repetition_penalty=repetition_penalty, stream=stream, generator=generator,
            num_return_sequences=num_return_sequences, compile=compile)
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), new], dim=1)


def has_values(t: torch.Tensor) -> bool:
    """False while tracing (fake tensors of a dry run, torch.compile): the tensor has a shape but no values, so a
    check that reads values (a host sync: `int()`, `bool()`, `.item()`) cannot run and is skipped."""
    return not (torch.compiler.is_compiling() or isinstance(t, FakeTensor))


def check_image_tokens(n_img_tokens: int, n_tiles: int, num_image_token: int):
    if n_img_tokens != n_tiles * num_image_token:
        raise ValueError(f"the prompt has {n_img_tokens} <IMG_CONTEXT> tokens but {n_tiles} tiles were given, "
                         f"which need {n_tiles * num_image_token} ({num_image_token} per tile)")


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


def any_unfinished(done, sync: bool = True) -> bool:
    """Under FSDP every rank must run the same number of forwards (each one all-gathers weights): a rank whose rows
    all hit EOS keeps stepping until every rank is done, or the others would wait forever in the all-gather.
    (The tensor-parallel decoder holds every rank's rows on every rank: no need to ask, sync=False.)"""
    unfinished = (~done).any().to(torch.int32)
    if sync and dist.is_available() and dist.is_initialized():
        dist.all_reduce(unfinished)
    return bool(unfinished)


def seen_tokens(input_ids, real, vocab_size: int):
    """[B,V] bool: the tokens each prompt holds (padding excluded), for the repetition penalty (prompt + output,
    as in HF). scatter_add, not assign: a pad id may also be a real token."""
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.long, device=input_ids.device)
    return seen.scatter_add_(1, input_ids, real.long()) > 0


def sample(logits, seen, temperature=0.0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """logits [B,V] fp32 -> next tokens [B]. Repetition penalty as in CTRL/HF: seen tokens' logits are divided by the
    penalty when positive, multiplied when negative. Nucleus (top-p): keep the smallest set of tokens whose
    probability reaches top_p."""
    if repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before them already reaches top_p (as HF)
        probs = probs.scatter(1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def count_params(config: R1VConfig) -> dict:
    """Parameter counts per part, from the module structure (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = SkyworkR1V(config)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in m.named_children()}
    return {**counts, "total": sum(counts.values())}


# ----------------------------------------------------------------------------------------------- tiny models
def write_tiny_checkpoint(out_dir: str, config="tiny", seed: int = 0, max_shard_bytes: int = 256 * 2**10) -> str:
    """A random-weight checkpoint in the release format from tiny_configs/<config>.json (or a config dict of that
    format), with a small BPE tokenizer
    carrying the release's special tokens. Weights are non-trivial (norms, layer scales and biases away from their
    init) so tests can tell a mis-loaded tensor. Small shards so that even tiny models exercise the index."""
    if isinstance(config, dict):
        cfg_dict, config = config, "config dict"
    else:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_configs", f"{config}.json")) as f:
            cfg_dict = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    tok_dir = tempfile.mkdtemp(prefix=".tok-", dir=os.path.dirname(os.path.abspath(out_dir)))
    train_tokenizer(tok_dir)
    config = R1VConfig.from_dict(cfg_dict, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = SkyworkR1V(config)
    tensors = [(name, init_tensor(name, tuple(p.shape), gen)) for name, p in model.named_parameters()]
    save_state_dict(tensors, cfg_dict, out_dir, max_shard_bytes, tok_dir)
    shutil.rmtree(tok_dir)
    return out_dir


def init_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if name.endswith((".ls1", ".ls2")) or "norm" in name or name.startswith("mlp1.0."):
        base = 0.0 if name.endswith(".bias") else 1.0  # scales near 1, shifts near 0, neither exactly at init
        return base + 0.1 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen) * (5.0 if "embed" in name else 1.0)
