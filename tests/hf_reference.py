"""transformers' native InternVL as the reference implementation: the same weights as ours, in HF's layout.

transformers is a dependency of the tests and of bench.py only (requirements-test.txt); the project's model,
training and inference code never imports it. tests/test_parity.py compares logits against this, bench.py speed.
"""
import re

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, logging

from model import R1VConfig

__version__ = __import__("transformers").__version__
logging.set_verbosity_error()
logging.disable_progress_bar()


HF_TO_RELEASE = [  # HF's convert_internvl_weights_to_hf.py key mapping, read backwards
    (r"^model\.vision_tower\.", "vision_model."),
    (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"\.embeddings\.cls_token$", ".embeddings.class_embedding"),
    (r"\.embeddings\.position_embeddings$", ".embeddings.position_embedding"),
    (r"\.embeddings\.patch_embeddings\.projection\.", ".embeddings.patch_embedding."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]


TIED = {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}  # tie_word_embeddings


def release_to_hf(release_sd: dict, hf_keys) -> dict:
    """Release state dict -> HF InternVL keys. HF splits the release's fused `attn.qkv` (rows q, k, v) in three.
    A tied checkpoint stored once has no lm_head.weight: HF's (tied) lm_head gets the embedding."""
    out, used = {}, set()
    for key in hf_keys:
        name = key
        for pattern, repl in HF_TO_RELEASE:
            name = re.sub(pattern, repl, name)
        qkv = re.search(r"\.attn\.([qkv])_proj\.", name)
        if qkv:
            name = name.replace(qkv.group(0), ".attn.qkv.")
        if name in TIED and name not in release_sd:
            name = TIED[name]
        if name not in release_sd:
            raise ValueError(f"HF parameter {key} maps to {name}, which the release state dict does not have")
        out[key] = release_sd[name].chunk(3)["qkv".index(qkv.group(1))] if qkv else release_sd[name]
        used.add(name)
    if used != set(release_sd):
        raise ValueError(f"release tensors with no HF counterpart: {sorted(set(release_sd) - used)[:5]}")
    return out


def hf_config(c: R1VConfig):
    """Our config as an InternVLConfig. use_mean_pooling=True is what makes HF's final vision norm an Identity (the
    release has no final norm). HF ties lm_head by its top-level tie_word_embeddings (default True); the release's
    top-level flag belongs to the InternVL wrapper (always false) and the decoder's llm_config flag decides: that one
    is passed at both levels."""
    v, t = c.vision, c.llm
    vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                  intermediate_size=v.intermediate_size, num_attention_heads=v.num_attention_heads,
                  image_size=v.image_size, patch_size=v.patch_size,
                  layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, norm_type=v.norm_type,
                  use_qk_norm=v.qk_normalization, attention_bias=v.qkv_bias, use_mean_pooling=True)
    text = dict(model_type="qwen2", hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                intermediate_size=t.intermediate_size, vocab_size=t.vocab_size, rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=c.img_context_token_id,
                          image_seq_length=c.num_image_token, downsample_ratio=c.downsample_ratio,
                          vision_feature_layer=c.select_layer, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", tie_word_embeddings=t.tie_word_embeddings)


def hf_model(config: R1VConfig, release_sd: dict, device="cpu", dtype=torch.float32):
    """Our weights in HF's InternVLForConditionalGeneration (SDPA attention, eos off: generate makes every token)."""
    theirs = InternVLForConditionalGeneration._from_config(hf_config(config), attn_implementation="sdpa")
    theirs = theirs.to(device=device, dtype=dtype).eval()
    theirs.load_state_dict(release_to_hf(release_sd, theirs.state_dict().keys()), strict=True)
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    return theirs


def load_hf(hf_dir: str, device="cpu", dtype=torch.float32):
    """HF's own loading of an HF-format save."""
    device_map = None if device == "cpu" else device
    return InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype, device_map=device_map)
