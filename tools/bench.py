"""Speed of nanoR1V against transformers' native InternVL, measured side by side, and a computed roofline for the 38B.

Measured rows (one process, the same random weights in both models, repeats interleaved ours/theirs/theirs/ours...
so that both sides see the same machine load). Before any timing, each row checks that both sides computed the
same thing (same greedy tokens, features, losses, weights), so the comparison is between equal work.

    vit      ViT + connector               tiles/s    ours: extract_feature     theirs: get_image_features
    prefill  prompt -> first new token     tokens/s   ours: generate(1 token)   theirs: generate(max_new_tokens=1)
    decode1  greedy, KV cache, batch 1     tokens/s   ours: generate            theirs: generate(do_sample=False)
    decodeB  the same at a GRPO-sized batch (eos disabled on both sides: every row makes every token)
    sft      forward + backward + AdamW    tokens/s   ours: sft.sft_loss (lm_head on response tokens only, chunked)
                                                      theirs: model(labels=...).loss (full logits)
    grpo     forward + backward + AdamW    tokens/s   ours: model.token_logprobs_and_entropy + grpo.grpo_loss
                                                      theirs: logits(logits_to_keep) + log_softmax + grpo.grpo_loss
    load     checkpoint -> model           GB/s       ours: SkyworkR1V.from_pretrained(release-format dir)
                                                      theirs: from_pretrained(an HF save of the same weights)
Ratio = ours / theirs throughput (> 1: ours is faster): median over repeats; spread = min..max of per-repeat ratios.

The roofline section is computed from a config (default the release's shapes), not measured: bytes and FLOPs per
decode step, per training token, per tile, and the lower bounds they imply on 8xH100; the GRPO step on 1, 2 and 4
such nodes, HSDP vs full FSDP.

    python -m tools.bench --config small --device cpu       # the table (+ out/bench_small_cpu.json)
    python -m tools.bench --config proxy --device cuda      # release-width blocks, 2 + 2 layers
    python -m tools.bench --roofline                        # the 38B on 8xH100 (+ out/roofline_r1v3-38b.json)
    python -m tools.bench --roofline --inter-node-gbps 200  # the GRPO step on 2 and 4 nodes over a slower network
    python -m tools.bench --config small --profile decode1  # torch.profiler top ops, both sides, one row
    python -m tools.bench --rollout                         # rollout speed (bench_rollout.py, + out/bench_rollout.json)

transformers is the reference: tests/hf_reference.py builds it (transformers stays out of the project's code).
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from cli import at_least, check_choices, choice, parse_config
from grpo import GRPOConfig, grpo_loss, on_policy
from model import R1VConfig, SkyworkR1V, count_params, token_logprobs_and_entropy
from sft import sft_loss, write_tiny_checkpoint
from tools import ROOT, machine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHARD_BYTES = 5 * 2**30  # the release's (and HF's) 5 GB shards, for both formats
NO_EOS = -1  # an eos id argmax never returns: every row generates every token


@dataclass
class BenchConfig:
    config: str = choice("small", "tiny", "proxy")  # tiny_configs/<config>.json
    device: str = "cpu"
    dtype: str = choice("", "fp32", "bf16")  # default ("") fp32 on cpu, bf16 on cuda
    repeats: int = 5              # timed repeats per side, after one warm-up call each
    threads: int = 2              # torch.set_num_threads on cpu (1 on a shared, loaded machine: a 2nd OpenMP thread
                                  # then waits for a descheduled peer at every op); --rollout: the one process's
    only: str = ""                # comma-separated row names (default: all)
    out: str = ""                 # JSON results; default out/bench_<config>_<device>.json
    profile: str = ""             # a row name: print torch.profiler's top ops for both sides instead of timing
    roofline: bool = False        # print the computed roofline instead of measuring
    rollout: bool = False         # bench_rollout.py: TP vs FSDP-gather decode on 2 ranks, group vs per-row rollouts
    roofline_config: str = "r1v3-38b"
    context: int = 4096           # roofline: tokens in context per sequence (decode KV reads, training sequence)
    inter_node_gbps: float = 400  # roofline: network bandwidth between nodes, Gb/s per GPU (one NIC per GPU)

    def __post_init__(self):
        check_choices(self)
        at_least(self, 1, "repeats", "threads", "context", "inter_node_gbps")


@dataclass
class Sizes:  # the work of one timed call per row
    vit_tiles: int
    prefill_len: int
    prompt_len: int               # decode prompts (short: decode rows time the per-token loop)
    new_tokens: int               # decode1
    big_batch: int                # decodeB: sequences in a GRPO rollout batch
    big_new_tokens: int
    train_batch: int
    train_prompt: int             # training rows: prompt tokens (no loss) + response tokens (loss) per sequence
    train_response: int


SIZES = {"tiny": Sizes(1, 64, 8, 8, 64, 4, 2, 16, 16),
         "small": Sizes(2, 512, 16, 32, 64, 16, 2, 64, 64),
         "proxy": Sizes(8, 2048, 16, 64, 64, 32, 4, 512, 512)}
# ours / theirs targets, in run order
TARGETS = {"vit": 1.0, "prefill": 1.0, "decode1": 1.5, "decodeB": 1.0, "load": 1.0, "sft": 1.0, "grpo": 1.0}


# ----------------------------------------------------------------------------------------------------------------
# The reference: the same weights in transformers' InternVLForConditionalGeneration

def reference():
    """tests/hf_reference.py: transformers' InternVL holding our weights. It lives with the tests because
    transformers is a test-and-benchmark dependency (requirements-test.txt) that the project's code never imports."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import hf_reference
    return hf_reference


def build_pair(cfg: BenchConfig, workdir: str):
    """-> (ours, theirs, release_dir, hf_dir): one set of random weights (checkpoint.py's tiny-checkpoint init), in
    our model and in HF's, each also saved in its own format and in the bench dtype for the load row."""
    dtype = DTYPES[cfg.dtype]
    init = write_tiny_checkpoint(os.path.join(workdir, "init"), config=cfg.config, max_shard_bytes=SHARD_BYTES)
    ours = SkyworkR1V.from_pretrained(init, dtype=dtype, device=cfg.device)
    release_dir, hf_dir = os.path.join(workdir, "release"), os.path.join(workdir, "hf")
    ours.save_pretrained(release_dir, max_shard_bytes=SHARD_BYTES)
    shutil.rmtree(init)
    ours.ckpt_dir = release_dir
    theirs = reference().hf_model(ours.config, ours.state_dict(), cfg.device, dtype)  # eos off, as NO_EOS for ours
    theirs.save_pretrained(hf_dir, max_shard_size="5GB")
    return ours, theirs, release_dir, hf_dir


# ----------------------------------------------------------------------------------------------------------------
# Rows: each is a pair of zero-argument callables doing the same work, and a check that they agree

@dataclass
class Row:
    name: str
    unit: str
    work: float                   # units of work per call (tiles, tokens, GB)
    ours: callable
    theirs: callable
    check: callable               # (ours output, theirs output) -> None, raises if they differ
    grad: bool = False


def text_ids(batch: int, length: int, device="cpu", seed: int = 0):
    """Random byte-level token ids (no special tokens, so no <IMG_CONTEXT> by accident): [B, T]."""
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def check_close(a, b, tol: float):
    err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    assert err < tol, f"outputs differ: max relative error {err:.2e} >= {tol:.0e}"


def check_tokens(a, b, prompt_len: int, exact: bool):
    """Greedy tokens must be identical in fp32. In bf16 a near-tie can flip one argmax and the sequences part from
    there, so only the first new token is required to agree, in 90% of the rows."""
    assert a.shape == b.shape, f"ours generated {tuple(a.shape)}, theirs {tuple(b.shape)}"
    if exact:
        assert torch.equal(a, b), "greedy tokens differ between ours and theirs"
    else:
        agree = (a[:, prompt_len] == b[:, prompt_len]).float().mean().item()
        assert agree >= 0.9, f"only {agree:.0%} of the rows agree on the first greedy token"


def vit_row(ours, theirs, s: Sizes, cfg: BenchConfig, tol: float) -> Row:
    pv = torch.randn(s.vit_tiles, 3, 448, 448, generator=torch.Generator().manual_seed(1)).to(cfg.device)

    def theirs_fn():
        return theirs.get_image_features(pixel_values=pv, vision_feature_layer=ours.config.select_layer,
                                         vision_feature_select_strategy="default").pooler_output
    return Row("vit", "tiles/s", s.vit_tiles, lambda: ours.extract_feature(pv), theirs_fn,
               lambda a, b: check_close(a, b, tol))


def generate_row(name, ours, theirs, batch: int, prompt: int, new: int, cfg: BenchConfig, exact: bool) -> Row:
    """prefill = one new token after a long prompt; decode = many new tokens after a short one. Throughput counts
    prompt tokens for prefill and new tokens for decode (which therefore includes one short prefill)."""
    ids = text_ids(batch, prompt, cfg.device)

    def ours_fn():
        return ours.generate(ids, max_new_tokens=new, temperature=0.0, eos_token_id=NO_EOS)

    def theirs_fn():
        return theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    work = batch * (prompt if name == "prefill" else new)
    return Row(name, "tokens/s", work, ours_fn, theirs_fn, lambda a, b: check_tokens(a, b, prompt, exact))


def sft_row(ours, theirs, s: Sizes, cfg: BenchConfig, tol: float) -> Row:
    """An SFT step: loss on the response tokens only (labels -100 on the prompt), AdamW over all parameters."""
    ids = text_ids(s.train_batch, s.train_prompt + s.train_response, cfg.device, seed=2)
    labels = ids.clone()
    labels[:, :s.train_prompt] = -100
    batch = dict(input_ids=ids, pixel_values=None, attention_mask=torch.ones_like(ids), labels=labels)
    n_tokens = int((labels[:, 1:] >= 0).sum())

    def ours_loss():
        return sft_loss(ours, batch, n_tokens)[0]

    def theirs_loss():  # HF's ForCausalLMLoss: shifts labels, mean cross-entropy over labels != -100
        return theirs(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).loss

    return Row("sft", "tokens/s", ids.numel(), train_step(ours, ours_loss), train_step(theirs, theirs_loss),
               lambda a, b: check_close(a, b, tol), grad=True)


def grpo_row(ours, theirs, s: Sizes, cfg: BenchConfig, tol: float) -> Row:
    """A GRPO step on one group of sampled responses: log-probs + entropy of the response tokens, clipped surrogate
    (ratio 1 here: logp_old is the current policy, as on the first pass over a rollout batch), AdamW."""
    P, R = s.train_prompt, s.train_response
    ids = text_ids(s.train_batch, P + R, cfg.device, seed=3)
    attn, targets = torch.ones_like(ids), ids[:, P:]                     # [B, P+R], [B, R]
    adv = torch.randn(s.train_batch, generator=torch.Generator().manual_seed(4)).to(cfg.device)
    mask = torch.ones_like(targets)

    def ours_loss():  # as grpo.response_logprobs: the hidden states at P-1 .. P+R-2 predict the response
        h = ours(ids[:, :-1], None, attn[:, :-1], return_hidden=True)[:, P - 1:]
        logp, _ = token_logprobs_and_entropy(ours.language_model.lm_head, h, targets)
        return grpo_loss(logp, logp.detach(), adv, mask)[0], logp

    def theirs_loss():  # as TRL's GRPOTrainer: logits for the response positions only, fp32 log_softmax, entropy
        logits = theirs(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], logits_to_keep=R).logits.float()
        logp_all = logits.log_softmax(-1)                                 # [B, R, V]
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        with torch.no_grad():
            (-(logp_all.exp() * logp_all).sum(-1)).mean()                 # entropy, logged as ours is
        return grpo_loss(logp, logp.detach(), adv, mask)[0], logp

    return Row("grpo", "tokens/s", ids.numel(), train_step(ours, ours_loss), train_step(theirs, theirs_loss),
               lambda a, b: check_close(a, b, tol), grad=True)


def train_step(model, loss_fn):
    """-> a callable doing one forward + backward + AdamW step and returning what loss_fn's first output depends on
    (the loss, or the log-probs for GRPO, whose loss at ratio 1 does not depend on the model)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        out = loss_fn()
        loss, value = out if isinstance(out, tuple) else (out, out)
        loss.backward()
        opt.step()
        model.eval()
        return value.detach()
    return step


def load_row(ours, release_dir: str, hf_dir: str, cfg: BenchConfig) -> Row:
    gb = sum(os.path.getsize(os.path.join(release_dir, f)) for f in os.listdir(release_dir)
             if f.endswith(".safetensors")) / 1e9
    dtype = DTYPES[cfg.dtype]

    def ours_fn():
        return touched(SkyworkR1V.from_pretrained(release_dir, dtype=dtype, device=cfg.device))

    def theirs_fn():
        return touched(reference().load_hf(hf_dir, cfg.device, dtype))

    def check(a, b):
        assert torch.equal(a.language_model.lm_head.weight, b.lm_head.weight), "loaded weights differ"
        assert torch.equal(a.language_model.lm_head.weight, ours.language_model.lm_head.weight)
    return Row("load", "GB/s", gb, ours_fn, theirs_fn, check)


@torch.no_grad()
def touched(model):
    """Read one element per 4 KiB page of every weight. transformers maps safetensors files into memory when the
    dtype matches (zero-copy) and the pages are then read on first use; touching them makes "loaded" mean the same
    thing on both sides: every weight is in memory, ready for the first forward."""
    for p in model.parameters():
        p.reshape(-1)[::4096 // p.element_size()].sum()
    return model


def make_rows(ours, theirs, release_dir, hf_dir, cfg: BenchConfig) -> list:
    """Training rows last: their AdamW steps move the weights (by ~lr), and they allocate the most memory."""
    s, fp32 = SIZES[cfg.config], cfg.dtype == "fp32"
    tol = 1e-4 if fp32 else 5e-2  # max error relative to the largest value, for features, losses and log-probs
    builders = {
        "vit": lambda: vit_row(ours, theirs, s, cfg, tol),
        "prefill": lambda: generate_row("prefill", ours, theirs, 1, s.prefill_len, 1, cfg, fp32),
        "decode1": lambda: generate_row("decode1", ours, theirs, 1, s.prompt_len, s.new_tokens, cfg, fp32),
        "decodeB": lambda: generate_row("decodeB", ours, theirs, s.big_batch, s.prompt_len, s.big_new_tokens, cfg,
                                        fp32),
        "load": lambda: load_row(ours, release_dir, hf_dir, cfg),
        "sft": lambda: sft_row(ours, theirs, s, cfg, tol),
        "grpo": lambda: grpo_row(ours, theirs, s, cfg, tol),
    }
    only = [r for r in cfg.only.split(",") if r] or list(builders)
    unknown = set(only) - set(builders)
    if unknown:
        raise ValueError(f"--only: unknown row(s) {sorted(unknown)}; rows are {list(builders)}")
    return [builders[name]() for name in builders if name in only]


# ----------------------------------------------------------------------------------------------------------------
# Timing and profiling

def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def measure(row: Row, cfg: BenchConfig) -> dict:
    """One warm-up call per side (its outputs are checked against each other), then `repeats` timed calls per
    side, alternating which side goes first. Throughput = work / median time."""
    with torch.set_grad_enabled(row.grad):
        a, b = timed(row.ours, cfg.device)[1], timed(row.theirs, cfg.device)[1]
        row.check(a, b)
        del a, b
        times = {"ours": [], "theirs": []}
        for r in range(cfg.repeats):
            sides = [("ours", row.ours), ("theirs", row.theirs)]
            for side, fn in sides if r % 2 == 0 else sides[::-1]:
                times[side].append(timed(fn, cfg.device)[0])
    med = {side: statistics.median(t) for side, t in times.items()}
    ratios = [t / o for o, t in zip(times["ours"], times["theirs"])]  # paired: same moment, same load
    return dict(row=row.name, unit=row.unit, work=row.work, ours=row.work / med["ours"],
                ours_range=[row.work / max(times["ours"]), row.work / min(times["ours"])],
                theirs=row.work / med["theirs"],
                theirs_range=[row.work / max(times["theirs"]), row.work / min(times["theirs"])],
                ratio=med["theirs"] / med["ours"], ratio_range=[min(ratios), max(ratios)],
                target=TARGETS[row.name], seconds=times)


def profile(row: Row, cfg: BenchConfig, top: int = 20):
    """torch.profiler's top ops (by self time) for one call of each side, after a warm-up call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    sort = "self_cuda_time_total" if cfg.device.startswith("cuda") else "self_cpu_time_total"
    with torch.set_grad_enabled(row.grad):
        for side, fn in (("ours", row.ours), ("theirs", row.theirs)):
            fn()
            with torch_profile(activities=activities) as prof:
                timed(fn, cfg.device)
            print(f"\n### {row.name}, {side}\n")
            print(prof.key_averages().table(sort_by=sort, row_limit=top))


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def results_table(rows: list) -> str:
    lines = ["| row | unit | ours: median (min-max) | transformers: median (min-max) | ours / theirs (min-max) "
             "| target | met |", "|---|---|---|---|---|---|---|"]
    span = lambda lo_hi: f"{fmt(lo_hi[0])}-{fmt(lo_hi[1])}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['row']} | {r['unit']} | {fmt(r['ours'])} ({span(r['ours_range'])}) "
                     f"| {fmt(r['theirs'])} ({span(r['theirs_range'])}) "
                     f"| **{r['ratio']:.2f}x** ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) "
                     f"| >= {r['target']}x | {'yes' if r['ratio'] >= r['target'] else 'NO'} |")
    return "\n".join(lines)


def run(cfg: BenchConfig) -> dict:
    """Measure every row (or profile one) -> {"meta", "rows"}; prints the markdown table and writes the JSON."""
    cfg.dtype = cfg.dtype or ("bf16" if cfg.device.startswith("cuda") else "fp32")
    if cfg.config not in SIZES:
        raise ValueError(f"--config must be one of {list(SIZES)}, got {cfg.config!r}")
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    cfg.only = cfg.profile or cfg.only
    torch.manual_seed(0)
    workdir = tempfile.mkdtemp(prefix="nanor1v-bench-")
    try:
        ours, theirs, release_dir, hf_dir = build_pair(cfg, workdir)
        rows = make_rows(ours, theirs, release_dir, hf_dir, cfg)
        if cfg.profile:
            profile(rows[0], cfg)
            return {}
        load_before = os.getloadavg()
        results = []
        for row in rows:
            results.append(measure(row, cfg))
            print(f"{row.name}: ours/theirs {results[-1]['ratio']:.2f}x", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = dict(machine(), threads=torch.get_num_threads(), transformers=reference().__version__, command="python " + " ".join(sys.argv), config=cfg.config, device=cfg.device,
                dtype=cfg.dtype, repeats=cfg.repeats, sizes=asdict(SIZES[cfg.config]),
                load_average_before=load_before, load_average_after=os.getloadavg())
    print(f"\n{meta['date']} | {meta['cpu']} ({meta['cores']} cores, {meta['threads']} threads) | torch "
          f"{meta['torch']}, transformers {meta['transformers']} | config {cfg.config}, {cfg.device}, {cfg.dtype}, "
          f"median of {cfg.repeats} | load average {load_before[0]:.1f} -> {meta['load_average_after'][0]:.1f}\n")
    print(results_table(results))
    out = cfg.out or os.path.join("out", f"bench_{cfg.config}_{cfg.device}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=results), f, indent=2)
    print(f"\nwritten {out}")
    return dict(meta=meta, rows=results)


# ----------------------------------------------------------------------------------------------------------------
# Roofline (computed from the config, not measured)

@dataclass
class Hardware:  # one 8xH100 SXM node; datasheet peaks (dense bf16, no sparsity) and assumed storage paths
    gpus: int = 8
    hbm_bytes_per_s: float = 3.35e12
    flops_per_s: float = 989e12          # 1,979 with 2:4 sparsity, halved
    nvlink_bytes_per_s: float = 450e9     # per GPU per direction: ring all-gather / reduce-scatter bandwidth
    inter_node_bytes_per_s: float = 50e9  # per GPU per direction between nodes: 400 Gb/s, one NIC per GPU
    hbm_bytes: float = 80e9
    nvme_bytes_per_s: float = 7e9         # assumed: one PCIe 4.0 x4 NVMe drive
    host_bytes_per_s: float = 50e9        # assumed: page cache -> GPUs over PCIe 5.0, bounded by host DRAM


def model_costs(config: R1VConfig) -> dict:
    """Parameter counts, KV bytes per token, FLOPs per token/tile, from the module structure (bf16 = 2 bytes)."""
    t, v = config.llm, config.vision
    counts = count_params(config)
    embed = t.vocab_size * t.hidden_size
    dec_matmul = counts["language_model"] - embed          # embedding lookups read rows, they are not matmuls
    attn_width = t.num_attention_heads * t.head_dim
    patches = v.num_patches + 1                            # + CLS
    patch_conv = v.hidden_size * v.num_channels * v.patch_size ** 2
    vit_blocks = counts["vision_model"] - patch_conv - v.hidden_size * (patches + 1)  # minus conv, pos emb, CLS
    return dict(
        params=counts, dec_matmul=dec_matmul, lm_head=t.vocab_size * t.hidden_size,
        kv_bytes_per_token=2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2,  # K and V, bf16
        attn_flops_per_ctx_token=4 * t.num_hidden_layers * attn_width,  # QK^T and AV for one query, one key
        tile_flops=(2 * vit_blocks * patches + 2 * patch_conv * v.num_patches
                    + 4 * patches ** 2 * v.hidden_size * v.num_hidden_layers
                    + 2 * counts["mlp1"] * config.num_image_token),
        tokens_per_tile=config.num_image_token, hidden=t.hidden_size, layers=t.num_hidden_layers, vocab=t.vocab_size,
        # o_proj + down_proj: the row-parallel matrices, the only ones a TP refresh must move between GPUs (tp.py)
        row_parallel=t.num_hidden_layers * (attn_width + t.intermediate_size) * t.hidden_size,
        trained=counts["language_model"] + counts["mlp1"])  # GRPO's default trainable parts


def ring(n: int) -> float:
    """The share of a tensor each member of an n-member ring all-gather or reduce-scatter sends."""
    return (n - 1) / n


def decode_bound(c: dict, hw: Hardware, batch: int, context: int, fsdp: bool) -> dict:
    """One decode step, `batch` sequences per GPU each with `context` tokens of KV, per GPU.
    resident: weights stay in HBM, tensor-parallel over the node (tp.py, or an inference engine): each GPU reads
      1/gpus of the bf16 weights and, with the node's batch = gpus * batch split by KV head, batch sequences' worth
      of KV. Its NVLink traffic: two all-reduces of the node batch's [B,D] activations per layer and one after the
      vocabulary-parallel embedding (a ring all-reduce sends 2 (g-1)/g of the tensor per GPU), and the all-gather of
      the [B,V] logits ((g-1)/g), all bf16. 2 x layers + 2 collectives per step: their latency is not modelled.
    fsdp: generate() on the training shards (data parallel, batch sequences per GPU): every step all-gathers the
      decoder ((gpus-1)/gpus of it arrives over NVLink; the root unit's lm_head stays gathered between steps) and
      reads all of it from HBM. Each GPU holds its fp32 master shard (parallel.py); optimizer state not counted."""
    weights = 2 * c["dec_matmul"]
    kv = batch * context * c["kv_bytes_per_token"]
    flops = batch * (2 * c["dec_matmul"] + context * c["attn_flops_per_ctx_token"])
    hbm = (weights if fsdp else weights / hw.gpus) + kv
    rows = hw.gpus * batch
    if fsdp:
        comm = 2 * (c["params"]["language_model"] - c["lm_head"]) * ring(hw.gpus)
    else:
        comm = ring(hw.gpus) * 2 * rows * (2 * (2 * c["layers"] + 1) * c["hidden"] + c["vocab"])
    times = {"HBM": hbm / hw.hbm_bytes_per_s, "compute": flops / hw.flops_per_s, "NVLink": comm / hw.nvlink_bytes_per_s}
    bound = max(times, key=times.get)
    held = (4 if fsdp else 2) * c["params"]["total"] / hw.gpus
    return dict(mode="FSDP all-gather" if fsdp else "resident (TP)", batch=batch, context=context,
                hbm_bytes=hbm, nvlink_bytes=comm, flops=flops, step_s=times[bound], bound=bound,
                node_tokens_per_s=hw.gpus * batch / times[bound], weights_gb_per_gpu=held / 1e9,
                kv_gb_per_gpu=kv / 1e9, fits=held + kv < 0.9 * hw.hbm_bytes)  # 10% for activations, CUDA context


# The default GRPO recipe's prompts, as plan.py's: ~7 tiles of 256 image tokens + text
RECIPE_PROMPT_TOKENS, RECIPE_TILES = 2048, 7


def fsdp_collective_s(nbytes: float, hw: Hardware, nodes: int, hsdp: bool) -> float:
    """One FSDP all-gather or reduce-scatter of `nbytes` (the whole tensor). Sharded inside a node (one node, or
    HSDP) it runs over NVLink; sharded over all nodes (full FSDP) the ring crosses the network, whose bandwidth
    then bounds it."""
    if nodes == 1 or hsdp:
        return ring(hw.gpus) * nbytes / hw.nvlink_bytes_per_s
    return ring(hw.gpus * nodes) * nbytes / hw.inter_node_bytes_per_s


def grpo_step_bound(c: dict, hw: Hardware, g: GRPOConfig, tp: bool, nodes: int = 1, hsdp: bool = True,
                    prompt: int = RECIPE_PROMPT_TOKENS, tiles: int = RECIPE_TILES) -> dict:
    """Lower bound on one GRPO step of recipe g (grpo.py's defaults) per GPU on `nodes` nodes of hw.gpus GPUs,
    every response at max_new_tokens, each phase at the max of its compute, HBM and network times (perfect
    overlap), at 100% of the peaks. The step's prompts are split over all GPUs; TP generation stays inside a node.
    rollout    each prompt prefilled once (ViT once) and G rows decoded from it; a rank's rows in
               rollout_batch_size-sequence calls, each max_new_tokens decode steps (decode_bound, mean context);
               with TP all ranks of a node decode together, so the node batch is gpus x rollout_batch_size
    logprobs   the old policy's forward over every sequence, unless the update is one optimizer step
               (grpo.old_logprobs: the default recipe's case), and the reference's when beta > 0
    update     ppo_epochs forward + backward (+ a recomputed forward with activation checkpointing); FSDP per
               micro-batch: bf16 all-gathers in forward and backward, fp32 reduce-scatter, of the trained parts
               (fsdp_collective_s: inside a node, or across all nodes for full FSDP)
    replicate  HSDP on several nodes: per optimizer step, one fp32 all-reduce of each GPU's gradient shard
               across the nodes' replicas (a ring all-reduce sends twice ring(nodes) of it)
    refresh    TP only: the row-parallel matrices' fp32 all-to-all, and a read + bf16 write of 1/gpus of the decoder"""
    seqs = g.prompts_per_step * g.group_size // (hw.gpus * nodes)           # sequences per GPU
    length = prompt + g.max_new_tokens
    fwd_flops = length * (2 * c["dec_matmul"] + length / 2 * c["attn_flops_per_ctx_token"])  # one sequence, causal
    micro = -(-seqs // g.micro_batch_size)

    def per_micro(flops: float, nbytes: float) -> float:
        return micro * max(flops / micro / hw.flops_per_s, fsdp_collective_s(nbytes, hw, nodes, hsdp))

    step = decode_bound(c, hw, g.rollout_batch_size, prompt + g.max_new_tokens // 2, fsdp=not tp)
    prefill = seqs / g.group_size * (prompt * (2 * c["dec_matmul"] + prompt / 2 * c["attn_flops_per_ctx_token"])
                                     + tiles * c["tile_flops"])
    passes = (not on_policy(g, seqs)) + (g.beta > 0)  # the old policy (grpo.old_logprobs) and the reference
    recompute = 4 if g.grad_checkpointing else 3                           # x the forward: fwd + 2x bwd (+ fwd)
    opt_steps = g.ppo_epochs * -(-seqs // g.minibatch_size)
    phases = dict(
        rollout=prefill / hw.flops_per_s + -(-seqs // g.rollout_batch_size) * g.max_new_tokens * step["step_s"],
        logprobs=passes * per_micro(seqs * fwd_flops, 2 * c["trained"]),
        update=g.ppo_epochs * per_micro(recompute * seqs * fwd_flops, (2 + 2 + 4) * c["trained"]),
        replicate=(opt_steps * 2 * ring(nodes) * 4 * c["trained"] / hw.gpus / hw.inter_node_bytes_per_s
                   if hsdp and nodes > 1 else 0.0),
        refresh=(4 * c["row_parallel"] / hw.gpus * ring(hw.gpus) / hw.nvlink_bytes_per_s
                 + 6 * c["params"]["language_model"] / hw.gpus / hw.hbm_bytes_per_s) if tp else 0.0)
    return dict(generation="TP" if tp else "FSDP-gather", nodes=nodes,
                sharding="FSDP" if nodes == 1 else "HSDP" if hsdp else "full FSDP", seqs_per_gpu=seqs,
                decode_step=step, phases=phases, step_s=sum(phases.values()))


def multi_node(c: dict, hw: Hardware, g: GRPOConfig) -> list:
    """The GRPO step (TP generation) on 1, 2 and 4 nodes: HSDP and full FSDP, the same recipe's prompts."""
    return [grpo_step_bound(c, hw, g, True, nodes, hsdp) for nodes in (1, 2, 4)
            for hsdp in ((True, False) if nodes > 1 else (True,))]


def roofline(config_name: str = "r1v3-38b", context: int = 4096, hw: Hardware = Hardware()) -> dict:
    with open(os.path.join(ROOT, "tiny_configs", f"{config_name}.json")) as f:
        config = R1VConfig.from_dict(json.load(f), config_name)
    c = model_costs(config)
    p = c["params"]
    train_flops = 6 * c["dec_matmul"] + 3 * context * c["attn_flops_per_ctx_token"] / 2  # fwd+bwd, causal mean ctx
    fsdp_comm = (2 + 2 + 4) * p["total"] * (hw.gpus - 1) / hw.gpus  # bf16 gather fwd + bwd, fp32 reduce-scatter
    ckpt = 2 * p["total"]
    return dict(
        config=config_name, hardware=asdict(hw), costs=c,
        decode=[decode_bound(c, hw, b, context, fsdp) for fsdp in (False, True) for b in (1, 64)],
        grpo=[grpo_step_bound(c, hw, GRPOConfig(), tp) for tp in (False, True)], recipe=asdict(GRPOConfig()),
        nodes=multi_node(c, hw, GRPOConfig()),
        train=dict(flops_per_token=train_flops, node_tokens_per_s=hw.gpus * hw.flops_per_s / train_flops,
                   fsdp_bytes_per_microbatch=fsdp_comm,
                   min_tokens_per_gpu_microbatch=fsdp_comm / hw.nvlink_bytes_per_s * hw.flops_per_s / train_flops),
        tile=dict(flops=c["tile_flops"], node_tiles_per_s=hw.gpus * hw.flops_per_s / c["tile_flops"],
                  weight_read_s=2 * (p["vision_model"] + p["mlp1"]) / hw.hbm_bytes_per_s),
        load=dict(bytes=ckpt, nvme_s=ckpt / hw.nvme_bytes_per_s, host_s=ckpt / hw.host_bytes_per_s,
                  nvme_every_rank_full_s=hw.gpus * ckpt / hw.nvme_bytes_per_s))


def roofline_report(r: dict) -> str:
    c, p, hw, tr, tile, load = r["costs"], r["costs"]["params"], r["hardware"], r["train"], r["tile"], r["load"]
    g = hw["gpus"]
    out = [f"## Roofline: {r['config']} on {g}xH100 (COMPUTED from the config, not measured)", "",
           f"Parameters: ViT {p['vision_model'] / 1e9:.2f}B, connector {p['mlp1'] / 1e9:.3f}B, decoder "
           f"{p['language_model'] / 1e9:.2f}B ({c['dec_matmul'] / 1e9:.2f}B in matmuls), "
           f"total {p['total'] / 1e9:.2f}B. "
           f"bf16 weights and KV. Peaks: HBM {hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s, {hw['flops_per_s'] / 1e12:.0f} "
           f"TFLOP/s dense bf16, NVLink {hw['nvlink_bytes_per_s'] / 1e9:.0f} GB/s per direction per GPU.", "",
           f"KV cache: {c['kv_bytes_per_token']:,} bytes/token ({c['kv_bytes_per_token'] / 1024:.0f} KiB). "
           f"Context {r['decode'][0]['context']} tokens per sequence.", "",
           "### Rollout decode, one step (lower bound = max of HBM, compute, NVLink times; perfect overlap)", "",
           "| weights | seqs/GPU | HBM GB/GPU | NVLink GB/GPU | GFLOP/GPU | bound | step >= ms | node tokens/s <= "
           "| weights + KV GB/GPU | fits in 90% of HBM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in r["decode"]:
        out.append(f"| {d['mode']} | {d['batch']} | {d['hbm_bytes'] / 1e9:.1f} | {d['nvlink_bytes'] / 1e9:.1f} "
                   f"| {d['flops'] / 1e9:,.0f} | {d['bound']} | {d['step_s'] * 1e3:.1f} "
                   f"| {d['node_tokens_per_s']:,.0f} "
                   f"| {d['weights_gb_per_gpu']:.1f} + {d['kv_gb_per_gpu']:.1f} | {'yes' if d['fits'] else 'no'} |")
    res1, res64, fsdp1, fsdp64 = r["decode"]
    kv_room = 0.9 * hw["hbm_bytes"] - res64["weights_gb_per_gpu"] * 1e9  # bytes left for KV at resident weights
    catch_up = fsdp1["step_s"] * hw["flops_per_s"] / (2 * c["dec_matmul"])  # batch where compute = all-gather time
    out += ["", f"Under FSDP every decode step all-gathers the whole decoder ({fsdp1['nvlink_bytes'] / 1e9:.0f} GB "
            f"into each GPU): >= {fsdp1['step_s'] * 1e3:.0f} ms/step whatever the batch, "
            f"{fsdp1['step_s'] / res1['step_s']:.0f}x the resident-weight step at batch 1. Only batch amortises it: "
            f"compute catches up with the all-gather at ~{catch_up:,.0f} sequences per GPU, far beyond what a KV "
            f"cache holds. At 64 sequences/GPU FSDP gives "
            f"<= {fsdp64['node_tokens_per_s']:,.0f} tokens/s per node vs <= {res64['node_tokens_per_s']:,.0f} with "
            f"resident weights ({res64['node_tokens_per_s'] / fsdp64['node_tokens_per_s']:.1f}x), and 64 sequences "
            f"fit only with a mean context <= {kv_room / 64 / c['kv_bytes_per_token']:,.0f} tokens. So rollouts belong "
            f"in an engine that keeps the weights resident (gathered or resharded to tensor-parallel once per rollout "
            f"phase), not in generate() on FSDP shards.", "",
            *grpo_report(r), "", *nodes_report(r), "",
            "### Training (SFT / GRPO), per token", "",
            f"- FLOPs/token = 6 x {c['dec_matmul'] / 1e9:.1f}B + attention at {r['decode'][0]['context']} context = "
            f"{tr['flops_per_token'] / 1e9:.0f} GFLOP (+1 forward = 8N with activation checkpointing).",
            f"- Node upper bound at 100% MFU: {tr['node_tokens_per_s']:,.0f} tokens/s "
            f"(at a realistic 40% MFU: {0.4 * tr['node_tokens_per_s']:,.0f}).",
            f"- FSDP traffic per micro-batch (bf16 all-gather forward + backward, fp32 reduce-scatter): "
            f"{tr['fsdp_bytes_per_microbatch'] / 1e9:.0f} GB/GPU; hidden behind compute only with >= "
            f"{tr['min_tokens_per_gpu_microbatch']:,.0f} tokens per GPU per micro-batch (gradient accumulation "
            f"repeats the all-gathers every micro-batch).", "",
            "### Vision, per 448px tile", "",
            f"- ViT + connector: {tile['flops'] / 1e12:.1f} TFLOP/tile -> <= {tile['node_tiles_per_s']:,.0f} tiles/s "
            f"per node (compute-bound: reading the ViT weights takes {tile['weight_read_s'] * 1e3:.1f} ms, less than "
            f"one tile's {tile['flops'] / hw['flops_per_s'] * 1e3:.1f} ms of compute). Each tile is "
            f"{c['tokens_per_tile']} decoder tokens.", "",
            "### Checkpoint load (bf16)", "",
            f"- {load['bytes'] / 1e9:.1f} GB: >= {load['nvme_s']:.0f} s from one NVMe drive "
            f"({hw['nvme_bytes_per_s'] / 1e9:.0f} GB/s, assumed), >= {load['host_s']:.1f} s from the page cache "
            f"({hw['host_bytes_per_s'] / 1e9:.0f} GB/s, assumed), when each rank reads only its own rows "
            f"(checkpoint.py's sharded load). If every rank read the whole checkpoint: "
            f">= {load['nvme_every_rank_full_s']:.0f} s from NVMe."]
    return "\n".join(out)


def grpo_report(r: dict) -> list:
    """The default GRPO recipe's decode step and step time, FSDP-gather vs TP generation (grpo_step_bound)."""
    fsdp, tp = r["grpo"]
    g, ds = r["recipe"], [fsdp["decode_step"], tp["decode_step"]]
    out = ["### GRPO step, default recipe: FSDP-gather vs tensor-parallel generation (COMPUTED, not measured)", "",
           f"{g['prompts_per_step']} prompts x {g['group_size']} samples, prompts of {RECIPE_PROMPT_TOKENS} tokens "
           f"({RECIPE_TILES} tiles), every response at max_new_tokens = {g['max_new_tokens']}, "
           f"{g['rollout_batch_size']} sequences per generate call per GPU ({fsdp['seqs_per_gpu']} per GPU: "
           f"{fsdp['seqs_per_gpu'] // g['rollout_batch_size']} calls), ppo_epochs {g['ppo_epochs']}, micro-batch "
           f"{g['micro_batch_size']}, activation checkpointing {'on' if g['grad_checkpointing'] else 'off'}. "
           f"Lower bounds at 100% of the peaks, perfect overlap.", "",
           "| decode step at the recipe's batch | seqs/GPU | mean context | HBM GB/GPU | NVLink GB/GPU | bound "
           "| step >= ms |", "|---|---|---|---|---|---|---|"]
    out += [f"| {d['mode']} | {d['batch']} | {d['context']:,} | {d['hbm_bytes'] / 1e9:.1f} "
            f"| {d['nvlink_bytes'] / 1e9:.3f} | {d['bound']} | {d['step_s'] * 1e3:.1f} |" for d in ds]
    out += ["", "| phase | FSDP-gather generation, s >= | TP generation, s >= |", "|---|---|---|"]
    out += [f"| {k} | {fmt(fsdp['phases'][k])} | {fmt(tp['phases'][k])} |" for k in fsdp["phases"]]
    out += [f"| **GRPO step** | **{fsdp['step_s']:,.0f}** ({fsdp['step_s'] / 3600:.1f} h) | **{tp['step_s']:,.0f}** "
            f"({tp['step_s'] / 60:.1f} min) |", "",
            f"TP decode moves {ds[1]['nvlink_bytes'] / 1e6:.0f} MB of activations per GPU per step instead of "
            f"all-gathering {ds[0]['nvlink_bytes'] / 1e9:.0f} GB of weights: a {ds[0]['step_s'] / ds[1]['step_s']:.0f}x "
            f"shorter step, and a {fsdp['step_s'] / tp['step_s']:.1f}x shorter GRPO step. With TP the rollout is no "
            f"longer the whole step: the update ({tp['phases']['update']:,.0f} s at 100% MFU) is the same either way, "
            f"and the {2 * r['costs']['layers'] + 2} collectives per decode step cost their "
            f"latency on top of these bandwidth bounds."]
    return out


def nodes_report(r: dict) -> list:
    """The GRPO step with TP generation on 1, 2, 4 nodes: HSDP vs full FSDP (multi_node)."""
    hw, g, one = r["hardware"], r["recipe"], r["nodes"][0]
    out = [f"### GRPO step on 1, 2, 4 nodes of {hw['gpus']}xH100: HSDP vs full FSDP (COMPUTED, not measured)", "",
           f"The same recipe ({g['prompts_per_step']} prompts x {g['group_size']} samples) split over all GPUs; "
           f"TP generation inside each node, data-parallel across nodes. Network between nodes "
           f"{hw['inter_node_bytes_per_s'] * 8 / 1e9:.0f} Gb/s per GPU. HSDP shards the training state inside a "
           f"node (its all-gathers and reduce-scatters on NVLink) and replicates it across nodes: one fp32 "
           f"all-reduce of the gradient shards across nodes per optimizer step. Full FSDP shards over every GPU: "
           f"each micro-batch's all-gathers and reduce-scatter cross the network.", "",
           "| nodes | training | seqs/GPU | rollout s >= | update s >= | cross-node all-reduce s >= | GRPO step s >= "
           "| vs 1 node |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {n['nodes']} | {n['sharding']} | {n['seqs_per_gpu']} | {fmt(n['phases']['rollout'])} "
            f"| {fmt(n['phases']['update'])} | {fmt(n['phases']['replicate'])} | **{fmt(n['step_s'])}** "
            f"| {one['step_s'] / n['step_s']:.2f}x |" for n in r["nodes"]]
    return out


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> BenchConfig:
    """Every BenchConfig field is a flag (--repeats 3, --roofline); a bad value is one line naming the flag."""
    return parse_config(BenchConfig, argv, __doc__.split("\n")[0])


def main(cfg: BenchConfig):
    if cfg.rollout:
        from tools import bench_rollout  # rollout speed lives in its own file: this one compares against transformers
        return bench_rollout.run(cfg)
    if cfg.roofline:
        r = roofline(cfg.roofline_config, cfg.context, Hardware(inter_node_bytes_per_s=cfg.inter_node_gbps * 1e9 / 8))
        print(roofline_report(r))
        out = cfg.out or os.path.join("out", f"roofline_{cfg.roofline_config}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(r, f, indent=2)
        return r
    return run(cfg)


if __name__ == "__main__":
    main(parse_args())
