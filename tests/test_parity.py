"""Parity with transformers' native InternVL (`InternVLForConditionalGeneration`, used here as a reference only).

A tiny InternVL gets random weights in HF's layout; they are renamed to the release's keys, written as a
release-format checkpoint directory and loaded with `SkyworkR1V.from_pretrained`. Both models must then give the same
fp32 logits. Two layouts of the family, each a fixture parameter:
  * "6b": InternViT-6B blocks (RMSNorm + QK-norm, no qkv bias) and a separate lm_head: R1V3, InternVL3-38B/78B;
  * "300m-tied": InternViT-300M blocks (LayerNorm, qkv bias, no QK-norm) and lm_head tied to the token embedding,
    the InternVL3-1B/2B vision layout with a Qwen2.5-0.5B/1.5B-style tied head. HF's state dict lists the tied
    matrix under both names, so this checkpoint also stores lm_head.weight as a copy (accepted, and checked equal).

HF's port re-keys the release (see its convert_internvl_weights_to_hf.py); what this file has to undo or pin:
  * q, k, v are three Linears in HF, one `attn.qkv` in the release (rows ordered q, k, v) -> concatenated;
  * HF's `use_mean_pooling=True` is what makes its final vision norm an nn.Identity: the release has no final norm;
  * HF's QK-norm eps is hard-coded 1e-6 while the release uses vision `layer_norm_eps` (1e-6 in the release);
  * HF's projector LayerNorm and the release's mlp1.0 both keep nn.LayerNorm's default eps 1e-5 (not 1e-6);
  * HF always does the v2 pixel shuffle (ps_version "v1" has no HF counterpart);
  * HF ties lm_head to embed_tokens by its top-level tie_word_embeddings (default True); the release ties by
    llm_config.tie_word_embeddings -> hf_reference.hf_config passes the decoder's flag at both levels.
Weights are scaled so the test can see mistakes: O(1) attention logits (a near-uniform attention hides RoPE and QK
bugs) and small residual streams at the first norms (var ~1e-4: an eps of 1e-5 instead of 1e-6, a v1 pixel shuffle,
per-head QK-norm, a wrong RoPE theta or a stale KV-cache column each move the logits by >= 7e-3, 70x the tolerance).
"""
import json
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import InternVLForConditionalGeneration  # noqa: E402

from checkpoint import save_state_dict  # noqa: E402
from data import Tokenizer, train_tokenizer  # noqa: E402
from hf_reference import HF_TO_RELEASE, hf_config  # noqa: E402  (key map: HF conversion script, backwards)
from model import R1VConfig, SkyworkR1V  # noqa: E402

VOCAB = 512
TOKENS_PER_TILE = 256  # (448 / 14)^2 * 0.5^2
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=448,
              patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu")
LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, rms_norm_eps=1e-6,
           max_position_embeddings=4096, rope_theta=1e6)
MAX_REL_ERR = 1e-4
LAYOUTS = {  # vision blocks and output layer of the two InternVL shapes (release config.json field values)
    "6b": (dict(norm_type="rms_norm", qk_normalization=True, qkv_bias=False), False),
    "300m-tied": (dict(norm_type="layer_norm", qk_normalization=False, qkv_bias=True), True),
}


# ----------------------------------------------------------------------------------------------------------------
# HF reference model and HF -> release conversion

@torch.no_grad()
def randomize_(model, seed=0):
    """Non-trivial weights: unit-gain linears, norm gains 1 +- 0.1, biases ~0.1, small vision embeddings and layer
    scales (ViT residual stream ~1e-2) and small token embeddings (first decoder norm sees var ~1e-4)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        elif re.search(r"lambda_\d$", name):  # layer scale
            p.copy_(0.01 * (1 + 0.1 * noise))
        elif name.endswith(("cls_token", "position_embeddings", "embed_tokens.weight")):
            p.copy_(0.01 * noise)
        elif "patch_embeddings" in name:
            p.copy_(0.01 * noise / (p[0].numel() ** 0.5 if p.dim() > 1 else 1))
        elif p.dim() == 1:  # biases
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / p[0].numel() ** 0.5)  # std 1/sqrt(fan_in): activations stay O(1)
    return model




def hf_to_release(hf_sd):
    """HF InternVL state dict -> release (InternVL chat / Skywork-R1V) keys; q, k, v fused into attn.qkv."""
    out = {}
    for key, t in hf_sd.items():
        for pattern, repl in HF_TO_RELEASE:
            key = re.sub(pattern, repl, key)
        out[key] = t.detach().clone().contiguous()
    for key in [k for k in out if ".attn.q_proj." in k]:
        parts = [out.pop(key.replace(".q_proj.", f".{n}_proj.")) for n in "qkv"]
        out[key.replace(".q_proj.", ".qkv.")] = torch.cat(parts, dim=0)
    return out


def release_config(layout, num_kv_heads, bos_id, eos_id):
    """config.json in the release's format (InternVL chat config with vision_config / llm_config)."""
    blocks, tied = LAYOUTS[layout]
    llm = dict(LLM, architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=num_kv_heads,
               vocab_size=VOCAB, hidden_act="silu", tie_word_embeddings=tied, bos_token_id=bos_id,
               eos_token_id=eos_id, use_sliding_window=False, sliding_window=4096, max_window_layers=2,
               attention_dropout=0.0, rope_scaling=None, torch_dtype="float32")
    vision = dict(VISION, **blocks, architectures=["InternVisionModel"], model_type="intern_vit_6b",
                  num_channels=3, initializer_factor=0.1, initializer_range=1e-10, attention_dropout=0.0, dropout=0.0,
                  drop_path_rate=0.0, use_flash_attn=False, torch_dtype="float32")
    return dict(architectures=["SkyworkR1VChatModel"], model_type="skywork_chat", vision_config=vision,
                llm_config=llm, select_layer=-1, downsample_ratio=0.5, ps_version="v2", force_image_size=448,
                template="internvl2_5", dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1,
                max_dynamic_patch=12, use_backbone_lora=0, use_llm_lora=0, tie_word_embeddings=False,
                torch_dtype="float32")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: one (HF model, our model) pair per layout and GQA ratio (4 query heads over 2 KV heads and over 1)

@pytest.fixture(scope="module", params=[("6b", 2), ("6b", 1), ("300m-tied", 2)], ids=["6b-kv2", "6b-kv1", "300m-tied"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    layout, kv = request.param
    tmp = tmp_path_factory.mktemp(f"parity_{layout}_kv{kv}")
    tok = Tokenizer.from_dir(train_tokenizer(str(tmp / "tok"), vocab_size=VOCAB))
    ids = {t: tok.token_id(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>", "<|im_start|>", "<|endoftext|>")}
    ids["eos"] = tok.eos_id
    assert tok.vocab_size == VOCAB
    release = release_config(layout, kv, ids["<|endoftext|>"], ids["eos"])
    config = R1VConfig.from_dict(release)
    config.img_context_token_id = ids["<IMG_CONTEXT>"]
    hf = InternVLForConditionalGeneration._from_config(hf_config(config), attn_implementation="eager")
    hf = randomize_(hf).eval()
    tied = config.llm.tie_word_embeddings
    assert (hf.get_output_embeddings().weight is hf.get_input_embeddings().weight) == tied
    sd = hf_to_release(hf.state_dict())
    ckpt = str(tmp / "ckpt")
    save_state_dict(sd.items(), release, ckpt, max_shard_bytes=400_000, src_dir=str(tmp / "tok"))
    with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1  # sharded, as the release
    assert "language_model.lm_head.weight" in weight_map  # tied: stored as a copy
    ours = SkyworkR1V.from_pretrained(ckpt, dtype=torch.float32, device="cpu").eval()
    lm = ours.language_model
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    return hf, ours, sd, ids


def prompt(ids, tiles_per_image, seed=0, n_text=7):
    """Random text ids around each `<img><IMG_CONTEXT>*256*tiles</img>` block: [1, T]."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731 (byte tokens, no specials)
    seq = [ids["<|im_start|>"]] + words(n_text)
    for tiles in tiles_per_image:
        seq += [ids["<img>"]] + [ids["<IMG_CONTEXT>"]] * (TOKENS_PER_TILE * tiles) + [ids["</img>"]] + words(n_text)
    return torch.tensor([seq])


def pixels(n_tiles, seed=0):
    return torch.randn(n_tiles, 3, 448, 448, generator=torch.Generator().manual_seed(seed))  # like normalised RGB


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# Tests

def test_weights_loaded_exactly(pair):
    hf, ours, sd, ids = pair
    got = ours.state_dict()
    assert set(sd) <= set(got), f"keys not loaded: {sorted(set(sd) - set(got))[:5]}"
    for k, t in sd.items():
        assert torch.equal(got[k], t), f"{k} differs after from_pretrained"
    assert ours.config.img_context_token_id == ids["<IMG_CONTEXT>"]
    assert ours.config.num_image_token == TOKENS_PER_TILE


@pytest.mark.parametrize("tiles_per_image", [[], [1], [3], [2, 1]], ids=["text", "1img1tile", "1img3tiles", "2imgs"])
@torch.no_grad()
def test_logits_match_hf(pair, tiles_per_image):
    hf, ours, _, ids = pair
    input_ids = prompt(ids, tiles_per_image)
    pv = pixels(sum(tiles_per_image)) if tiles_per_image else None
    want = hf(input_ids=input_ids, pixel_values=pv).logits
    got = ours(input_ids, pixel_values=pv)
    assert got.shape == want.shape
    err = rel_err(got, want)
    assert err < MAX_REL_ERR, f"{tiles_per_image}: rel err {err:.2e}"
    if tiles_per_image == [1]:  # the image must matter, or the comparisons prove nothing about the vision path
        assert rel_err(hf(input_ids=input_ids, pixel_values=pixels(1, seed=1)).logits, want) > 1e-2


def left_padded_batch(ids):
    """Two one-tile prompts of different lengths, the shorter left-padded: (input_ids [2,T], mask [2,T], rows)."""
    rows = [prompt(ids, [1], seed=1, n_text=3), prompt(ids, [1], seed=2)]
    pad = rows[1].shape[1] - rows[0].shape[1]
    input_ids = torch.cat([torch.cat([torch.full((1, pad), ids["<|endoftext|>"]), rows[0]], 1), rows[1]])
    mask = torch.ones_like(input_ids)
    mask[0, :pad] = 0
    return input_ids, mask, rows


@torch.no_grad()
def test_left_padded_batch_matches_hf(pair):
    """Positions must come from the attention mask, and pads must not be attended: row 0 equals HF unpadded."""
    hf, ours, _, ids = pair
    (input_ids, mask, rows), pv = left_padded_batch(ids), pixels(2)
    got = ours(input_ids, pixel_values=pv, attention_mask=mask)
    for i, row in enumerate(rows):
        want = hf(input_ids=row, pixel_values=pv[i:i + 1]).logits[0]
        err = rel_err(got[i, -row.shape[1]:], want)
        assert err < MAX_REL_ERR, f"row {i}: rel err {err:.2e}"


@torch.no_grad()
def test_greedy_generate_matches_recompute_and_hf(pair):
    """KV-cached greedy decoding of a left-padded batch: every step's logits equal a full recomputation (one
    forward over the final sequence, no cache) and HF's cached `generate` per row; tokens are their argmax.
    Logits, not only tokens: a random tiny model often repeats one token, which would hide a wrong cache."""
    hf, ours, _, ids = pair
    (input_ids, mask, rows), pv = left_padded_batch(ids), pixels(2, seed=3)
    t = input_ids.shape[1]
    steps = []  # generate's per-step logits [B,V], caught on their way out of lm_head
    hook = ours.language_model.lm_head.register_forward_hook(lambda mod, inp, out: steps.append(out.float()))
    try:
        out = ours.generate(input_ids, pixel_values=pv, attention_mask=mask, max_new_tokens=6, temperature=0.0)
    finally:
        hook.remove()
    cached, n_new = torch.stack(steps, 1), out.shape[1] - t  # [B,n_new,V]
    assert cached.shape[1] == n_new
    full_mask = torch.cat([mask, mask.new_ones(2, n_new)], 1)
    full = ours(out, pixel_values=pv, attention_mask=full_mask)[:, t - 1:-1]  # logits that predicted each new token
    assert rel_err(cached, full) < MAX_REL_ERR, f"cached decoding != recomputation: {rel_err(cached, full):.2e}"
    for i, row in enumerate(rows):
        new = out[i, t:].tolist()
        n = new.index(ids["eos"]) + 1 if ids["eos"] in new else n_new  # ours pads with eos after it, HF stops
        assert new[:n] == full[i, :n].argmax(-1).tolist(), f"row {i}: not greedy"
        ref = hf.generate(input_ids=row, pixel_values=pv[i:i + 1], max_new_tokens=n_new, do_sample=False,
                          pad_token_id=ids["<|endoftext|>"], output_logits=True, return_dict_in_generate=True)
        assert new[:n] == ref.sequences[0, row.shape[1]:].tolist(), f"row {i}: ours != HF generate"
        err = rel_err(cached[i, :n], torch.cat(ref.logits[:n]))
        assert err < MAX_REL_ERR, f"row {i}: step logits vs HF generate rel err {err:.2e}"
