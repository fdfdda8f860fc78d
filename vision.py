"""InternViT, the vision encoder of Skywork-R1V3 and the InternVL family, in plain PyTorch.

A 448x448 tile is cut into 32x32 patches of 14x14 pixels, a CLS token is prepended and learned position embeddings
are added; then a stack of pre-norm transformer blocks. Three details of InternViT-6B (R1V3, InternVL3-38B/78B)
differ from a textbook ViT:
  * RMSNorm instead of LayerNorm (`norm_type: rms_norm`),
  * QK-norm: q and k are RMS-normalised over the *full* width (all heads at once) before being split into heads,
    which keeps attention logits bounded in a 6B-parameter ViT (`qk_normalization: true`),
  * layer scale: each residual branch is multiplied by a learned per-channel vector (ls1, ls2).
InternViT-300M (InternVL3-1B..14B: 24 layers of width 1024, 16 heads) is the textbook half of the same code: LayerNorm
(`norm_type: layer_norm`), no QK-norm, and a bias on the fused qkv projection (`qkv_bias: true`); it keeps layer scale.
There is no final norm: the connector consumes the raw output of layer `select_layer`, CLS token dropped.
Parameter names follow the release (`vision_model.embeddings.*`, `vision_model.encoder.layers.N.*`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class VisionConfig:
    hidden_size: int = 3200
    num_hidden_layers: int = 45
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qk_normalization: bool = True
    qkv_bias: bool = False
    norm_type: str = "rms_norm"  # "rms_norm" (InternViT-6B) or "layer_norm" (InternViT-300M)
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (bf16 squares lose too much precision), cast back before the scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.layer_norm_eps)
    if cfg.norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
    raise ValueError(f"vision_config.norm_type must be 'rms_norm' or 'layer_norm', got {cfg.norm_type!r}")


def run_block(grad_checkpointing: bool, block, x, *args):
    """Activation checkpointing per block: keep only the block's input, recompute its inside in the backward
    (one extra forward, in exchange for activation memory that no longer grows with depth)."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))

    def forward(self, pixel_values):  # [N, 3, 448, 448]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, D, 32, 32]
        x = rearrange(x, "n d h w -> n (h w) d")  # row-major patches: [N, 1024, D]
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)  # [N, 1025, D]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, self.n_head = cfg.hidden_size, cfg.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)  # rows ordered q, k, v
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(d, cfg.layer_norm_eps)  # over the full width, not per head
            self.k_norm = RMSNorm(d, cfg.layer_norm_eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # [N, L, D]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (rearrange(t, "n l (h e) -> n h l e", h=self.n_head) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every patch sees every patch
        return self.proj(rearrange(y, "n h l e -> n l (h e)"))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act != "gelu":
            raise ValueError(f"vision_config.hidden_act: only 'gelu' is supported, got {cfg.hidden_act!r}")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg, cfg.hidden_size), make_norm(cfg, cfg.hidden_size)
        self.attn, self.mlp = VisionAttention(cfg), VisionMLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))  # layer scale (CaiT): per-channel residual gain
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.grad_checkpointing = False

    def forward(self, pixel_values, select_layer: int = -1):
        """[N, 3, H, W] -> patch features of layer `select_layer` (InternVL's hidden_states[select_layer], where
        index 0 is the embedding output and -1 the last layer), CLS dropped: [N, num_patches, D]."""
        n_layers = len(self.encoder.layers)
        depth = select_layer if select_layer >= 0 else n_layers + 1 + select_layer
        if not 0 <= depth <= n_layers:
            raise ValueError(f"select_layer {select_layer} is out of range for {n_layers} vision layers")
        x = self.embeddings(pixel_values)
        for block in self.encoder.layers[:depth]:  # layers after select_layer are never run
            x = run_block(self.grad_checkpointing, block, x)
        return x[:, 1:]

