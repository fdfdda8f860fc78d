"""GRPO for the vision-language model, top to bottom in one file.

Group Relative Policy Optimisation (DeepSeekMath, arXiv 2402.03300) as used for Skywork-R1V2/R1V3's RL stage:
for each prompt sample a group of G responses, score them with verifiable rewards (format + accuracy), turn the
rewards into group-relative advantages, and maximise a token-level clipped surrogate (PPO, arXiv 1707.06347) with
clip-higher (DAPO, arXiv 2503.14476), token-mean aggregation and an optional k3 KL to a frozen reference policy.
R1V2's Selective Sample Buffer (arXiv 2504.16656) counters vanishing advantages (groups whose rewards are all equal).
"""
import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GRPOConfig:
    # rollouts
    group_size: int = 8           # G responses per prompt
    temperature: float = 1.0      # sampling temperature; log-probs are taken at the same temperature
    # objective
    clip_low: float = 0.2         # ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher, DAPO)
    clip_high: float = 0.28
    beta: float = 0.0             # k3 KL weight; 0 = off: no reference model is built, no extra forward
    scale_adv: bool = True        # A = (r - mean) / (std + eps); False: A = r - mean (Dr. GRPO, arXiv 2503.20783)
    format_weight: float = 0.5    # reward = accuracy + format_weight * format
    # optimisation
    lr: float = 1e-6              # peers' value for 32B decoders
    # selective sample buffer (R1V2)
    buffer_capacity: int = 64     # samples kept
    buffer_max_age: int = 4       # steps a buffered sample stays usable (it gets staler every step)
    flat_threshold: float = 0.5   # mix buffered samples in when more than this fraction of groups is flat
    logprob_chunk: int = 1024     # tokens per lm_head chunk when computing log-probs / entropy


# ----------------------------------------------------------------------------------------------------------------
# Rewards. Model text is hostile input: never eval it, and bound the work so scoring takes milliseconds whatever
# the length: the only whole-string operations are str.find/rfind/count (linear, C speed); everything after them
# looks at a window of at most _MAX_BOXED characters, with simple regexes and a loop-free brace walk.

_MAX_BOXED = 200      # longest \boxed{} content we score; longer -> no answer
_MAX_DIGITS = 50      # longer digit strings are compared as strings, never converted to numbers


def format_reward(response: str) -> float:
    """1.0 iff the response is `[<think>] thinking </think> answer` with a non-empty \\boxed{} in the answer.

    The prompt already opens the assistant turn with `<think>\\n` (thinking mode), so the generated text normally
    starts inside the thinking; a leading `<think>` (e.g. when the caller scores prompt tail + response) is accepted
    too. Anything else before the thinking, a second `<think>`, or more than one `</think>` is malformed."""
    s = response.lstrip()
    if s.startswith("<think>"):
        s = s[len("<think>"):]
    if "<think>" in s or s.count("</think>") != 1:
        return 0.0
    thinking, answer = s.split("</think>")
    return 1.0 if thinking.strip() and extract_boxed(answer) else 0.0


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (brace-depth walk, escaped \\{ \\} skipped) or of `\\boxed 5`; None if absent,
    unclosed or longer than _MAX_BOXED characters."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    rest = text[i + len("\\boxed"): i + len("\\boxed") + _MAX_BOXED + 2]   # bounded window
    if rest.startswith(" "):                                               # `\boxed 5`: up to whitespace or `$`
        m = re.match(r" +([^\s$]+)", rest)
        return m.group(1) if m else None
    if not rest.startswith("{"):
        return None
    depth, k = 0, 0
    while k < len(rest):
        c = rest[k]
        if c == "\\":
            k += 1                      # `\{` / `\}` are literal braces
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return rest[1:k]
        k += 1
    return None


_UNITS = ("cm|mm|km|m|in|inch|inches|ft|feet|foot|yd|yards?|miles?|mi|kg|mg|g|grams?|lbs?|pounds?|ml|mL|l|L|liters?|"
          "litres?|s|sec|seconds?|min|minutes?|h|hr|hours?|days?|weeks?|months?|years?|degrees?|deg|rad|radians?|"
          "units?|dollars?|cents?|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|km/h|m/s|"
          "people|students|apples|shapes|items|pieces|times|ways|cubes|circles|squares|triangles")
_UNIT_RE = re.compile(rf"\s*(?:(?:square|sq\.?|cubic)\s*)?(?:{_UNITS})(?:\^\{{?[23]\}}?|[²³])?\.?$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_MIXED_RE = re.compile(r"([+-]?)(\d{1,50})\\frac\{(\d{1,50})\}\{(\d{1,50})\}")   # 1\frac{1}{2} = 3/2
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(rf"([+-]?)(?:\(([+-]?{_NUM})\)|({_NUM}))(?:/(?:\(([+-]?{_NUM})\)|({_NUM})))?")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_MC_RE = re.compile(r"(?i:(?:option|choice|answer)\s*:?\s*)?(?:\(([A-J])\)|([A-J])(?:[.:)]|$))(?:\s.*)?", re.DOTALL)


def _normalize(s: str) -> str:
    """Strip the LaTeX and wording that do not change the value: $, \\left/\\right, spacing, \\text{}, degrees,
    %, `x =`, trailing units; \\dfrac -> \\frac -> a/b. Input is capped, every regex is linear-ish on it."""
    s = s[:_MAX_BOXED].strip().replace("\u2212", "-").replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])|\\displaystyle|\\[!,;:]", "", s)
    s = re.sub(r"\\ |~", " ", s).replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|\\?%", "", s)
    for _ in range(5):                                       # nested \text{\textbf{..}}: innermost first
        s = _TEXT_RE.sub(r"\1", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)       # \frac12
    m = _MIXED_RE.fullmatch(s.strip())
    if m:
        sign, whole, num, den = m.groups()
        s = f"{sign}{int(whole) * int(den) + int(num)}/{den}" if int(den) else s
    for _ in range(5):
        s = _FRAC_RE.sub(lambda m: "/".join(x if re.fullmatch(r"[\w.]+", x) else f"({x})" for x in m.groups()), s)
    s = s.strip()
    m = re.fullmatch(r"[a-zA-Z]\w{0,2}\s*=\s*(.+)", s, re.DOTALL)   # `x = 5` -> `5`
    if m:
        s = m.group(1)
    s = s.strip().rstrip(".").strip()
    m = _UNIT_RE.search(s)
    if m and m.start() > 0 and _parse_number(s[:m.start()]) is not None:
        s = s[:m.start()]
    return s.strip()


def _parse_number(s: str) -> Fraction | None:
    """Exact value of an int / decimal / a/b / thousands-separated number, else None. Regex only: no exponents,
    no more than _MAX_DIGITS digits, so nothing here can be slow."""
    s = re.sub(r"\s+", "", s)
    if sum(c.isdigit() for c in s) > _MAX_DIGITS:
        return None
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    m = _NUMBER_RE.fullmatch(s)
    if not m:
        return None
    sign, num_p, num, den_p, den = m.groups()
    value = Fraction(num_p or num)
    if den_p or den:
        d = Fraction(den_p or den)
        if d == 0:
            return None
        value /= d
    return -value if sign == "-" else value


def _mc_letter(s: str) -> str | None:
    """Multiple-choice letter: `B`, `(B)`, `B.`, `B:`, `B) text`, `(B) text`, `Option B` -> 'B'; `B text` -> None."""
    m = _MC_RE.fullmatch(s)
    return (m.group(1) or m.group(2)) if m else None


def _canon(s: str) -> str:
    s = re.sub(r"\s+", "", s)
    return s.lower() if s.isalpha() and len(s) > 1 else s    # words are case-insensitive, single letters are not


def answers_match(pred: str, answer: str) -> bool:
    """Letters if the answer is a choice letter; exact rational comparison if both sides are numbers
    (0.5 == 1/2 == \\frac{1}{2}); otherwise the normalised strings."""
    p, a = _normalize(pred), _normalize(answer)
    if not p or not a:
        return False
    letter = _mc_letter(a)
    if letter:
        return _mc_letter(p) == letter
    x, y = _parse_number(p), _parse_number(a)
    if x is not None and y is not None:
        return x == y
    return _canon(p) == _canon(a)


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 if the content of the last \\boxed{} matches the reference answer, else 0.0."""
    pred = extract_boxed(response)
    return 1.0 if pred is not None and answers_match(pred, answer) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The math.

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [N] (N = prompts * G, groups contiguous) -> (advantages [N], flat [N // G] bool).

    A_i = (r_i - mean_g r) / (std_g r + 1e-6), unbiased std (GRPO eq. 3); scale=False gives r_i - mean_g r.
    A flat group (all rewards equal, including G = 1) has no signal: its advantages are exactly 0."""
    r = rewards.float().view(-1, group_size)                            # [P, G]
    flat = r.amax(1) == r.amin(1)                                       # [P]
    adv = r - r.mean(1, keepdim=True)
    if scale and group_size > 1:
        adv = adv / (r.std(1, keepdim=True) + 1e-6)
    return torch.where(flat[:, None], 0.0, adv).flatten(), flat


def token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B,T,D], targets [B,T] -> (log p(target) [B,T] fp32, entropy [B,T] fp32, no grad) at `temperature`.

    lm_head runs on `chunk` tokens at a time and, under autograd, each chunk is recomputed in backward
    (activation checkpointing), so no [B*T, V] fp32 tensor is ever alive: at V = 152K that would be
    0.6 MB per token. Entropy H = logsumexp(z) - sum softmax(z) z (metrics only)."""
    B, T, D = hidden.shape
    h, t = hidden.reshape(B * T, D), targets.reshape(B * T)

    def piece(h_c, t_c):
        z = lm_head(h_c).float() / temperature                          # [c, V]
        logp = z.log_softmax(-1)
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, t_c[:, None]).squeeze(-1), ent

    outs = [checkpoint(piece, h[i:i + chunk], t[i:i + chunk], use_reentrant=False) if torch.is_grad_enabled()
            else piece(h[i:i + chunk], t[i:i + chunk]) for i in range(0, B * T, chunk)]
    logp, ent = (torch.cat(x).view(B, T) for x in zip(*outs))
    return logp, ent


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 0.2, clip_high: float = 0.28, beta: float = 0.0, logp_ref: torch.Tensor | None = None,
              num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """Token-level clipped surrogate. logp, logp_old, logp_ref, mask [B,T] (mask 1 = response token), adv [B].

    ratio = exp(clamp(logp - logp_old, -20, 20))
    L_t   = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))  (+ beta k3_t)
    k3_t  = exp(x) - x - 1, x = logp_ref - logp  (unbiased, >= 0, Schulman's "Approximating KL")
    loss  = sum_t L_t mask_t / num_tokens: token-mean over the batch (DAPO), num_tokens defaults to mask.sum();
            pass the whole batch's count when accumulating gradients over micro-batches."""
    mask = mask.float()
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    log_ratio = (logp - logp_old).clamp(-20, 20)
    ratio = log_ratio.exp()
    a = adv[:, None].float()
    unclipped, clipped = -a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    metrics = {}
    if beta:
        x = logp_ref - logp
        kl = x.exp() - x - 1
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).item()
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        is_clipped = (clipped > unclipped).float() * mask               # the clipped branch won: zero gradient
        metrics.update(
            clip_frac=(is_clipped.sum() / tokens).item(),
            clip_frac_high=(is_clipped * (ratio > 1 + clip_high)).sum().item() / tokens.item(),
            clip_frac_low=(is_clipped * (ratio < 1 - clip_low)).sum().item() / tokens.item(),
            approx_kl_old=(((ratio - 1 - log_ratio) * mask).sum() / tokens).item(),   # k3 of old vs new
            ratio_mean=((ratio * mask).sum() / tokens).item(),
        )
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Selective sample buffer (R1V2 sec. 3): when most groups are flat the batch carries little gradient. Keep recent
# samples whose advantage was large and re-inject them in place of samples from flat groups. Each buffered sample
# keeps the advantage it had in its own group; it is used once.

class SampleBuffer:
    def __init__(self, capacity: int = 64, max_age: int = 4, min_abs_adv: float = 1e-6):
        self.capacity, self.max_age, self.min_abs_adv = capacity, max_age, min_abs_adv
        self.items: list[tuple[int, float, object]] = []               # (step added, advantage, sample)

    def __len__(self):
        return len(self.items)

    def add(self, samples: list, advantages: list[float], step: int):
        """Keep samples with |A| > min_abs_adv; drop those older than max_age steps, then the smallest |A|."""
        self.items += [(step, float(a), s) for s, a in zip(samples, advantages) if abs(a) > self.min_abs_adv]
        self.items = [it for it in self.items if step - it[0] < self.max_age]
        self.items.sort(key=lambda it: (-abs(it[1]), -it[0]))          # largest |A| first, then newest
        del self.items[self.capacity:]

    def mix(self, samples: list, advantages: list[float], sample_is_flat: list[bool], flat_frac: float,
            threshold: float) -> tuple[list, list[float], int]:
        """If flat_frac > threshold, replace flat-group samples (A = 0) by buffered ones, best first.
        Returns (samples, advantages, number replaced); the inputs are not modified."""
        samples, advantages = list(samples), list(advantages)
        if flat_frac <= threshold or not self.items:
            return samples, advantages, 0
        slots = [i for i, f in enumerate(sample_is_flat) if f][:len(self.items)]
        for i, (_, a, s) in zip(slots, self.items):
            samples[i], advantages[i] = s, a
        del self.items[:len(slots)]
        return samples, advantages, len(slots)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "max_age": self.max_age, "min_abs_adv": self.min_abs_adv,
                "items": [list(it) for it in self.items]}

    def load_state_dict(self, state: dict):
        self.capacity, self.max_age, self.min_abs_adv = state["capacity"], state["max_age"], state["min_abs_adv"]
        self.items = [tuple(it) for it in state["items"]]
