"""Tensor-parallel generation (tp.py) on 2 gloo ranks must behave exactly like one process.

One spawn of 2 ranks runs every check on two configs: the tiny one (everything divides by 2) and one whose
vocabulary (641 rows) does not, so the last vocabulary slice is padded."""
import json
import os

import pytest
import torch
import torch.distributed as dist

from data import left_pad
from model import LLMConfig, SkyworkR1V, make_mask, positions
from optim import make_optimizer
from parallel import load, setup
from ranks import WORLD, spawn
from sft import write_tiny_checkpoint
from test_fsdp import batch, loss_fn
from tp import TPDecoder, gather_rows, make_decoder, refresh, shared_generator

HERE = os.path.dirname(os.path.abspath(__file__))


def odd_vocab_config() -> dict:
    with open(os.path.join(HERE, "..", "tiny_configs", "tiny.json")) as f:
        cfg = json.load(f)
    cfg["llm_config"]["vocab_size"] = 641  # 641 = 2 x 320 + 1: rank 1's slice has a padding row
    return cfg


def prompts(model, rank: int):
    """Rank 0: one text prompt. Rank 1: two prompts of other lengths, the second with an image (left-padded)."""
    k, ctx_id = model.config.num_image_token, model.config.img_context_token_id
    g = torch.Generator().manual_seed(11)
    text = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (7, 5, 9)]
    text[2][2:2] = [ctx_id] * k
    rows = [text[0]] if rank == 0 else text[1:]
    ids, mask = left_pad(rows, 0)
    pixels = torch.randn(1, 3, 448, 448, generator=g) if rank == 1 else None
    return ids, mask, pixels


def expected_slice(name: str, full: torch.Tensor, rank: int, rows: int, world: int = WORLD) -> torch.Tensor:
    """The tensor-parallel slice of a full parameter, computed from its name alone (independent of tp_slice)."""
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return full.chunk(world, dim=1)[rank]
    if "norm" in name:
        return full
    if "embed_tokens" in name or "lm_head" in name:
        part = full[rank * rows:(rank + 1) * rows]
        return torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
    return full.chunk(world, dim=0)[rank]


def worker(rank, ckpts):
    ctx = setup(dtype="fp32")
    for ckpt in ckpts:
        check(ctx, ckpt)


def check(ctx, ckpt):
    ref = SkyworkR1V.from_pretrained(ckpt)
    sharded = load(ckpt, ctx, train="all")
    decoder = make_decoder(sharded, torch.float32)
    ids, mask, pix = prompts(ref, ctx.rank)

    # 1. greedy tokens equal one process's, with rows finishing at different steps (rank 0's row stops at once)
    first = ref.generate(*prompts(ref, 0)[:1], max_new_tokens=1)[0, -1].item()
    want = ref.generate(ids, pix, mask, max_new_tokens=10, eos_token_id=first)
    got = sharded.generate(ids, pix, mask, max_new_tokens=10, eos_token_id=first, decoder=decoder)
    assert torch.equal(got, want), (ctx.rank, got, want)
    # and G samples per prompt through the same path: G greedy copies
    got = sharded.generate(ids, pix, mask, max_new_tokens=6, decoder=decoder, num_return_sequences=3)
    assert torch.equal(got, ref.generate(ids, pix, mask, max_new_tokens=6).repeat_interleave(3, 0))

    # 2. logits of the prefill and of one decode step equal one process's within 1e-5 relative (fp32)
    with torch.no_grad():
        x = ref.embed(ids, pix)
        (x, all_ids, all_mask), _ = gather_rows([x, ids, mask])
        pos, t = positions(all_ids, all_mask), all_ids.shape[1]
        m = make_mask(all_mask, t, 0)
        from model import KVCache
        caches = [KVCache(lm.model.config, x.shape[0], t + 1) for lm in (decoder, ref.language_model)]
        h = [lm.model(x, pos, m, c, 0)[:, -1] for lm, c in zip((decoder, ref.language_model), caches)]
        logits = [decoder.lm_head(h[0]), ref.language_model.lm_head(h[1])]
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5 * logits[1].abs().max().item())
        tok = logits[1].argmax(-1)
        real = torch.cat([all_mask, all_mask.new_ones(all_mask.shape[0], 1)], 1)
        step = [lm.lm_head(lm.decode_step(tok, pos[:, -1:] + 1, c, t, real)[:, -1])
                for lm, c in zip((decoder, ref.language_model), caches)]
        torch.testing.assert_close(step[0], step[1], rtol=1e-5, atol=1e-5 * step[1].abs().max().item())

    # 3. after an optimizer step, the refreshed copy holds exactly the updated parameters' slices
    opt = make_optimizer(sharded, lr=1e-2)
    bids, bpv = batch(ref)
    loss_fn(sharded, bids[ctx.rank:ctx.rank + 1], bpv[ctx.rank:ctx.rank + 1]).backward()
    opt.step()
    assert refresh(decoder, sharded) >= 0
    tp = dict(decoder.named_parameters())
    rows = decoder.model.embed_tokens.weight.shape[0]
    for name, p in sharded.language_model.named_parameters():
        full = p.full_tensor()
        assert torch.equal(tp[name], expected_slice(name, full, ctx.rank, rows)), name

    # 4. sampling: every rank draws from one seed, whatever generator state each rank brings
    gens = [shared_generator(torch.Generator().manual_seed(100 + 10 * i + ctx.rank), "cpu") for i in range(2)]
    draws = torch.stack([torch.rand(4, generator=g) for g in gens])
    everyone = [torch.empty_like(draws) for _ in range(WORLD)]
    dist.all_gather(everyone, draws)
    assert torch.equal(everyone[0], everyone[1]) and not torch.equal(draws[0], draws[1])


def test_tp_generation_matches_one_process(tiny_ckpt, tmp_path):
    odd = write_tiny_checkpoint(str(tmp_path / "odd"), odd_vocab_config())
    spawn(worker, [tiny_ckpt, odd])


def test_world_size_must_divide_heads():
    cfg = LLMConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                    intermediate_size=128, vocab_size=64)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(1\) divisible by 2"):
        TPDecoder(cfg, 0, 2)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) divisible by 3"):
        TPDecoder(cfg, 0, 3)
