"""Rollouts: responses of the current policy to batches of prompts, and the held-out accuracy built on them.

GRPO (grpo.py) samples a group of G responses per prompt; sft.py and grpo.py answer held-out questions greedily.
Both go through `generate_responses`: prompts are left-padded into batches of at most `batch_size` sequences,
generated together, and cut at their first stop token. Callers give every rank equally many prompts (the lockstep
rule, parallel.py).
"""
from typing import NamedTuple

import torch

from data import cut_response, encode_prompt, left_pad
from model import SkyworkR1V
from parallel import Context, all_gather_objects, all_reduce_sum, autocast
from rewards import accuracy_reward, format_reward


class Engine(NamedTuple):
    """What answers prompts: the model, its tokenizer, the context, and tp.py's tensor-parallel copy of the decoder
    (None on one process: the model's own decoder answers)."""
    model: SkyworkR1V
    tok: object
    ctx: Context
    decoder: object = None


def cat_pixels(pixels: list):
    """Tiles of several prompts, in prompt order (the order SkyworkR1V.embed fills <IMG_CONTEXT> tokens)."""
    pixels = [p for p in pixels if p is not None]
    return torch.cat(pixels) if pixels else None


@torch.no_grad()
def vit_once(m: SkyworkR1V, pixels: list, ctx: Context) -> list:
    """Tiles of several prompts ([tiles,3,H,W] or None each) -> the ViT's output for each ([tiles,1024,D_vit], zero
    tiles for a text-only prompt), from one ViT call over all of them. While the ViT is frozen this is all the
    vision work of a GRPO step: the rollout and every log-prob pass reuse it (issue: once per prompt, not once per
    sample and pass). One call per rank whatever its prompts hold: under FSDP the ViT's forward is a collective."""
    counts = [0 if p is None else p.shape[0] for p in pixels]
    tiles = cat_pixels(pixels)
    if tiles is None:
        size = m.config.force_image_size
        tiles = torch.zeros(0, 3, size, size)
    with autocast(ctx):
        return list(m.vit_features(tiles.to(ctx.device)).split(counts))


@torch.no_grad()
def generate_responses(m: SkyworkR1V, prompts: list, ctx: Context, *, pad_id: int, stop_ids, group_size: int = 1,
                       batch_size: int = 8, generator=None, vit_features=None, decoder=None, compile=False,
                       **sampling) -> list:
    """prompts: [(ids [P], pixels [tiles,3,H,W] or None)] -> for each prompt, group_size responses, each a list of
    ids up to and including its first stop token (the first stop id is the eos generate pads with).

    Each generate call takes batch_size // group_size prompts (at least one): every prompt is prefilled once and
    its group_size samples continue from copies of its KV cache (generate.decode). vit_features (one tensor per
    prompt, vit_once) replace the pixels; decoder is tp.py's tensor-parallel copy; compile: a compiled fixed-shape
    decode step. `sampling`: max_new_tokens, temperature, top_p, repetition_penalty (SkyworkR1V.generate)."""
    per_call, out = max(1, batch_size // group_size), []
    for b in range(0, len(prompts), per_call):
        chunk = prompts[b:b + per_call]
        ids, mask = left_pad([p[0] for p in chunk], pad_id)
        # with features, always a tensor (maybe of zero tiles): every rank takes the same path (parallel.py)
        feats = None if vit_features is None else torch.cat(vit_features[b:b + per_call]).to(ctx.device)
        pix = None if feats is not None else cat_pixels([p[1] for p in chunk])
        with autocast(ctx):
            seq = m.generate(ids.to(ctx.device), None if pix is None else pix.to(ctx.device), mask.to(ctx.device),
                             eos_token_id=stop_ids[0], generator=generator, num_return_sequences=group_size,
                             vit_features=feats, decoder=decoder, compile=compile, **sampling)
        out += [cut_response(row, stop_ids) for row in seq[:, ids.shape[1]:].tolist()]
    return [out[i:i + group_size] for i in range(0, len(out), group_size)]


@torch.no_grad()
def heldout_accuracy(m: SkyworkR1V, tok, problems: list, ctx: Context, *, max_new_tokens: int, batch_size: int = 8,
                 max_tiles: int = 0, decoder=None, compile=False) -> dict:
    """Greedy thinking-mode answers to held-out problems {"question", "images", ["answer"]} -> format rate
    (rewards.format_reward), accuracy (rewards.accuracy_reward, over problems with an answer), one sample text, and
    every answer as text, in the problems' order, on every rank (logs.MetricsLog.write_rows saves them). Each rank
    answers an equal share, so up to world-1 problems at the end are left out."""
    mine = problems[:len(problems) - len(problems) % ctx.world][ctx.rank::ctx.world]
    prompts = [encode_prompt(tok, m.config, p["question"], p.get("images", ()), max_tiles) for p in mine]
    responses = generate_responses(m, prompts, ctx, pad_id=tok.pad_id, stop_ids=[tok.eos_id], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, temperature=0.0, decoder=decoder, compile=compile)
    texts = [tok.decode(r[0], skip_special=True) for r in responses]
    answered = [(t, str(p["answer"])) for t, p in zip(texts, mine) if p.get("answer") is not None]
    n, fmt, right, n_ans = all_reduce_sum([len(mine), sum(map(format_reward, texts)),
                                          sum(accuracy_reward(t, a) for t, a in answered), len(answered)])
    answers = [{"question": p["question"], "gold": p.get("answer"), "response": t,
                "correct": None if p.get("answer") is None else accuracy_reward(t, str(p["answer"]))}
               for p, t in zip(mine, texts)]
    shares = all_gather_objects(answers)  # problem i was rank i % W's (i // W)-th
    return {"samples": n, "format_rate": fmt / max(n, 1), "accuracy": right / n_ans if n_ans else None,
            "sample": texts[0] if texts else "",
            "answers": [shares[i % ctx.world][i // ctx.world] for i in range(int(n))]}
