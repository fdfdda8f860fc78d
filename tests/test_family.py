"""The R1V3 recipe on the rest of the Qwen2-based InternVL-chat family (InternVL3-1B ... 78B, Skywork-R1V/R1V2/R1V3).

What differs from the 38B, and is checked here:
  * sizes: tiny_configs/internvl3-*.json hold the real shapes; their parameter counts must give the published sizes;
  * InternViT-300M (1B..14B): LayerNorm, qkv bias, no QK-norm (logit parity with HF: test_parity.py, "300m-tied");
  * tied input/output embeddings (tie_word_embeddings, as Qwen2.5-0.5B/1.5B): a checkpoint may store lm_head.weight
    as a copy or leave it out; a copy that differs is refused; saving stores the matrix once; FSDP keeps it one tensor;
  * config.json fields this code cannot honour are refused before any weight is read (non-Qwen2 decoders, LoRA).
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from checkpoint import INDEX, save_state_dict
from model import R1VConfig, SkyworkR1V, count_params
from optim import make_optimizer
from parallel import load, setup
from sft import write_tiny_checkpoint
from tp import make_decoder
from ranks import spawn
from test_fsdp import batch, full, loss_fn

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tiny_configs")
EMBED, LM_HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


def release(name: str) -> dict:
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ sizes
# Published sizes: the InternVL documentation, "Quick Start of InternVL 3.0 Series", model preparation table
# (https://internvl.readthedocs.io/en/latest/internvl3.0/quick_start.html): parameters to 0.1B and the download in
# GB (bf16 safetensors, 2 bytes a parameter). Skywork-R1V3-38B is InternVL3-38B's architecture.
PUBLISHED = {  # config: (billions of parameters, GB)
    "internvl3-1b": (0.9, 1.8),
    "internvl3-2b": (2.1, 4.2),
    "internvl3-8b": (7.9, 15.9),
    "internvl3-14b": (15.1, 30.2),
    "r1v3-38b": (38.4, 76.8),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_matches_published_size(name):
    params, gb = PUBLISHED[name]
    counts = count_params(R1VConfig.from_dict(release(name)))
    assert round(counts["total"] / 1e9, 1) == params, counts
    assert abs(2 * counts["total"] / 1e9 - gb) < 0.1, counts  # the stated GB are rounded or truncated
    if name != "r1v3-38b":
        assert round(counts["vision_model"] / 1e6) == 304  # InternViT-300M


@pytest.mark.parametrize("name", ["internvl3-1b", "internvl3-2b", "internvl3-8b"])
def test_internvl3_releases_store_their_own_lm_head(name):
    """Qwen2.5-0.5B/1.5B tie lm_head to the embedding, but the InternVL3 releases built on them do not: with a tied
    head the count and the download miss the published figures (0.8B / 1.6 GB for the 1B, 1.9B / 3.7 GB for the 2B)."""
    cfg = release(name)
    assert cfg["llm_config"]["tie_word_embeddings"] is False
    cfg["llm_config"]["tie_word_embeddings"] = True
    total = count_params(R1VConfig.from_dict(cfg))["total"]
    params, gb = PUBLISHED[name]
    assert round(total / 1e9, 1) != params and abs(2 * total / 1e9 - gb) > 0.1


# ------------------------------------------------------------------------------------- tied checkpoints
@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny InternViT-300M + tied-embedding model stored both ways: `once` as write_tiny_checkpoint (and
    transformers) store it, without lm_head.weight; `copy` with lm_head.weight as an exact copy of the embedding."""
    root = tmp_path_factory.mktemp("tied")
    once = write_tiny_checkpoint(str(root / "once"), release("tiny-300m-tied"))
    m = SkyworkR1V.from_pretrained(once)
    copy = str(root / "copy")
    write_with(m, copy, lm_head=m.language_model.model.embed_tokens.weight.detach().clone())
    return {"once": once, "copy": copy, "root": root}


def write_with(model, out_dir, lm_head=None, drop=()):
    """model's tensors (plus an lm_head.weight if given, minus `drop`) as a release-format checkpoint, small shards."""
    tensors = [(n, p.detach()) for n, p in model.named_parameters() if n not in drop]
    tensors += [(LM_HEAD, lm_head)] if lm_head is not None else []
    with open(os.path.join(model.ckpt_dir, "config.json")) as f:
        config = json.load(f)
    save_state_dict(tensors, config, out_dir, max_shard_bytes=256 * 2**10, src_dir=model.ckpt_dir)
    return out_dir


def stored(ckpt_dir) -> set:
    with open(os.path.join(ckpt_dir, INDEX)) as f:
        return set(json.load(f)["weight_map"])


def test_tiny_300m_layout():
    m = SkyworkR1V(R1VConfig.from_dict(release("tiny-300m-tied")))
    block = m.vision_model.encoder.layers[0]
    assert isinstance(block.norm1, torch.nn.LayerNorm) and block.norm1.eps == 1e-6
    assert block.attn.qkv.bias is not None and not hasattr(block.attn, "q_norm")
    assert m.language_model.lm_head.weight is m.language_model.model.embed_tokens.weight
    assert LM_HEAD not in dict(m.named_parameters())  # listed once, as the embedding


@pytest.mark.parametrize("way", ["once", "copy"])
def test_tied_checkpoint_loads_either_way(tied, way):
    assert (LM_HEAD in stored(tied[way])) == (way == "copy")
    m = SkyworkR1V.from_pretrained(tied[way])
    lm = m.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    ids = torch.randint(0, 400, (1, 9))
    with torch.no_grad():
        h = m(ids, return_hidden=True)
        assert torch.equal(m(ids), F.linear(h, lm.model.embed_tokens.weight))  # the output layer is the embedding
    ref = SkyworkR1V.from_pretrained(tied["once"])
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("way", ["once", "copy"])
def test_tied_save_reload_is_bit_identical(tied, way):
    """Saved once (as the embedding) whichever way the source stored it; reloading gives back the same tensors."""
    m = SkyworkR1V.from_pretrained(tied[way])
    out = str(tied["root"] / f"saved-{way}")
    m.save_pretrained(out, max_shard_bytes=256 * 2**10)
    assert EMBED in stored(out) and LM_HEAD not in stored(out)
    with open(os.path.join(out, "config.json")) as f, open(os.path.join(tied[way], "config.json")) as g:
        assert json.load(f) == json.load(g)
    again = SkyworkR1V.from_pretrained(out)
    assert again.language_model.lm_head.weight is again.language_model.model.embed_tokens.weight
    mine, theirs = dict(m.state_dict()), dict(again.state_dict())
    assert mine.keys() == theirs.keys() and LM_HEAD in mine
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_tied_copy_that_differs_is_refused(tied):
    m = SkyworkR1V.from_pretrained(tied["once"])
    head = m.language_model.model.embed_tokens.weight.detach().clone()
    head[-1, -1] = torch.nextafter(head[-1, -1], torch.tensor(1.0))  # one ulp off, in one element
    bad = write_with(m, str(tied["root"] / "differs"), lm_head=head)
    with open(os.path.join(bad, INDEX)) as f:
        path = os.path.join(bad, json.load(f)["weight_map"][LM_HEAD])
    with pytest.raises(ValueError) as e:
        SkyworkR1V.from_pretrained(bad)
    assert all(s in str(e.value) for s in (LM_HEAD, EMBED, path, "tie_word_embeddings")), str(e.value)


def test_tied_copy_of_the_wrong_shape_is_refused(tied):
    m = SkyworkR1V.from_pretrained(tied["once"])
    head = torch.zeros(m.config.llm.vocab_size + 1, m.config.llm.hidden_size)
    bad = write_with(m, str(tied["root"] / "shape"), lm_head=head)
    with pytest.raises(ValueError, match=rf"tensor {LM_HEAD} has shape \[641, 64\], the config needs \[640, 64\]"):
        SkyworkR1V.from_pretrained(bad)


def test_untied_checkpoint_still_needs_its_lm_head(tiny_ckpt, tmp_path):
    m = SkyworkR1V.from_pretrained(tiny_ckpt)
    bad = write_with(m, str(tmp_path / "no-head"), drop=(LM_HEAD,))
    with pytest.raises(ValueError, match=rf"missing keys \['{LM_HEAD}'\]"):
        SkyworkR1V.from_pretrained(bad)


# -------------------------------------------------------------------------------------------- refusals
# These need the checks proposed for model.R1VConfig.from_dict (issue 16): config.json is parsed before any
# weight file is opened, so a refused config must fail there, naming the field, even when the weights are garbage.

def config_only(tmp_path, edit) -> str:
    """A checkpoint directory whose config.json is tiny-300m-tied edited by `edit`, with tokenizer files and an
    unreadable model.safetensors: any error about the weights means the config was not checked first."""
    out = tmp_path / "ckpt"
    out.mkdir()
    cfg = release("tiny-300m-tied")
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    tokens = {"added_tokens_decoder": {"600": {"content": "<IMG_CONTEXT>"}}}
    (out / "tokenizer_config.json").write_text(json.dumps(tokens))
    return str(out)


@pytest.mark.parametrize("arch", ["InternLM2ForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM"])
def test_non_qwen2_decoder_is_refused_before_reading_weights(tmp_path, arch):
    ckpt = config_only(tmp_path, lambda c: c["llm_config"].update(architectures=[arch]))
    with pytest.raises(ValueError, match=rf"llm_config.architectures.*{arch}.*only Qwen2ForCausalLM"):
        SkyworkR1V.from_pretrained(ckpt)


@pytest.mark.parametrize("key", ["use_backbone_lora", "use_llm_lora"])
def test_lora_config_is_refused(tmp_path, key):
    ckpt = config_only(tmp_path, lambda c: c.update({key: 16}))
    with pytest.raises(ValueError, match=rf"{key} = 16: LoRA"):
        SkyworkR1V.from_pretrained(ckpt)


@pytest.mark.parametrize("field,value,message", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, r"llm_config.rope_scaling .* not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, r"llm_config.rope_scaling .* not supported"),
    ("use_sliding_window", True, r"llm_config.use_sliding_window .* not implemented"),
], ids=["linear-rope", "yarn-rope", "sliding-window"])
def test_decoder_options_this_code_does_not_compute_are_refused(tmp_path, field, value, message):
    ckpt = config_only(tmp_path, lambda c: c["llm_config"].update({field: value}))
    with pytest.raises(ValueError, match=message):
        SkyworkR1V.from_pretrained(ckpt)


def test_release_fields_that_change_nothing_are_accepted():
    """InternVL3's config.json as released: dynamic NTK rope scaling (identical to plain RoPE up to
    max_position_embeddings, which generate never exceeds), LoRA off, drop_path_rate (training-only), pad2square."""
    cfg = release("internvl3-1b")
    assert cfg["llm_config"]["rope_scaling"]["rope_type"] == "dynamic" and cfg["vision_config"]["drop_path_rate"]
    R1VConfig.from_dict(cfg)


# ------------------------------------------------------------------------------------ FSDP, tied embedding
def tied_worker(rank, ckpt, out):
    check_tied_fsdp(setup(dtype="fp32"), ckpt, out)


def check_tied_fsdp(ctx, ckpt, out):
    ref = SkyworkR1V.from_pretrained(ckpt).train()
    sharded = load(ckpt, ctx, train="all")
    lm = sharded.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and hasattr(lm.lm_head.weight, "full_tensor")
    ids, pv = batch(ref)
    mine = slice(ctx.rank, ctx.rank + 1)
    with torch.no_grad():  # same logits as one process (each rank runs its own row)
        torch.testing.assert_close(sharded(ids[mine], pixel_values=pv[mine]), ref(ids[mine], pixel_values=pv[mine]),
                                   rtol=1e-5, atol=1e-5)
    # one AdamW step: the shared matrix gets both uses' gradients, and stays one tensor
    start = full(lm.model.embed_tokens.weight).detach().clone()
    opt_ref, opt = make_optimizer(ref, lr=1e-2), make_optimizer(sharded, lr=1e-2)
    loss_fn(ref, ids, pv).backward()
    opt_ref.step()
    loss_fn(sharded, ids[mine], pv[mine]).backward()
    opt.step()
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert ref.language_model.lm_head.weight is ref.language_model.model.embed_tokens.weight
    embed = full(lm.model.embed_tokens.weight).detach()
    assert not torch.equal(embed, start)
    torch.testing.assert_close(embed, ref.language_model.model.embed_tokens.weight, rtol=1e-5, atol=1e-4)
    # the tensor-parallel rollout copy (tp.py) of the trained tied model: its lm_head slice is the embedding's, so
    # its greedy tokens are one process's (each rank decodes every rank's rows: here both rows)
    decoder = make_decoder(sharded.eval(), torch.float32)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = sharded.generate(ids[mine], pv[mine], mask[mine], max_new_tokens=6, decoder=decoder)
        assert torch.equal(got, ref.eval().generate(ids[mine], pv[mine], mask[mine], max_new_tokens=6))
    # sharded save: the matrix once, and a reload equal to the trained shards
    sharded.save_pretrained(out)
    trained = [(name, full(p).detach()) for name, p in sharded.named_parameters()]  # collectives: every rank
    if ctx.rank == 0:
        assert EMBED in stored(out) and LM_HEAD not in stored(out)
        again = SkyworkR1V.from_pretrained(out)
        for (name, p), q in zip(trained, again.parameters()):
            assert torch.equal(p, q), name


def test_fsdp_two_ranks_keep_a_tied_embedding_one_tensor(tied):
    """2 gloo ranks as in test_fsdp.py on a model whose lm_head is its embedding (InternVL3-1B/2B's tie)."""
    out = str(tied["root"] / "fsdp-step1")
    spawn(tied_worker, tied["once"], out)
    shutil.rmtree(out)
