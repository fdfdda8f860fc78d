"""What trains and how it steps: freezing parts, AdamW with fp32 or bf16 moments, the schedule, gradient clipping."""
import math

import torch
from torch.distributed.tensor import DTensor

from checkpoint import resharded_parameters

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
    params = [p for _, p in resharded_parameters(model) if p.requires_grad]
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
            (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)  # a tensor, as torch.optim.AdamW keeps it (checkpoints agree)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                st["step"] += 1
                # bias corrections 1 - b^t as 0-dim float64 tensors, not Python floats from .item(): the same
                # values, no host sync, and a dry run on fake tensors (tools/plan.py --trace) can trace them
                t = st["step"].double()
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                # AdamW is elementwise: each rank updates the rows it holds. Working on the local shards of FSDP's
                # DTensors skips DTensor's per-op dispatch (~13 ops x ~1,300 parameters per step for the 38B).
                w, g, m_low, v_low = (_local(x) for x in (p, p.grad, st["exp_avg"], st["exp_avg_sq"]))
                g = g.float()
                m = m_low.float().lerp_(g, 1 - b1)                             # fp32 copy of this tensor only
                v = v_low.float().mul_(b2).addcmul_(g, g, value=1 - b2)
                m_low.copy_(m)                                                  # rounded back to moments_dtype
                v_low.copy_(v)
                w.mul_(1 - lr * wd)
                w.addcdiv_(m / bc1, (v / bc2).sqrt_().add_(eps), value=-lr)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this rank holds: a DTensor's local shard (a view: in-place ops update the DTensor),
    a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to base_lr, then cosine decay to min_lr_ratio * base_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_grads(model, max_norm: float, device=None) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most max_norm -> the norm before clipping, a 0-dim tensor
    on `device` (default: where the gradients are) with no host sync: read it when logging. DTensor grads reduce
    across the mesh inside clip_grad_norm_; under --cpu-offload they are on the CPU, so the norm is computed and
    reduced there (the process group's gloo half) and moved to the compute device the loss is on."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    return norm if device is None else norm.to(device, non_blocking=True)

