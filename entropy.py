"""Critical-token entropy: per-token entropy of the policy, measured where the model starts a reflection.

Skywork-R1V3 (arXiv 2507.06167) observes that a model which really reasons is uncertain at reflection points
("Wait", "Alternatively", ...), while a model that only imitated long chains of thought during SFT emits those words
almost deterministically; the entropy at those critical tokens is used to select RL checkpoints. (High-entropy
"forking" tokens are the same idea, arXiv 2506.01939.) This file holds the chunked log-prob / entropy function that
grpo.py and sft.py import, the cue matcher, scoring (generate-then-score or teacher forcing) and checkpoint ranking.
"""
import bisect
import glob
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from data import Tokenizer, build_prompt, image_tiles, read_jsonl
from model import SkyworkR1V, token_logprobs_and_entropy
from rewards import accuracy_reward
from cli import parse_flags
from logs import plot_curves
from parallel import setup

# Reflection cues, matched case-sensitively on decoded text (the lower-case forms are listed on purpose: "wait" in
# mid-sentence is as much a reflection as "Wait"). Latin cues match on word boundaries only ("Waiter" is not one).
DEFAULT_CUES = ("Wait", "wait", "But wait", "but wait", "Alternatively", "alternatively", "Hmm", "hmm", "However",
                "however", "Let me check", "let me check", "Actually", "actually",
                "等等", "等一下", "或者", "不过", "让我检查")


@dataclass
class EntropyConfig:
    ckpts: list = field(default_factory=list)  # checkpoint dirs (glob patterns are expanded)
    data: str = ""                # JSONL: {"images", "question", ["answer"], ["response" for --mode score]}
    out: str = "entropy_report.json"  # + <stem>.md table, <stem>_hist.png, <stem>_steps.{jsonl,png}
    mode: str = "generate"        # generate: sample a response per record and score it; score: teacher-force "response"
    max_new_tokens: int = 512
    temperature: float = 1.0      # sampling temperature and the one entropy is measured at (as GRPO's); 0 = greedy,
                                  # measured at 1.0
    top_p: float = 1.0            # < 1 samples from a truncated distribution; entropy is still of the full one
    limit: int = 0                # score the first `limit` records only (0 = all)
    chunk: int = 1024             # tokens per lm_head chunk
    dtype: str = ""               # bf16 | fp32; default bf16 on GPU, fp32 on CPU
    seed: int = 0                 # the same sampling stream for every checkpoint, so they answer comparably
    acc_tolerance: float = 0.02   # checkpoint pick: highest critical entropy within this of the best accuracy
    cues: tuple = DEFAULT_CUES


# ----------------------------------------------------------------------------------------------------------------
# Critical tokens: reflection cues found in the decoded text, mapped back to the tokens that produced them

def decode_with_offsets(tok: Tokenizer, ids) -> tuple[str, list]:
    """ids [n] -> (text, ends [n]): ends[k] = number of characters of text whose first byte lies in ids[:k+1], so
    character c was started by token bisect_right(ends, c).

    Byte-level BPE can split a character (Chinese, emoji) over several tokens; decoding a prefix that stops inside a
    character gives one U+FFFD for it, which counts it as started there. Prefixes are decoded from the last
    character boundary (as data.StreamDecoder does), so this is linear in the length, not quadratic."""
    text, ends, pending = "", [], []
    for i in ids:
        pending.append(int(i))
        piece = tok.decode(pending)
        ends.append(len(text) + len(piece))
        if not piece.endswith("\ufffd"):  # at a character boundary: commit
            text, pending = text + piece, []
    return text + (tok.decode(pending) if pending else ""), ends


def cue_pattern(cues) -> re.Pattern:
    """One alternation, longest cue first, so "But wait" wins over "wait" and each occurrence is counted once."""
    def one(cue):
        if re.fullmatch(r"[A-Za-z' ]+", cue):  # Latin: not inside a longer word ("Waiter", "somehow ever")
            return r"(?<![A-Za-z])" + re.escape(cue) + r"(?![A-Za-z])"
        return re.escape(cue)  # CJK has no spaces between words: match anywhere
    if not cues:
        raise ValueError("the cue list is empty")
    return re.compile("|".join(f"(?P<c{i}>{one(c)})" for i, c in sorted(enumerate(cues), key=lambda x: -len(x[1]))))


def critical_positions(tok: Tokenizer, ids, cues=DEFAULT_CUES) -> tuple[str, list]:
    """Response ids -> (text, [(token index, cue)]): for each cue occurrence, the token whose decoded span holds the
    cue's first character. " Wait", "Wait,", "wait" and "But wait" are found whatever the token boundaries."""
    text, ends = decode_with_offsets(tok, ids)
    found = [(bisect.bisect_right(ends, m.start()), cues[int(m.lastgroup[1:])])
             for m in cue_pattern(cues).finditer(text)]
    return text, [(k, cue) for k, cue in found if k < len(ids)]


# ----------------------------------------------------------------------------------------------------------------
# Scoring one checkpoint

def prompt_inputs(model, tok: Tokenizer, rec: dict, thinking: bool = True):
    """Record -> (prompt ids [P], pixel values [tiles,3,H,W] or None), as the release builds its chat prompt."""
    cfg = model.config
    tiles = [image_tiles(p, cfg) for p in rec["images"]]
    text = build_prompt(rec["question"], [t.shape[0] for t in tiles], cfg.num_image_token, thinking=thinking)
    return tok.encode(text), (torch.cat(tiles) if tiles else None)


@torch.inference_mode()
def response_entropy(model, prompt_ids, pixel_values, response_ids, temperature=1.0, chunk=1024) -> list:
    """Teacher forcing: entropy (nats) of the distribution that produced each response token -> list [n].
    Position P-1+j of prompt + response predicts response token j."""
    p, dev = len(prompt_ids), model.language_model.lm_head.weight.device
    ids = torch.tensor([prompt_ids + response_ids[:-1]], device=dev)
    pv = None if pixel_values is None else pixel_values.to(dev, model.language_model.lm_head.weight.dtype)
    hidden = model(ids, pv, return_hidden=True)[:, p - 1:]  # [1,n,D]
    _, ent = token_logprobs_and_entropy(model.language_model.lm_head, hidden, torch.tensor([response_ids], device=dev),
                                        temperature, chunk)
    return ent[0].tolist()


def generate_response(model, prompt_ids, pixel_values, eos_id, cfg: EntropyConfig, generator) -> list:
    """Sample one response -> its ids, up to and including the first eos."""
    dev = model.language_model.lm_head.weight.device
    pv = None if pixel_values is None else pixel_values.to(dev, model.language_model.lm_head.weight.dtype)
    seq = model.generate(torch.tensor([prompt_ids], device=dev), pv, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, eos_token_id=eos_id, generator=generator)
    out = seq[0, len(prompt_ids):].tolist()
    return out[:out.index(eos_id) + 1] if eos_id in out else out


def stats(values) -> dict:
    """n, mean and percentiles; None (n/a), never NaN, when there is nothing to average."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p80": None, "p95": None}
    v = np.asarray(values, dtype=np.float64)
    p50, p80, p95 = np.percentile(v, [50, 80, 95]).tolist()
    return {"n": len(v), "mean": float(v.mean()), "p50": p50, "p80": p80, "p95": p95}


def score_checkpoint(ckpt_dir: str, records: list, cfg: EntropyConfig, ctx) -> tuple[dict, dict]:
    """-> (report, raw {"all": [...], "critical": [...]}) for one checkpoint. A checkpoint that fails to load gives a
    report with "error" set instead of raising: one broken step must not stop the ranking of the others."""
    report = {"ckpt": ckpt_dir, "step": checkpoint_step(ckpt_dir), "error": None}
    raw = {"all": [], "critical": []}
    try:
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
        model = SkyworkR1V.from_pretrained(ckpt_dir, dtype=ctx.dtype, device=ctx.device).eval()
        tok = Tokenizer.from_dir(ckpt_dir)
    except Exception as e:  # noqa: BLE001 -- any load failure (missing dir, bad config, truncated shard) is reported
        report["error"] = f"failed to load: {type(e).__name__}: {e}"
        return report, raw
    from rewards import accuracy_reward  # late: grpo.py imports this file, so a top-level import would be circular
    generator = torch.Generator(ctx.device).manual_seed(cfg.seed)
    per_cue, correct, n_answers, n_empty, examples = {}, 0, 0, 0, []
    for rec in records:
        if cfg.mode == "score":
            response = rec["response"]
            thinking = not response.lstrip().startswith("<think>")  # the prompt must not open <think> twice
            prompt_ids, pv = prompt_inputs(model, tok, rec, thinking)
            response_ids = tok.encode(response) + [tok.eos_id]
        else:
            prompt_ids, pv = prompt_inputs(model, tok, rec)
            response_ids = generate_response(model, prompt_ids, pv, tok.eos_id, cfg, generator)
        ent = response_entropy(model, prompt_ids, pv, response_ids, cfg.temperature or 1.0, cfg.chunk)
        text, cues = critical_positions(tok, response_ids, cfg.cues)
        raw["all"] += ent
        for k, cue in cues:
            raw["critical"].append(ent[k])
            per_cue.setdefault(cue, []).append(ent[k])
        n_empty += not text.replace("<|im_end|>", "").strip()
        if "answer" in rec:
            n_answers += 1
            correct += accuracy_reward(text, str(rec["answer"]))
        if len(examples) < 3:
            examples.append({"response": text[:400], "cues": [[cue, round(ent[k], 4)] for k, cue in cues[:10]]})
    report.update(n_responses=len(records), n_empty=n_empty, n_cues=len(raw["critical"]),
                  critical=stats(raw["critical"]), all=stats(raw["all"]),
                  per_cue={c: {"n": len(v), "mean": float(np.mean(v))} for c, v in sorted(per_cue.items())},
                  accuracy=correct / n_answers if n_answers else None, examples=examples)
    return report, raw


def checkpoint_step(path: str):
    """Training step from a directory name like step_000200 (trailing digits), else None."""
    m = re.search(r"(\d+)$", os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint selection

def pick_checkpoint(reports: list, acc_tolerance: float = 0.02) -> tuple:
    """-> (chosen report or None, why). The paper's rule is to prefer the checkpoint whose reflection tokens are most
    uncertain. Entropy alone would also reward a broken model (a random one is maximally uncertain everywhere), so
    when answers are known only checkpoints within acc_tolerance of the best held-out accuracy are eligible."""
    ok = [r for r in reports if r["error"] is None]
    if not ok:
        return None, "no checkpoint could be loaded"
    crit = lambda r: r["critical"]["mean"]  # noqa: E731
    with_cues = [r for r in ok if crit(r) is not None]
    accs = [r["accuracy"] for r in ok if r["accuracy"] is not None]
    if accs:
        best = max(accs)
        pool = [r for r in with_cues if r["accuracy"] is not None and r["accuracy"] >= best - acc_tolerance]
        if pool:
            r = max(pool, key=crit)
            return r, (f"highest critical-token entropy ({crit(r):.3f} nats over {r['n_cues']} cues) among the "
                       f"checkpoints within {acc_tolerance:g} of the best held-out accuracy ({best:.3f}); "
                       f"its accuracy is {r['accuracy']:.3f}")
        r = max((r for r in ok if r["accuracy"] is not None), key=lambda r: r["accuracy"])
        return r, (f"no checkpoint near the best accuracy emitted a reflection cue, so critical-token entropy is n/a: "
                   f"picked by held-out accuracy alone ({best:.3f})")
    if with_cues:
        r = max(with_cues, key=crit)
        return r, (f"highest critical-token entropy ({crit(r):.3f} nats over {r['n_cues']} cues); no answers were "
                   f"given, so accuracy could not guard against a merely noisy checkpoint")
    return None, "no checkpoint emitted a reflection cue and no answers were given: nothing to rank by"


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_table(reports: list) -> str:
    """Markdown table, ranked by critical-token entropy (n/a and failed checkpoints last)."""
    def key(r):
        h = None if r["error"] is not None else r["critical"]["mean"]
        return (r["error"] is not None, h is None, -(h or 0.0))
    ranked = sorted(reports, key=key)
    lines = ["| rank | checkpoint | step | critical H (nats) | cues | mean H | p80 H | accuracy | note |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(ranked, 1):
        step = "-" if r["step"] is None else r["step"]
        if r["error"] is not None:
            lines.append(f"| - | {r['ckpt']} | {step} | n/a | n/a | n/a | n/a | n/a | {r['error'][:200]} |")
            continue
        note = (f"{r['n_empty']} empty responses" if r["n_empty"] else "") + ("; no cues" if not r["n_cues"] else "")
        lines.append(f"| {i} | {r['ckpt']} | {step} | {fmt(r['critical']['mean'])} | {r['n_cues']} | "
                     f"{fmt(r['all']['mean'])} | {fmt(r['all']['p80'])} | {fmt(r['accuracy'])} | {note.strip('; ')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib is optional)

def plot_histogram(raw: dict, png_path: str, title: str = "") -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {png_path} (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(0, max(raw["all"] + raw["critical"] + [1e-3]), 40)
    ax.hist(raw["all"], bins=bins, density=True, alpha=0.5, label=f"all tokens (n={len(raw['all'])})")
    if raw["critical"]:
        ax.hist(raw["critical"], bins=bins, density=True, alpha=0.6, label=f"critical (n={len(raw['critical'])})")
    ax.set_xlabel("entropy (nats)")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def plot_over_steps(reports: list, stem: str) -> None:
    """Critical-token entropy, mean entropy and accuracy per step, through logs.plot_curves (shared plumbing)."""
    rows = [{"step": r["step"] if r["step"] is not None else i, "critical_entropy": r["critical"]["mean"],
             "mean_entropy": r["all"]["mean"], "accuracy": r["accuracy"]}
            for i, r in enumerate(reports) if r["error"] is None]
    rows = [{k: v for k, v in row.items() if v is not None} for row in rows]  # n/a points are left out
    with open(stem + "_steps.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in sorted(rows, key=lambda row: row["step"]))
    plot_curves(stem + "_steps.jsonl", stem + "_steps.png", ["critical_entropy", "mean_entropy", "accuracy"])


# ----------------------------------------------------------------------------------------------------------------
# main

def expand_ckpts(patterns) -> list:
    """Shell-style patterns -> checkpoint dirs ordered by step; an unmatched pattern stays (and reports not found)."""
    paths = [p for pat in patterns for p in (sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]) or [pat]]
    return sorted(dict.fromkeys(paths), key=lambda p: (checkpoint_step(p) is None, checkpoint_step(p) or 0))


def run(cfg: EntropyConfig) -> dict:
    if cfg.mode not in ("generate", "score"):
        raise ValueError(f"--mode must be generate or score, got {cfg.mode!r}")
    if not cfg.ckpts:
        raise ValueError("no checkpoints given (--ckpts DIR [DIR ...])")
    records = read_jsonl(cfg.data, required=("question", "response") if cfg.mode == "score" else ("question",))
    records = records[:cfg.limit] if cfg.limit else records
    ctx = setup(cfg.dtype or None, cfg.seed)
    reports, raws = [], []
    for path in expand_ckpts(cfg.ckpts):
        report, raw = score_checkpoint(path, records, cfg, ctx)
        print(f"{path}: " + (report["error"] or f"critical H {fmt(report['critical']['mean'])} over "
                             f"{report['n_cues']} cues, mean H {fmt(report['all']['mean'])}, "
                             f"accuracy {fmt(report['accuracy'])}"))
        reports.append(report)
        raws.append(raw)
    chosen, why = pick_checkpoint(reports, cfg.acc_tolerance)
    table = format_table(reports)
    pick = f"pick: {chosen['ckpt'] if chosen else 'none'} -- {why}"
    print(table + "\n\n" + pick)
    stem = os.path.splitext(cfg.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    result = {"config": {**cfg.__dict__, "cues": list(cfg.cues)}, "checkpoints": reports,
              "pick": chosen["ckpt"] if chosen else None, "why": why}
    with open(cfg.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + pick + "\n")
    if chosen is not None:
        plot_histogram(raws[reports.index(chosen)], stem + "_hist.png", f"{chosen['ckpt']} ({cfg.mode})")
    if sum(r["error"] is None for r in reports) > 1:
        plot_over_steps(reports, stem)
    return result


def parse_args(argv=None) -> EntropyConfig:
    return EntropyConfig(**parse_flags(EntropyConfig, argv, __doc__.split("\n")[0]))


if __name__ == "__main__":
    run(parse_args())
