"""Rollouts: responses of the current policy to batches of prompts, and the held-out accuracy built on them.

GRPO (grpo.py) samples a group of G responses per prompt; sft.py and grpo.py answer held-out questions greedily.
Both go through `generate_responses`: prompts are left-padded into batches of at most `batch_size` sequences,
generated together, and cut at their first stop token. Under FSDP every rank must make the same number of
generate calls (each forward all-gathers weights), so callers give every rank equally many prompts.
"""
import torch

from data import cut_response, encode_prompt, left_pad
from model import SkyworkR1V
from parallel import Context, all_reduce_sum, autocast
from rewards import accuracy_reward, format_reward


def cat_pixels(pixels: list):
    """Tiles of several prompts, in prompt order (the order SkyworkR1V.embed fills <IMG_CONTEXT> tokens)."""
    pixels = [p for p in pixels if p is not None]
    return torch.cat(pixels) if pixels else None


@torch.no_grad()
def generate_responses(m: SkyworkR1V, prompts: list, ctx: Context, *, pad_id: int, stop_ids, group_size: int = 1,
                       batch_size: int = 8, generator=None, **sampling) -> list:
    """prompts: [(ids [P] list, pixels [tiles,3,H,W] or None)] -> for each prompt, group_size responses, each a
    list of ids up to and including its first stop token. The first stop id is the eos generate pads with.
    `sampling`: max_new_tokens, temperature, top_p, repetition_penalty (SkyworkR1V.generate)."""
    rows = [p for p in prompts for _ in range(group_size)]
    out = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        ids, mask = left_pad([p[0] for p in chunk], pad_id)
        pix = cat_pixels([p[1] for p in chunk])
        with autocast(ctx):
            seq = m.generate(ids.to(ctx.device), None if pix is None else pix.to(ctx.device), mask.to(ctx.device),
                             eos_token_id=stop_ids[0], generator=generator, **sampling)
        out += [cut_response(row, stop_ids) for row in seq[:, ids.shape[1]:].tolist()]
    return [out[i:i + group_size] for i in range(0, len(out), group_size)]


@torch.no_grad()
def heldout_eval(m: SkyworkR1V, tok, problems: list, ctx: Context, *, max_new_tokens: int, batch_size: int = 8,
                 max_tiles: int = 0) -> dict:
    """Greedy thinking-mode answers to held-out problems {"question", "images", ["answer"]} -> format rate
    (rewards.format_reward), accuracy (rewards.accuracy_reward, over problems with an answer), one sample text.
    Each rank answers an equal share, so up to world-1 problems at the end are left out."""
    mine = problems[:len(problems) - len(problems) % ctx.world][ctx.rank::ctx.world]
    prompts = [encode_prompt(tok, m.config, p["question"], p.get("images", ()), max_tiles) for p in mine]
    responses = generate_responses(m, prompts, ctx, pad_id=tok.pad_id, stop_ids=[tok.eos_id], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, temperature=0.0)
    texts = [tok.decode(r[0], skip_special=True) for r in responses]
    answered = [(t, str(p["answer"])) for t, p in zip(texts, mine) if p.get("answer") is not None]
    n, fmt, right, n_ans = all_reduce_sum([len(mine), sum(map(format_reward, texts)),
                                          sum(accuracy_reward(t, a) for t, a in answered), len(answered)])
    return {"samples": n, "format_rate": fmt / max(n, 1), "accuracy": right / n_ans if n_ans else None,
            "sample": texts[0] if texts else ""}
