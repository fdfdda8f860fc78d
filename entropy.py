"""Critical-token entropy: per-token entropy of the policy, measured where the model starts a reflection.

Skywork-R1V3 (arXiv 2507.06167) observes that a model which really reasons is uncertain at reflection points
("Wait", "Alternatively", ...), while a model that only imitated long chains of thought during SFT emits those words
almost deterministically; the entropy at those critical tokens is used to select RL checkpoints. (High-entropy
"forking" tokens are the same idea, arXiv 2506.01939.) In the order of the method: find the critical tokens of a
response (the cue matcher), measure the entropy of every response token (teacher forcing, after sampling the
response or on a given one), score a checkpoint over a set of problems, pick a checkpoint; then the report (table,
histogram, curves over steps). The chunked log-prob / entropy function itself is model.token_logprobs_and_entropy.

    python entropy.py --ckpts out/sft "out/grpo/step_*" --data out/grpo/data/heldout.jsonl   # -> out/entropy/
"""
import bisect
import glob
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import cli
from checkpoint import by_saved_step, trained_step
from cli import UserError, at_least, check_choices, choice, parse_config
from data import IMG_CONTEXT, THINK_START, DataError, Tokenizer, check_prompts, encode_prompt, read_jsonl
from logs import plot_curves
from model import R1VConfig, token_logprobs_and_entropy
from parallel import LayoutFlags, load, setup
from rewards import accuracy_reward
from rollout import Engine, generate_responses
from tp import make_decoder, tp_fits

# Reflection cues, matched case-sensitively on decoded text (the lower-case forms are listed on purpose: "wait" in
# mid-sentence is as much a reflection as "Wait"). Latin cues match on word boundaries only ("Waiter" is not one).
DEFAULT_CUES = ("Wait", "wait", "But wait", "but wait", "Alternatively", "alternatively", "Hmm", "hmm", "However",
                "however", "Let me check", "let me check", "Actually", "actually",
                "等等", "等一下", "或者", "不过", "让我检查")


@dataclass
class EntropyConfig(LayoutFlags):  # + --replicate, --tp-size (parallel.py)
    ckpts: list = field(default_factory=list, metadata={"required": True})  # checkpoint dirs (globs are expanded)
    # JSONL {"images", "question", ["answer"], ["response" for --mode score]}
    data: str = field(default="", metadata={"required": True})
    out: str = "out/entropy/report.json"  # + report.md (the table), report_hist.png, report_steps.{jsonl,png}
    # generate: sample a response per record and score it; score: teacher-force the record's "response"
    mode: str = choice("generate", "score")
    max_new_tokens: int = 512     # response length limit (--mode generate)
    temperature: float = 1.0      # sampling temperature and the one entropy is measured at (as GRPO's); 0 = greedy,
                                  # measured at 1.0
    top_p: float = 1.0            # < 1 samples from a truncated distribution; entropy is still of the full one
    limit: int = 0                # score the first `limit` records only (0 = all)
    chunk: int = 1024             # tokens per lm_head chunk
    dtype: str = choice("", "bf16", "fp32")  # "" = bf16 on GPU, fp32 on CPU
    seed: int = 0                 # the same sampling stream for every checkpoint, so they answer comparably
    acc_tolerance: float = 0.02   # checkpoint pick: highest critical entropy within this of the best accuracy
    cues: tuple = DEFAULT_CUES    # the reflection words whose first token is a critical token

    def __post_init__(self):
        super().__post_init__()  # the layout
        check_choices(self)
        at_least(self, 1, "max_new_tokens", "chunk")
        at_least(self, 0, "temperature", "limit", "acc_tolerance")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.data and not os.path.isfile(self.data):
            raise ValueError(f"--data {self.data}: no such file")


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
# Per-token entropy of a response

@torch.no_grad()  # not inference_mode: FSDP2 re-fills its gathered weights in place in later forwards
def response_entropy(model, prompt_ids, pixel_values, response_ids, temperature=1.0, chunk=1024) -> list:
    """Teacher forcing: entropy (nats) of the distribution that produced each response token -> list [n].
    Position P-1+j of prompt + response predicts response token j. Under FSDP the forward gathers each unit in
    turn and the root unit (lm_head) stays gathered for the chunked entropy after it."""
    p, dev = len(prompt_ids), model.language_model.lm_head.weight.device
    ids = torch.tensor([prompt_ids + response_ids[:-1]], device=dev)
    pv = None if pixel_values is None else pixel_values.to(dev, model.language_model.lm_head.weight.dtype)
    hidden = model(ids, pv, return_hidden=True)[:, p - 1:]  # [1,n,D]
    _, ent = token_logprobs_and_entropy(model.language_model.lm_head, hidden, torch.tensor([response_ids], device=dev),
                                        temperature, chunk)
    return ent[0].tolist()


def generate_response(engine: Engine, prompt_ids, pixel_values, cfg: EntropyConfig, generator) -> list:
    """Sample one response -> its ids, up to and including the first stop token (rollout.generate_responses, as
    GRPO samples). <IMG_CONTEXT> stops it too, as in GRPO's rollouts: a tiny or early model can sample it, and fed
    back in teacher forcing it would ask for an image that does not exist (it stays the last token: a target only)."""
    model, tok = engine.model, engine.tok
    stop_ids = [tok.eos_id, model.config.img_context_token_id]
    return generate_responses(model, [(prompt_ids, pixel_values)], engine.ctx, pad_id=tok.pad_id, stop_ids=stop_ids,
                              batch_size=1, generator=generator, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, top_p=cfg.top_p, decoder=engine.decoder)[0][0]


def score_response(engine: Engine, rec: dict, cfg: EntropyConfig, generator) -> tuple[str, list, list]:
    """One record -> (response text, entropy of each response token [n], critical positions [(token index, cue)]).
    --mode generate samples the response (thinking-mode prompt); --mode score teacher-forces rec["response"]."""
    (model, tok, _, _), question, images = engine, rec["question"], rec.get("images", ())
    if cfg.mode == "score":
        thinking = not rec["response"].lstrip().startswith(THINK_START)  # the prompt must not open <think> twice
        prompt_ids, pv = encode_prompt(tok, model.config, question, images, thinking=thinking)
        response_ids = tok.encode(rec["response"]) + [tok.eos_id]
        if model.config.img_context_token_id in response_ids:
            raise ValueError(f"a response contains {IMG_CONTEXT}, which is reserved for image tokens: "
                             f"{rec['response'][:80]!r}")
    else:
        prompt_ids, pv = encode_prompt(tok, model.config, question, images)
        response_ids = generate_response(engine, prompt_ids, pv, cfg, generator)
    ent = response_entropy(model, prompt_ids, pv, response_ids, cfg.temperature or 1.0, cfg.chunk)
    text, cues = critical_positions(tok, response_ids, cfg.cues)
    return text, ent, cues


# ----------------------------------------------------------------------------------------------------------------
# Scoring one checkpoint

def score_checkpoint(ckpt_dir: str, records: list, cfg: EntropyConfig, ctx) -> tuple[dict, dict]:
    """-> (report, raw {"all": [...], "critical": [...]}) for one checkpoint. A checkpoint that fails to load gives a
    report with "error" set instead of raising: one broken step must not stop the ranking of the others."""
    report = {"ckpt": ckpt_dir, "step": trained_step(ckpt_dir), "error": None}
    try:
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
        # parallel.load: one process holds the model; under torchrun FSDP2 gives each rank 1/W of it, read from
        # the files row by row (the 38B in bf16 is 77 GB: no GPU holds it whole)
        model = load(ckpt_dir, ctx, train="none", dtype=ctx.dtype).eval()
        tok = Tokenizer.from_dir(ckpt_dir)
    except Exception as e:  # noqa: BLE001 -- any load failure (missing dir, bad config, truncated shard) is reported
        report["error"] = f"failed to load: {type(e).__name__}: {e}"
        return report, {"all": [], "critical": []}
    generator = torch.Generator(ctx.device).manual_seed(cfg.seed)  # every checkpoint gets the same sampling stream
    # generation through the tensor-parallel copy (tp.py; None on one process or when W does not divide the heads)
    tp = cfg.mode == "generate" and tp_fits(model.config.llm, ctx.world)
    decoder = make_decoder(model, ctx.dtype) if tp else None
    scored = score_share(Engine(model, tok, ctx, decoder), records, cfg, generator)
    del model, decoder
    return summarize(report, records, scored)


def score_share(engine: Engine, records: list, cfg: EntropyConfig, generator) -> list:
    """score_response for every record, each rank its share (records rank, rank + W, ...) -> all records' results
    in order, on every rank. Every rank makes the same number of calls (the lockstep rule, parallel.py): a rank
    with one record fewer scores its first record again and drops that result."""
    ctx = engine.ctx
    if ctx.world == 1:
        return [score_response(engine, rec, cfg, generator) for rec in records]
    mine = records[ctx.rank::ctx.world]
    slots = -(-len(records) // ctx.world)
    scored = [score_response(engine, rec, cfg, generator)
              for rec in mine + [records[0]] * (slots - len(mine))][:len(mine)]
    shares = [None] * ctx.world
    dist.all_gather_object(shares, scored)
    return [shares[i % ctx.world][i // ctx.world] for i in range(len(records))]


def summarize(report: dict, records: list, scored: list) -> tuple[dict, dict]:
    """Per-record (text, entropies, critical positions) -> (report: entropy at critical tokens and at all tokens,
    per cue, accuracy over records with an answer, three examples; raw values for the histogram)."""
    raw = {"all": [h for _, ent, _ in scored for h in ent],
           "critical": [ent[k] for _, ent, cues in scored for k, _ in cues]}
    per_cue = {}
    for _, ent, cues in scored:
        for k, cue in cues:
            per_cue.setdefault(cue, []).append(ent[k])
    answered = [(text, str(rec["answer"])) for (text, _, _), rec in zip(scored, records) if "answer" in rec]
    report.update(n_responses=len(records), n_empty=sum(not t.replace("<|im_end|>", "").strip() for t, _, _ in scored),
                  n_cues=len(raw["critical"]), critical=stats(raw["critical"]), all=stats(raw["all"]),
                  per_cue={c: {"n": len(v), "mean": float(np.mean(v))} for c, v in sorted(per_cue.items())},
                  accuracy=sum(accuracy_reward(t, a) for t, a in answered) / len(answered) if answered else None,
                  examples=[{"response": text[:400], "cues": [[cue, round(ent[k], 4)] for k, cue in cues[:10]]}
                            for text, ent, cues in scored[:3]])
    return report, raw


def stats(values) -> dict:
    """n, mean and percentiles; None (n/a), never NaN, when there is nothing to average."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p80": None, "p95": None}
    v = np.asarray(values, dtype=np.float64)
    p50, p80, p95 = np.percentile(v, [50, 80, 95]).tolist()
    return {"n": len(v), "mean": float(v.mean()), "p50": p50, "p80": p80, "p95": p95}


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
        # with every accuracy 0 the guard guards nothing: say so rather than pick quietly
        warn = "WARNING: every checkpoint's accuracy is 0, so the pick says nothing about reasoning; " * (best == 0)
        pool = [r for r in with_cues if r["accuracy"] is not None and r["accuracy"] >= best - acc_tolerance]
        if pool:
            r = max(pool, key=crit)
            return r, (f"{warn}highest critical-token entropy ({crit(r):.3f} nats over {r['n_cues']} cues) among the "
                       f"checkpoints within {acc_tolerance:g} of the best held-out accuracy ({best:.3f}); "
                       f"its accuracy is {r['accuracy']:.3f}")
        r = max((r for r in ok if r["accuracy"] is not None), key=lambda r: r["accuracy"])
        return r, (f"{warn}no checkpoint near the best accuracy emitted a reflection cue, so critical-token entropy is "
                   f"n/a: picked by held-out accuracy alone ({best:.3f})")
    if with_cues:
        r = max(with_cues, key=crit)
        return r, (f"highest critical-token entropy ({crit(r):.3f} nats over {r['n_cues']} cues); no answers were "
                   f"given, so accuracy could not guard against a merely noisy checkpoint")
    return None, "no checkpoint emitted a reflection cue and no answers were given: nothing to rank by"


# ----------------------------------------------------------------------------------------------------------------
# main: score every checkpoint, pick one

def expand_ckpts(patterns) -> list:
    """Shell-style patterns -> checkpoint dirs, in the order the patterns are given (`out/sft "out/grpo/step_*"`:
    the pipeline's order; steps restart with each run), each glob's matches ordered by saved step. An unmatched
    pattern stays (and reports not found)."""
    paths = [p for pat in patterns for p in (sorted(glob.glob(pat), key=by_saved_step) if glob.has_magic(pat) else [pat])
             or [pat]]
    return list(dict.fromkeys(paths))


def check_inputs(cfg: EntropyConfig, paths: list) -> list:
    """Before any weight is read: at least one of the checkpoints must be one (config.json), and every record of
    --data must be usable (data.read_jsonl: fields, images decoded; data.check_prompts: placeholders, prompt +
    --max-new-tokens, or + the record's response for --mode score, within the context). -> the records."""
    usable = [p for p in paths if os.path.isfile(os.path.join(p, "config.json"))]
    if not usable:
        raise UserError(f"no checkpoint to score: none of {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''} "
                        f"is a checkpoint directory (config.json)")
    records = read_jsonl(cfg.data, required=("question", "response") if cfg.mode == "score" else ("question",))
    records = records[:cfg.limit] if cfg.limit else records
    tok, config = Tokenizer.from_dir(usable[0]), R1VConfig.from_dir(usable[0])
    if cfg.mode == "score":
        bad = [f"{r.where}: 'response' must be a string" for r in records if not isinstance(r["response"], str)]
        if bad:
            raise UserError("\n".join(bad))
        new = lambda r: len(tok.encode(r["response"])) + 1  # noqa: E731  (+ <|im_end|>)
        problems = []
        for r in records:  # the prompt must not open <think> twice (score_response)
            try:
                check_prompts([r], tok, config, 0, new, thinking=not r["response"].lstrip().startswith(THINK_START))
            except DataError as e:
                problems += e.problems
        if problems:
            raise DataError(cfg.data, problems)
    else:
        check_prompts(records, tok, config, 0, cfg.max_new_tokens)
    return records


def run(cfg: EntropyConfig) -> dict:
    """Score every checkpoint of cfg.ckpts on cfg.data, pick one, report -> the report's json content."""
    if not cfg.ckpts:
        raise ValueError("no checkpoints given (--ckpts DIR [DIR ...])")
    paths = expand_ckpts(cfg.ckpts)
    records = check_inputs(cfg, paths)
    ctx = setup(cfg.dtype or None, cfg.seed, cfg)
    reports, raws = [], []
    for path in paths:
        report, raw = score_checkpoint(path, records, cfg, ctx)
        if ctx.is_main:
            print(f"{path}: " + (report["error"] or f"critical H {fmt(report['critical']['mean'])} over "
                                 f"{report['n_cues']} cues, mean H {fmt(report['all']['mean'])}, "
                                 f"accuracy {fmt(report['accuracy'])}"))
        reports.append(report)
        raws.append(raw)
    chosen, why = pick_checkpoint(reports, cfg.acc_tolerance)
    if all(r["error"] is not None for r in reports):  # a report of failures only: the command failed
        if ctx.is_main:
            write_report(cfg, reports, raws, chosen, why)
        raise UserError(f"no checkpoint could be loaded (the errors are in {cfg.out})")
    return write_report(cfg, reports, raws, chosen, why) if ctx.is_main else None  # rank 0 writes the report


# ----------------------------------------------------------------------------------------------------------------
# Reporting: the ranked table, the pick, the files (json, md; plots if matplotlib is installed)

def write_report(cfg: EntropyConfig, reports: list, raws: list, chosen: dict | None, why: str) -> dict:
    """Print the table and the pick; write cfg.out (json) and, beside it, <stem>.md, <stem>_hist.png (the pick's
    entropies) and <stem>_steps.{jsonl,png} (over steps) -> the json's content."""
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
    steps = [r["step"] for r in reports]
    # saved steps restart with each run (out/sft at step 110, then GRPO's step 20, 40, ...): then the x axis is the
    # checkpoints' order on the command line, not their steps
    by_step = None not in steps and steps == sorted(steps)
    rows = [{"step": r["step"] if by_step else i, "critical_entropy": r["critical"]["mean"],
             "mean_entropy": r["all"]["mean"], "accuracy": r["accuracy"]}
            for i, r in enumerate(reports) if r["error"] is None]
    rows = [{k: v for k, v in row.items() if v is not None} for row in rows]  # n/a points are left out
    with open(stem + "_steps.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in sorted(rows, key=lambda row: row["step"]))
    plot_curves(stem + "_steps.jsonl", stem + "_steps.png", ["critical_entropy", "mean_entropy", "accuracy"],
                xlabel="step" if by_step else "checkpoint (--ckpts order)")


def parse_args(argv=None) -> EntropyConfig:
    return parse_config(EntropyConfig, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    cli.main(run, parse_args())
