"""Checkpoints in the release's format, loaded and saved the same way by every script, on one process or many.

A release directory holds config.json (InternVL-style: vision_config + llm_config), the weights as
`model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json` (or one `model.safetensors`), and the
tokenizer files. Loading builds the model on the meta device (no memory, no random init of 38B parameters), then gives
each parameter its tensor from `safe_open`, one at a time, so host memory peaks near one tensor, not one model
(and when dtype and device match the file, the weights are its memory-mapped pages: no copy at all). Under FSDP2 (`shard`, see parallel.py) a parameter is a DTensor whose local
part is a block of rows: each rank reads only those rows with `get_slice` (under HSDP the rows of its shard group;
each replica reads the same rows). Saving writes once: the full tensors are gathered and global rank 0 writes.

Tied embeddings (`llm_config.tie_word_embeddings`, as in Qwen2.5-0.5B/1.5B): one [V,D] Parameter is registered twice,
as `language_model.model.embed_tokens.weight` and `language_model.lm_head.weight`. Files written by different tools
disagree on whether the second name is stored: transformers' save_pretrained drops it (`_tied_weights_keys`), other
exporters keep a copy. Loading accepts both, and a stored copy must equal the embedding bit for bit (one matrix is
kept, so a different one would be silently lost). Saving stores the matrix once, under the embedding's name, as
transformers does: save -> load gives back the same model whichever way the source stored it.
"""
import glob
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

# torch.distributed.checkpoint saves and loads the optimizer state on one process too, and says so every time
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "generation_config.json")


# ------------------------------------------------------------------------------------------------------ loading
def weight_map(ckpt_dir: str) -> dict:
    """{tensor name: shard path} from the index, or from the single model.safetensors."""
    index = os.path.join(ckpt_dir, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                names = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        missing = sorted({s for s in names.values() if not os.path.isfile(os.path.join(ckpt_dir, s))})
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are not in {ckpt_dir}: {missing}")
        return {k: os.path.join(ckpt_dir, s) for k, s in names.items()}
    single = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.isfile(single):
        with _open(single) as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"no {INDEX} and no model.safetensors in {ckpt_dir!r}")


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:  # truncated / corrupt header
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from None


def tied_names(model: torch.nn.Module) -> dict:
    """{alias: name} for every parameter registered under more than one name. named_parameters() lists a shared
    Parameter once, under the first name met; the other names (lm_head.weight of a tied model) are its aliases."""
    first, aliases = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def check_keys(model: torch.nn.Module, names: dict, ckpt_dir: str):
    """Strict loading: the checkpoint must hold exactly the model's parameters, with the right shapes; an alias of
    a tied parameter may be stored too (a copy, checked against the original in load_weights), or left out.
    Checked on headers only, before any tensor is read."""
    params, aliases = dict(model.named_parameters()), tied_names(model)
    missing = sorted(params.keys() - names.keys())
    unexpected = sorted(names.keys() - params.keys() - aliases.keys())
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}: checkpoint does not match the config: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''} ({len(missing)}), unexpected keys "
                         f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})")
    for path in sorted(set(names.values())):
        with _open(path) as f:
            for name in f.keys():
                shape = list(f.get_slice(name).get_shape())
                want = params.get(name, params.get(aliases.get(name)))
                if want is not None and shape != list(want.shape):
                    raise ValueError(f"{path}: tensor {name} has shape {shape}, the config needs {list(want.shape)}")


def check_tied_copy(names: dict, alias: str, name: str, rows: int = 4096):
    """A stored alias (lm_head.weight of a tied checkpoint) must be a copy of the tensor it aliases: loading keeps
    only `name`, so anything else in `alias` would be dropped without a word. Compared block by block, in the
    files, before any cast; every rank compares everything, so under FSDP all ranks reach the same verdict (an
    error on one rank alone would leave the others waiting in their next collective)."""
    with _open(names[alias]) as fa, _open(names[name]) as fn:
        a, n = fa.get_slice(alias), fn.get_slice(name)
        for i in range(0, a.get_shape()[0], rows):
            x, y = a[i:i + rows], n[i:i + rows]
            dtype = torch.promote_types(x.dtype, y.dtype)
            if not torch.equal(x.to(dtype), y.to(dtype)):
                raise ValueError(
                    f"{names[alias]}: tensor {alias} differs from {name} (in {names[name]}), but the config ties "
                    f"them (llm_config.tie_word_embeddings: true), so only {name} would be kept. Store {alias} as "
                    f"an exact copy or leave it out; or, if the checkpoint really has its own output layer, set "
                    f"tie_word_embeddings: false")


def local_rows(param):
    """(start, stop) rows of the full tensor that this rank holds: FSDP2 shards dim 0 like torch.chunk over the
    mesh dimension it shards on; under HSDP the other dimension replicates, so the replicas read the same rows."""
    dim = next(d for d, pl in enumerate(param.placements) if pl.is_shard())
    n, world, rank = param.shape[0], param.device_mesh.size(dim), param.device_mesh.get_local_rank(dim)
    step = -(-n // world)
    return min(rank * step, n), min((rank + 1) * step, n)


def adopt(model: torch.nn.Module, name: str, tensor: torch.Tensor, aliases=()):
    """Replace the (meta) parameter `name`, and the same parameter under its `aliases`, by one new Parameter
    holding `tensor`, keeping requires_grad: a tied pair stays one Parameter."""
    module, _, leaf = name.rpartition(".")
    p = torch.nn.Parameter(tensor, requires_grad=model.get_submodule(module)._parameters[leaf].requires_grad)
    for n in (name, *aliases):
        module, _, leaf = n.rpartition(".")
        model.get_submodule(module)._parameters[leaf] = p


@torch.no_grad()
def load_weights(model: torch.nn.Module, ckpt_dir: str, device="cpu"):
    """Fill every parameter of `model` from the shards. A parameter still on the meta device (one process) adopts
    the file's tensor, cast to its dtype and moved to `device`: when those already match, the weights are the
    memory-mapped pages of the file, with no copy at all. An FSDP-sharded one (a DTensor, materialised) gets just
    this rank's rows, read with get_slice. A tied parameter is read once, under its first name; a copy stored
    under its alias is only compared with it."""
    names = weight_map(ckpt_dir)
    check_keys(model, names, ckpt_dir)
    params, aliases = dict(model.named_parameters()), tied_names(model)
    for alias, name in aliases.items():
        if alias in names:
            check_tied_copy(names, alias, name)
    by_shard = {}
    for name in params:
        by_shard.setdefault(names[name], []).append(name)
    for path, shard_names in by_shard.items():
        with _open(path) as f:
            for name in shard_names:
                p = params[name]
                try:
                    if p.is_meta:
                        also = [a for a, n in aliases.items() if n == name]
                        adopt(model, name, f.get_tensor(name).to(device=device, dtype=p.dtype), also)
                    else:
                        start, stop = local_rows(p)
                        p.to_local().copy_(f.get_slice(name)[start:stop])
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{path}: cannot read tensor {name} ({e})") from None


# ------------------------------------------------------------------------------------------------ config.json
def read_config(ckpt_dir: str) -> tuple[dict, str]:
    """-> (config.json of a release directory as a dict, its path); model.R1VConfig.from_dict parses it."""
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {ckpt_dir!r}")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
    return d, path


def check_supported(d: dict, where: str):
    """Refuse, before any weight is read, the release options this code does not compute: a model that loads but
    computes something else is worse than an error. The InternVL family shares config.json's format with other
    decoders (InternLM2, Llama, Phi-3) and with LoRA and long-context settings."""
    for key in ("vision_config", "llm_config"):
        if not isinstance(d.get(key), dict):
            raise ValueError(f"{where}: missing required field {key!r}")
    llm = d["llm_config"]
    for arch in llm.get("architectures") or ["Qwen2ForCausalLM"]:
        if arch != "Qwen2ForCausalLM":
            raise ValueError(f"{where}: llm_config.architectures is {arch!r}: only Qwen2ForCausalLM (Qwen2/2.5 "
                             f"decoders: Skywork-R1V3, InternVL3) is implemented")
    for key in ("use_backbone_lora", "use_llm_lora"):
        if d.get(key):
            raise ValueError(f"{where}: {key} = {d[key]}: LoRA adapters are not implemented (merge them into the "
                             f"weights first)")
    scaling = llm.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if scaling and kind != "dynamic":  # dynamic NTK equals plain RoPE up to max_position_embeddings
        raise ValueError(f"{where}: llm_config.rope_scaling {scaling} is not supported (plain RoPE, or 'dynamic', "
                         f"which equals it within max_position_embeddings)")
    if llm.get("use_sliding_window"):
        raise ValueError(f"{where}: llm_config.use_sliding_window = true: sliding-window attention is not "
                         f"implemented")
    if d.get("ps_version", "v2") != "v2":
        raise ValueError(f"{where}: ps_version {d['ps_version']!r} is not supported (the release uses 'v2')")
    size, vit_size = d.get("force_image_size", 448), d["vision_config"].get("image_size", 448)
    if size != vit_size:
        raise ValueError(f"{where}: force_image_size {size} != vision_config.image_size {vit_size} "
                         f"(position-embedding interpolation is not implemented)")


def dataclass_from(cls, d: dict, where: str, required=(), **extra):
    """One section of config.json -> the dataclass `cls` (its fields only; `required` ones named if missing)."""
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names}, **extra)


def img_context_id(ckpt_dir: str) -> int:
    """The id of <IMG_CONTEXT> from tokenizer.json, else added_tokens.json / tokenizer_config.json."""
    token = "<IMG_CONTEXT>"
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            d = json.load(f)
        if name == "tokenizer.json":
            ids = [t["id"] for t in d.get("added_tokens", []) if t["content"] == token]
        elif name == "added_tokens.json":
            ids = [d[token]] if token in d else []
        else:
            ids = [int(i) for i, t in d.get("added_tokens_decoder", {}).items() if t.get("content") == token]
        if ids:
            return ids[0]
    raise ValueError(f"{ckpt_dir}: no {token} token in tokenizer.json, added_tokens.json or tokenizer_config.json")


# ------------------------------------------------------------------------------------------------------- saving
def config_dict(config) -> dict:
    """The release's config.json layout (InternVL chat config), so the output loads in the ecosystem too."""
    top = {k: v for k, v in asdict(config).items() if k not in ("vision", "llm", "img_context_token_id")}
    vision = {**asdict(config.vision), "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b"}
    llm = {**asdict(config.llm), "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
           "hidden_act": "silu", "attention_dropout": 0.0, "use_sliding_window": False, "torch_dtype": "bfloat16"}
    return {"architectures": ["SkyworkR1VChatModel"], "model_type": "skywork_chat", **top,
            "vision_config": vision, "llm_config": llm, "torch_dtype": "bfloat16"}


def save_state_dict(tensors, config: dict, out_dir: str, max_shard_bytes: int = 5 * 2**30, src_dir: str = None):
    """Write an iterable of (name, tensor) as release-format shards + index + config.json (+ tokenizer files from
    src_dir). Each shard is written as soon as it is full, so the process holds at most one shard (max_shard_bytes)
    plus the tensor in hand, never the whole model (the 38B's export is 77 GB; rank 0 writes it). Shard files get
    their final "-of-N" names once N is known (renames). The directory appears complete or not at all: written to
    a temp dir beside it, then renamed."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    written, current, size, total = [], {}, 0, 0  # written: [names of each shard file]

    def flush():
        path = os.path.join(tmp, f"shard-{len(written):05d}.safetensors")
        save_file(current, path, metadata={"format": "pt"})
        written.append(list(current))

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name], size, total = t.detach().cpu().contiguous(), size + nbytes, total + nbytes
    flush()
    current = None
    weight_map = {}
    for i, names in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.rename(os.path.join(tmp, f"shard-{i:05d}.safetensors"), os.path.join(tmp, fname))
        weight_map.update({k: fname for k in names})
    with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in TOKENIZER_FILES if src_dir else ():
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def file_dtype(ckpt_dir: str) -> torch.dtype | None:
    """The dtype the checkpoint's tensors are stored in (the first floating tensor's, from its header), or None."""
    try:
        names = weight_map(ckpt_dir)
    except (FileNotFoundError, ValueError):
        return None
    for path in sorted(set(names.values())):
        with _open(path) as f:
            for name in f.keys():
                dtype = SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                if dtype is not None:
                    return dtype
    return None


def resharded_parameters(model):
    """named_parameters() as the sharded DTensors FSDP2 owns. After a no_grad forward (generation) the root FSDP
    unit keeps its full, unsharded tensors registered (it expects a backward), and anything holding on to those
    (an optimizer, a save) would hold copies that FSDP later discards: reshard first."""
    if hasattr(model, "reshard"):
        model.reshard()
    return model.named_parameters()


def save_model(model, out_dir: str, max_shard_bytes: int = 5 * 2**30, src_dir: str = None, dtype=None):
    """save_pretrained: the model's tensors in the release's dtype, gathered tensor by tensor when FSDP-sharded and
    cast on the device before they leave it; only rank 0 writes, shard by shard (save_state_dict). dtype: that of
    the checkpoint the model was loaded from (bf16 for the release: 77 GB for the 38B, not 153 GB of fp32 master
    weights), bf16 without one. The exact fp32 weights of a training run live in save_checkpoint's train_state/.
    A tied matrix is written once, under its first name (the embedding), as transformers' save_pretrained does."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    src = src_dir or getattr(model, "ckpt_dir", None)
    dtype = dtype or (file_dtype(src) if src else None) or torch.bfloat16

    def tensors():
        for name, p in resharded_parameters(model):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective: every rank takes part
            yield name, full.detach().to(dtype).cpu() if rank0 else None

    if rank0:  # keep the source's config.json verbatim (auto_map, template, ...) when there is one
        src_config = os.path.join(src or "", "config.json")
        config = json.load(open(src_config)) if src and os.path.isfile(src_config) else config_dict(model.config)
        save_state_dict(tensors(), config, out_dir, max_shard_bytes, src)
    else:
        for _ in tensors():
            pass
    if dist.is_initialized():
        dist.barrier()


def trainable_state(model) -> dict:
    """{name: tensor} of the trainable parameters, as torch.distributed.checkpoint saves and loads them (FSDP2's
    DTensors: each rank writes and reads only its own rows)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    names = {n for n, p in resharded_parameters(model) if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in names}


# ------------------------------------------------------------------------------------------- training state
def save_checkpoint(out_dir: str, model, optimizer, step: int, extra: dict = None, tensors: dict = None):
    """out_dir = the model in the release format (its dtype: bf16 for the release) + train_state/: the exact fp32
    master weights of the trainable parameters and the optimizer state, both written by every rank for its own
    rows (torch.distributed.checkpoint: no rank gathers them), per-rank RNG and tensors, step, world size. Written
    under out_dir.partial, then renamed: a crash never leaves a half checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    partial = out_dir.rstrip("/") + ".partial"
    model.save_pretrained(partial)  # gathers tensor by tensor; rank 0 writes shard by shard
    state = os.path.join(partial, "train_state")
    dcp.save({"model": trainable_state(model)}, checkpoint_id=os.path.join(state, "model"))
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=os.path.join(state, "optimizer"))
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    save_file({**{f"rng.{k}": v for k, v in rng.items()}, **(tensors or {})}, os.path.join(state, f"rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(state, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                       "extra": extra or {}}, f, indent=2)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(partial, out_dir)
    if dist.is_initialized():
        dist.barrier()


def resume(ckpt_dir: str, model, optimizer):
    """Restore the trainable parameters' exact fp32 weights, the optimizer state and RNG from save_checkpoint's
    train_state/ -> (step, extra, tensors). The model is loaded from ckpt_dir itself first (load); the export may
    be bf16, so the trainable parameters are then overwritten in place with their saved fp32 values (frozen ones
    are what the export holds, as they were loaded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = os.path.join(ckpt_dir, "train_state")
    meta_path = os.path.join(state, "trainer_state.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{ckpt_dir}: no train_state/trainer_state.json, so it cannot be resumed "
                                f"(a release checkpoint is a starting point: pass it as --ckpt instead)")
    with open(meta_path) as f:
        meta = json.load(f)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if meta["world_size"] != world:
        raise ValueError(f"{meta_path}: saved by {meta['world_size']} rank(s), resumed with {world}; resume with "
                         f"--nproc_per_node {meta['world_size']} (per-rank RNG and data order depend on it)")
    if os.path.isdir(os.path.join(state, "model")):  # (checkpoints written before it have fp32 exports)
        weights = {"model": trainable_state(model)}
        dcp.load(weights, checkpoint_id=os.path.join(state, "model"))
        set_model_state_dict(model, weights["model"], options=StateDictOptions(strict=False))
    optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    # parameters that never had a gradient have no Adam state in the checkpoint, but the template built here has
    # (zero) state for every trainable parameter: a partial load leaves those at zero, as they were when saved
    dcp.load(optim_state, checkpoint_id=os.path.join(state, "optimizer"),
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, optimizer, optim_state["optimizer"])
    tensors = load_file(os.path.join(state, f"rank{rank}.safetensors"))
    torch.set_rng_state(tensors.pop("rng.cpu"))
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors.pop("rng.cuda"))
    return meta["step"], meta["extra"], tensors


def trained_step(ckpt_dir: str):
    """The step a checkpoint was saved at, from its training state (train_state/trainer_state.json, written by
    checkpoint.save_checkpoint), or None (a release checkpoint, or not a checkpoint). Never the directory's name:
    `my-sft3` is not step 3."""
    path = os.path.join(ckpt_dir, "train_state", "trainer_state.json")
    try:
        with open(path) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def by_saved_step(path: str) -> tuple:
    """Sort key of checkpoint directories: by the step each was saved at, oldest first; those without a training
    state (a release checkpoint, an export) after them, by name."""
    step = trained_step(path)
    return step is None, step or 0, path


def latest_checkpoint(out_dir: str):
    """The newest out_dir/step_* that has a training state (each save is a release-format model + train_state/;
    entropy.py ranks them all: `python entropy.py --ckpts out/grpo/step_*`), or None."""
    saved = [p for p in glob.glob(os.path.join(out_dir, "step_*")) if trained_step(p) is not None]
    return max(saved, key=by_saved_step) if saved else None