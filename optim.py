"""What trains and how it steps: freezing parts, AdamW with fp32 or bf16 moments, the schedule, gradient clipping."""
import math

import torch

from checkpoint import named_shards

PARTS = {"vision": "vision_model", "connector": "mlp1", "llm": "language_model"}


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


def freeze(model: torch.nn.Module, spec: str) -> int:
    """requires_grad only on the parts named in spec; returns the trainable parameter count. Frozen parameters get
    no .grad, no optimizer state and, under FSDP2, no gradient reduction."""
    train = parse_train_spec(spec)
    for name, part in model.named_children():
        part.requires_grad_(name in train)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_grad_norm(model, max_norm: float) -> float:
    """Global gradient norm over all ranks (DTensor grads reduce across the mesh inside clip_grad_norm_)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
