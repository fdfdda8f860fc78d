"""Model core: architecture against the release's tensor list, KV-cache generation, checkpoint I/O and its errors.
(Logit parity with transformers' InternVL lives in test_parity.py.)"""
import json
import os
import shutil

import pytest
import torch

from checkpoint import INDEX, save_state_dict
from connector import pixel_shuffle
from model import R1VConfig, SkyworkR1V, count_params, positions
from sft import write_tiny_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
R1V3_CONFIG = os.path.join(HERE, "..", "tiny_configs", "r1v3-38b.json")


def r1v3_config():
    with open(R1V3_CONFIG) as f:
        return R1VConfig.from_dict(json.load(f))


# The 38B's tensors and their shapes, worked out from the release's config.json (1366 tensors; the parameter count
# rounds to the model card's 38B, see test_family.py): InternViT-6B (width 3200, 45 blocks, 448 px / 14 px patches + CLS = 1025 positions, qkv
# 3 x 3200, full-width q/k norms, layer scales), mlp1 over the pixel-shuffled 4 x 3200 = 12800 channels, and the
# Qwen2.5-32B decoder (5120 wide, 64 blocks, 8 KV heads x 128, SwiGLU 27648, vocabulary 151674, untied lm_head).
RELEASE_SHAPES = {
    "vision_model.embeddings.class_embedding": [1, 1, 3200],
    "vision_model.embeddings.patch_embedding.weight": [3200, 3, 14, 14],
    "vision_model.embeddings.position_embedding": [1, 1025, 3200],
    "vision_model.encoder.layers.44.attn.qkv.weight": [9600, 3200],
    "vision_model.encoder.layers.0.attn.q_norm.weight": [3200],
    "vision_model.encoder.layers.0.ls1": [3200],
    "mlp1.0.weight": [12800],
    "mlp1.1.weight": [5120, 12800],
    "mlp1.3.weight": [5120, 5120],
    "language_model.model.embed_tokens.weight": [151674, 5120],
    "language_model.model.layers.63.self_attn.k_proj.weight": [1024, 5120],
    "language_model.model.layers.0.self_attn.k_proj.bias": [1024],
    "language_model.model.layers.0.mlp.gate_proj.weight": [27648, 5120],
    "language_model.lm_head.weight": [151674, 5120],
}


def test_38b_tensor_names_shapes_and_count_match_the_release():
    with torch.device("meta"):
        m = SkyworkR1V(r1v3_config())
    ours = {k: list(p.shape) for k, p in m.named_parameters()}
    assert len(ours) == 1366
    assert {k: ours.get(k) for k in RELEASE_SHAPES} == RELEASE_SHAPES
    assert not any(k.startswith("vision_model.encoder.layers.45.") or k.startswith("language_model.model.layers.64.")
                   for k in ours)
    assert count_params(m.config) == {"vision_model": 5_536_496_000, "mlp1": 91_786_240,
                                      "language_model": 32_759_882_752, "total": 38_388_164_992}


def test_pixel_shuffle_matches_internvl_v2_code():
    def internvl(x, scale_factor=0.5):  # the release's view/permute sequence, ps_version v2
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        return x.permute(0, 2, 1, 3).contiguous()

    x = torch.randn(3, 32 * 32, 12)
    assert torch.equal(pixel_shuffle(x), internvl(x.view(3, 32, 32, 12)).reshape(3, 256, 48))


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return SkyworkR1V.from_pretrained(tiny_ckpt)


def image_prompt(m, n_tiles, text=5):
    ctx = torch.full((1, m.config.num_image_token * n_tiles), m.config.img_context_token_id)
    return torch.cat([torch.randint(0, 400, (1, text)), ctx, torch.randint(0, 400, (1, text))], dim=1)


def greedy_by_recompute(m, ids, n, pixel_values=None):
    for _ in range(n):
        ids = torch.cat([ids, m(ids, pixel_values=pixel_values)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("n_tiles", [0, 2])
def test_generate_with_kv_cache_equals_full_recompute(model, n_tiles):
    ids = image_prompt(model, n_tiles)
    pv = torch.randn(n_tiles, 3, 448, 448) if n_tiles else None
    out = model.generate(ids, pixel_values=pv, max_new_tokens=12, eos_token_id=-1)
    assert out.shape == (1, ids.shape[1] + 12)
    assert torch.equal(out, greedy_by_recompute(model, ids, 12, pv))


def test_left_padded_batch_equals_each_prompt_alone(model):
    a, b = torch.randint(0, 400, (1, 13)), torch.randint(0, 400, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    torch.testing.assert_close(model(batch, attention_mask=mask)[1, 7:], model(b)[0], rtol=1e-5, atol=1e-5)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=10, eos_token_id=-1)
    assert torch.equal(out[0], model.generate(a, max_new_tokens=10, eos_token_id=-1)[0])
    assert torch.equal(out[1, 7:], model.generate(b, max_new_tokens=10, eos_token_id=-1)[0])


def padded_pair():
    """Two prompts of 13 and 6 tokens, the second left-padded, and their attention mask."""
    a, b = torch.randint(0, 400, (1, 13)), torch.randint(0, 400, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    return batch, mask


def test_group_greedy_is_copies_of_each_prompt_alone(model):
    """num_return_sequences: one prefill, the KV cache copied into G rows; greedy rows b*G .. b*G+G-1 are G copies
    of prompt b's own greedy output (left padding included)."""
    batch, mask = padded_pair()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, eos_token_id=-1, num_return_sequences=3)
    assert out.shape == (6, 13 + 8)
    alone = model.generate(batch, attention_mask=mask, max_new_tokens=8, eos_token_id=-1)
    for b in range(2):
        for g in range(3):
            assert torch.equal(out[3 * b + g], alone[b])


def test_group_samples_differ_and_their_logprobs_equal_a_full_recompute(model, monkeypatch):
    """Each row of a group samples its own tokens from the shared prefill: the rows differ, and the log-prob of every
    sampled token under the logits generate used (cache copied G times) equals a fresh full forward (1e-5)."""
    import generate
    seen_logits, real_sample = [], generate.sample
    monkeypatch.setattr(generate, "sample", lambda logits, *a, **kw: seen_logits.append(logits) or real_sample(
        logits, *a, **kw))
    batch, mask = padded_pair()
    T, G, temp = 0.7, 4, 13
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, eos_token_id=-1, temperature=T,
                         num_return_sequences=G, generator=torch.Generator().manual_seed(0))
    new = out[:, temp:]                                                            # [B*G, 6]
    assert len({tuple(r) for r in new[:G].tolist()}) > 1 and len({tuple(r) for r in new[G:].tolist()}) > 1
    used = torch.stack(seen_logits, 1).div(T).log_softmax(-1)                     # [B*G, 6, V]
    used = used.gather(-1, new[..., None])[..., 0]
    rows_mask = mask.repeat_interleave(G, 0)
    full_mask = torch.cat([rows_mask, torch.ones_like(new)], 1)
    logits = model(out[:, :-1], attention_mask=full_mask[:, :-1])[:, temp - 1:]   # the states predicting new
    full = logits.float().div(T).log_softmax(-1).gather(-1, new[..., None])[..., 0]
    torch.testing.assert_close(used, full, rtol=1e-5, atol=1e-5)


def test_compiled_decode_step_gives_the_eager_tokens(model):
    """--compile: the fixed-shape step (position as a tensor, whole-cache mask) captured as ONE graph for every
    token of a left-padded group (a recompile per token would mean a shape still changes), same tokens as eager.
    aot_eager captures exactly what inductor compiles, without the minutes of code generation."""
    import torch._dynamo
    torch._dynamo.reset()
    batch, mask = padded_pair()
    kw = dict(attention_mask=mask, max_new_tokens=7, eos_token_id=-1, num_return_sequences=2, temperature=1.0)
    eager = model.generate(batch, generator=torch.Generator().manual_seed(1), **kw)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = model.generate(batch, generator=torch.Generator().manual_seed(1), compile="aot_eager", **kw)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 1


def sdpa_calls(monkeypatch) -> list:
    """Record every SDPA call's form: (query heads, key heads, mask given, enable_gqa)."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[1], k.shape[1], attn_mask is not None, kw.get("enable_gqa", False)))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_attention_takes_a_kernel_that_exists_for_masked_gqa(model, monkeypatch):
    """On CUDA flash takes no mask and the memory-efficient kernel no enable_gqa, so a mask with enable_gqa falls to
    the math kernel (fp32 [B,H,t,S] scores). model.attend never combines them: a left-padded prefill repeats K/V to
    the query heads; a one-token decode step groups the queries per KV head (no K/V copy)."""
    calls = sdpa_calls(monkeypatch)
    batch, mask = padded_pair()
    model.generate(batch, attention_mask=mask, max_new_tokens=3, eos_token_id=-1)
    cfg = model.config.llm
    assert calls and not any(masked and gqa for _, _, masked, gqa in calls)
    prefill, steps = calls[:cfg.num_hidden_layers], calls[cfg.num_hidden_layers:]
    assert {c[:3] for c in prefill} == {(cfg.num_attention_heads, cfg.num_attention_heads, True)}
    assert {c[:3] for c in steps} == {(cfg.num_key_value_heads, cfg.num_key_value_heads, True)}


@pytest.mark.parametrize("t, masked", [(1, False), (1, True), (5, False), (5, True)])
def test_attend_equals_gqa_attention(t, masked):
    """Each form of model.attend against SDPA's own enable_gqa (math on CPU), with a mask or causal."""
    from model import attend
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, t, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    mask = torch.rand(2, 1, t, 9, generator=g) < 0.7 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query sees a key
    causal = not masked and t > 1
    if causal:
        k, v = k[:, :, :t], v[:, :, :t]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, mask), want)


def test_right_padded_sft_batch_needs_no_mask(model, monkeypatch):
    """sft.py's batches are right-padded: causal attention already keeps padding out of every real token's context,
    so sft_loss passes no mask (the unmasked, flash kernel) and gets the masked loss."""
    from sft import sft_loss
    ids = torch.randint(0, 400, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    labels = torch.where(attn.bool(), ids, -100)
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels, "pixel_values": None}
    calls = sdpa_calls(monkeypatch)
    with torch.no_grad():
        loss, _ = sft_loss(model, batch, n_tokens=10.0)
        assert calls and not any(masked for _, _, masked, _ in calls)
        hidden = model(ids, attention_mask=attn, return_hidden=True)                 # the masked forward
        logp = model.language_model.lm_head(hidden[:, :-1]).float().log_softmax(-1)
        keep = labels[:, 1:] >= 0
        want = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0][keep].sum() / 10.0
    torch.testing.assert_close(loss, want)


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions(None, mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions(torch.zeros(2, 3, dtype=torch.long), None).tolist() == [[0, 1, 2]] * 2


def test_generate_stops_at_eos_and_pads_with_it(model):
    ids = torch.randint(0, 400, (1, 8))
    first = model.generate(ids, max_new_tokens=1)[0, -1].item()
    out = model.generate(ids, max_new_tokens=20, eos_token_id=first)
    assert out.shape[1] == ids.shape[1] + 1  # every row finished: stop early


def test_sampling_is_seeded_and_top_p_restricts(model):
    ids = torch.randint(0, 400, (4, 8))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = model.generate(ids, max_new_tokens=6, temperature=1.0, generator=g())
    assert torch.equal(a, model.generate(ids, max_new_tokens=6, temperature=1.0, generator=g()))
    tiny_p = model.generate(ids, max_new_tokens=6, temperature=1.0, top_p=1e-6, generator=g())
    assert torch.equal(tiny_p, model.generate(ids, max_new_tokens=6))  # a nucleus of one token is greedy


def test_bf16_forward_stays_close_to_fp32(tiny_ckpt, model):
    m16 = SkyworkR1V.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids, pv = image_prompt(model, 1), torch.randn(1, 3, 448, 448)
    ref, low = model(ids, pixel_values=pv), m16(ids, pixel_values=pv).float()
    rel = ((low - ref).abs().max() / ref.abs().max()).item()
    assert rel < 3e-2, rel  # measured ~1e-2: bf16 keeps 8 mantissa bits
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_image_token_count_must_match_tiles(model):
    ids = image_prompt(model, 2)
    with pytest.raises(ValueError, match=r"512 <IMG_CONTEXT> tokens but 1 tiles .* need 256"):
        model(ids, pixel_values=torch.randn(1, 3, 448, 448))
    with pytest.raises(ValueError, match="0 tiles"):
        model(ids)


def test_save_reload_is_bit_identical(tiny_ckpt, model, tmp_path):
    out = str(tmp_path / "saved")
    model.save_pretrained(out, max_shard_bytes=100_000)
    with open(os.path.join(out, INDEX)) as f:
        index = json.load(f)
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(os.path.isfile(os.path.join(out, s)) for s in shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert set(index["weight_map"]) == set(model.state_dict())
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "config.json"):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(tiny_ckpt, name), "rb") as b:
            assert a.read() == b.read(), name
    again = SkyworkR1V.from_pretrained(out)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


# ---------------------------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def broken(tiny_ckpt, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, d)
    return d


def index_of(d):
    with open(d / INDEX) as f:
        return json.load(f)


def test_missing_shard_is_named(broken):
    shard = sorted(set(index_of(broken)["weight_map"].values()))[1]
    os.remove(broken / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        SkyworkR1V.from_pretrained(str(broken))


def test_truncated_shard_is_named(broken):
    shard = sorted(set(index_of(broken)["weight_map"].values()))[0]
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=shard):
        SkyworkR1V.from_pretrained(str(broken))


def test_shape_mismatch_names_tensor_and_both_shapes(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["llm_config"]["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor language_model\.model\.layers\.\d\.mlp\.\w+_proj\.weight has shape "
                                         r"\[\d+, \d+\], the config needs \[\d+, \d+\]"):
        SkyworkR1V.from_pretrained(str(broken))


def test_missing_and_unexpected_keys_are_listed(broken):
    index = index_of(broken)
    wm = index["weight_map"]
    wm["vision_model.extra.weight"] = wm.pop("mlp1.3.bias")
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing keys \['mlp1\.3\.bias'\].*unexpected keys \['vision_model\.extra"):
        SkyworkR1V.from_pretrained(str(broken))


@pytest.mark.parametrize("section,field", [("llm_config", "vocab_size"), ("vision_config", "hidden_size"),
                                           (None, "vision_config")])
def test_config_missing_field_is_named(broken, section, field):
    cfg = json.loads((broken / "config.json").read_text())
    del (cfg[section] if section else cfg)[field]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"config.json: {section or ''}.*{field}"):
        SkyworkR1V.from_pretrained(str(broken))


def test_single_file_checkpoint_loads(model, tmp_path):
    out = tmp_path / "single"
    save_state_dict(model.state_dict().items(), json.load(open(os.path.join(model.ckpt_dir, "config.json"))),
                    str(out), src_dir=model.ckpt_dir)
    (out / "model-00001-of-00001.safetensors").rename(out / "model.safetensors")
    os.remove(out / INDEX)
    again = SkyworkR1V.from_pretrained(str(out))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a, b = write_tiny_checkpoint(str(tmp_path / "a"), seed=1), write_tiny_checkpoint(str(tmp_path / "b"), seed=1)
    ma, mb = SkyworkR1V.from_pretrained(a), SkyworkR1V.from_pretrained(b)
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
