"""The connector (`mlp1`): pixel shuffle, then LayerNorm -> Linear -> GELU -> Linear into the LLM's width.

Pixel shuffle trades space for channels: each 2x2 block of neighbouring ViT patches becomes one token with 4x the
channels, so a 448px tile gives 32*32/4 = 256 tokens for the LLM instead of 1024 (InternVL 1.5+, `downsample_ratio`
0.5). The channel order inside a token is the release's `ps_version: "v2"` order, which the weights of `mlp1.1`
were trained with: any other order gives the right shapes and wrong answers.
"""
from einops import rearrange
from torch import nn


def pixel_shuffle(x, downsample_ratio: float = 0.5):
    """[N, L, D] patch features (L = side*side, row-major) -> [N, L*r^2, D/r^2] with r = downsample_ratio.

    InternVL's v2 code does view/permute/view/permute on [n, rows, cols, d]; written as one pattern: token
    (i, j) gathers patches (s*i + a, s*j + b) for a, b < s, channels ordered (a, b, d)."""
    s = round(1 / downsample_ratio)
    side = round(x.shape[1] ** 0.5)
    if side * side != x.shape[1] or side % s:
        raise ValueError(f"pixel_shuffle: {x.shape[1]} patches do not form a square grid divisible by {s}")
    return rearrange(x, "n (i a j b) d -> n (i j) (a b d)", a=s, b=s, j=side // s)


class Connector(nn.Sequential):
    """mlp1 = [LayerNorm, Linear, GELU, Linear]; the indices 0, 1, 3 are the release's key names (mlp1.0 ...)."""

    def __init__(self, vit_hidden: int, llm_hidden: int, downsample_ratio: float = 0.5):
        d_in = vit_hidden * round(1 / downsample_ratio) ** 2
        super().__init__(nn.LayerNorm(d_in), nn.Linear(d_in, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
        self.downsample_ratio = downsample_ratio

    def forward(self, vit_features):  # [N, 1024, D_vit] -> [N, 256, D_llm]
        out = super().forward(pixel_shuffle(vit_features, self.downsample_ratio))
        # nn.Linear on a 3-D input returns a view of its 2-D matmul result. FSDP2 shards mlp1 as a unit (parallel.py)
        # and warns, every step, when a unit returns a view: an in-place op on it would bypass the unit's backward
        # hook. A copy is a tensor of its own with the same values, 256 tokens a tile: small next to the ViT's work.
        return out.clone()
