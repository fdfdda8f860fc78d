"""Rerun the main job over several seeds and write the README's results table.

For each seed S, in a fresh directory <root>/S: the default pipeline of `python grpo.py` (cold-start SFT, then GRPO
from it, with the tiny run's settings, grpo.TINY_RUN), then the critical-token entropy ranking of its checkpoints:

    python sft.py --seed S --steps 110 --out <root>/S/sft --synthetic-dir <root>/S/sft-data
    python grpo.py --ckpt <root>/S/sft --seed S --steps 40 --out-dir <root>/S/grpo <grpo.TINY_RUN as flags>
    python entropy.py --ckpts <root>/S/sft "<root>/S/grpo/step_*" --data <root>/S/grpo/data/heldout.jsonl \\
        --max-new-tokens 256 --seed S --out <root>/S/entropy/report.json

Seed S sets SFT's data and order and GRPO's problems and sampling; the random initial weights are the one tiny
checkpoint (out/tiny-init), so the spread is that of the recipe, not of the init. Seed 0 is `python grpo.py` itself.
Prints the markdown and writes it to <root>/results.md (+ results.json). Each command's output goes to a .log
beside its results.

    python docs/reproduce.py                                  # 3 seeds, ~15 min on 2 CPU cores
    python docs/reproduce.py --seeds 1 --sft-steps 20 --grpo-steps 4   # a quick check of the script
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import at_least, parse_config  # noqa: E402  (after the path: the repository's modules)
from grpo import TINY_RUN  # noqa: E402
from tools import machine  # noqa: E402


@dataclass
class ReproduceConfig:
    seeds: int = 3                # seeds 0 .. seeds-1
    sft_steps: int = 110          # the cold start of `python grpo.py`
    grpo_steps: int = 40
    entropy_tokens: int = 256     # new tokens per sampled response in the entropy ranking
    root: str = "out/seeds"       # <root>/<seed>/ is deleted and rewritten; a relative path is from the repository

    def __post_init__(self):
        at_least(self, 1, "seeds", "sft_steps", "grpo_steps", "entropy_tokens")


def as_flags(settings: dict) -> list:
    """{"lr": 1e-4, "bf16_moments": False} -> ["--lr", "0.0001", "--no-bf16-moments"] (cli.py's flag syntax)."""
    out = []
    for k, v in settings.items():
        flag = k.replace("_", "-")
        out += [f"--{flag}" if v else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
    return out


def commands(cfg: ReproduceConfig, seed: int, d: str) -> dict:
    """The three commands of one seed (run from the repository root), by stage."""
    grpo_run = {**TINY_RUN, "steps": cfg.grpo_steps}
    return {
        "sft": ["sft.py", "--seed", str(seed), "--steps", str(cfg.sft_steps), "--out", f"{d}/sft",
                "--synthetic-dir", f"{d}/sft-data"],
        "grpo": ["grpo.py", "--ckpt", f"{d}/sft", "--seed", str(seed), "--out-dir", f"{d}/grpo", *as_flags(grpo_run)],
        "entropy": ["entropy.py", "--ckpts", f"{d}/sft", f"{d}/grpo/step_*", "--data", f"{d}/grpo/data/heldout.jsonl",
                    "--max-new-tokens", str(cfg.entropy_tokens), "--seed", str(seed),
                    "--out", f"{d}/entropy/report.json"]}


def run_seed(cfg: ReproduceConfig, seed: int) -> dict:
    """Run one seed's three stages, each logged to <stage>.log -> its results (see results())."""
    d = os.path.join(cfg.root, str(seed))
    shutil.rmtree(d, ignore_errors=True)  # fresh: a stale step_* from a longer run would join the entropy ranking
    os.makedirs(d)
    secs = {}
    for stage, argv in commands(cfg, seed, d).items():
        t0 = time.time()
        print(f"seed {seed}: {stage} ...", end=" ", flush=True)
        with open(os.path.join(d, f"{stage}.log"), "w") as log:
            rc = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        secs[stage] = time.time() - t0
        print(f"{secs[stage]:.0f} s")
        if rc:
            with open(os.path.join(d, f"{stage}.log")) as f:
                sys.exit(f"seed {seed}: `python {shlex.join(argv)}` failed (exit {rc}); end of its log:\n"
                         + "".join(f.readlines()[-20:]))
    return results(d, seed, secs)


def results(d: str, seed: int, secs: dict) -> dict:
    """The numbers the table shows, read from the runs' own outputs."""
    def rows(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    sft_end = rows(f"{d}/sft.metrics.jsonl")[-1]
    heldout = [r["heldout_accuracy"] for r in rows(f"{d}/grpo/metrics.jsonl") if "heldout_accuracy" in r]
    with open(f"{d}/entropy/report.json") as f:
        report = json.load(f)
    ckpts = [{"name": os.path.basename(os.path.normpath(r["ckpt"])), "critical": r["critical"]["mean"],
              "mean": r["all"]["mean"], "cues": r["n_cues"], "accuracy": r["accuracy"]}
             for r in report["checkpoints"] if r["error"] is None]
    # entropy.py lists checkpoints by step, the step-less SFT model last; the table starts from it (changes are from it)
    ckpts.sort(key=lambda c: c["name"] != "sft")
    return {"seed": seed, "sft_format_rate": sft_end.get("format_rate"), "before": heldout[0], "after": heldout[-1],
            "checkpoints": ckpts, "pick": os.path.basename(os.path.normpath(report["pick"] or "none")),
            "secs": secs}


# ----------------------------------------------------------------------------------------------------------------
# The markdown

def num(x, digits=3, sign=False):
    return "n/a" if x is None else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def spread(xs: list, sign: bool = False) -> str:
    """'mean [min, max]' over seeds, or n/a."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{num(sum(xs) / len(xs), sign=sign)} [{num(min(xs), sign=sign)}, {num(max(xs), sign=sign)}]"


def change(c: dict, base: dict, key: str):
    return None if c.get(key) is None or base.get(key) is None else c[key] - base[key]


def minutes(s: float) -> str:
    return f"{int(s // 60)} min {int(s % 60):02d} s"


def accuracy_table(runs: list) -> list:
    lines = ["| seed | SFT format rate | held-out accuracy before GRPO | after | change | wall time |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {num(r['sft_format_rate'])} | {num(r['before'])} | {num(r['after'])} | "
                     f"{num(r['after'] - r['before'], sign=True)} | {minutes(sum(r['secs'].values()))} |")
    if len(runs) > 1:
        lines.append(f"| mean [range] | {spread([r['sft_format_rate'] for r in runs])} | "
                     f"{spread([r['before'] for r in runs])} | {spread([r['after'] for r in runs])} | "
                     f"{spread([r['after'] - r['before'] for r in runs], sign=True)} | |")
    return lines


def entropy_table(runs: list) -> list:
    """Per seed and checkpoint: critical and mean token entropy and their change from the SFT model; then the mean
    over seeds per checkpoint."""
    lines = ["| seed | checkpoint | critical H (nats) | change | mean H (nats) | change | cues | sampled accuracy | "
             "picked |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    by_name = {}
    for r in runs:
        base = next((c for c in r["checkpoints"] if c["name"] == "sft"), {})  # the starting point: the SFT model
        for c in r["checkpoints"]:
            c = {**c, "d_critical": change(c, base, "critical"), "d_mean": change(c, base, "mean")}
            lines.append(f"| {r['seed']} | {c['name']} | {num(c['critical'])} | {num(c['d_critical'], sign=True)} | "
                         f"{num(c['mean'])} | {num(c['d_mean'], sign=True)} | {c['cues']} | {num(c['accuracy'])} | "
                         f"{'yes' if c['name'] == r['pick'] else ''} |")
            by_name.setdefault(c["name"], []).append(c)
    if len(runs) > 1:
        for name, cs in by_name.items():
            col = lambda k, sign=False: spread([c[k] for c in cs], sign)  # noqa: E731
            lines.append(f"| mean [range] | {name} | {col('critical')} | {col('d_critical', True)} | {col('mean')} | "
                         f"{col('d_mean', True)} | | {col('accuracy')} | |")
    return lines


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, {m['gpu'] or 'no GPU'}; Python {m['python']}, torch {m['torch']}"


def markdown(cfg: ReproduceConfig, runs: list, wall: float) -> str:
    cmd = commands(cfg, "S", f"{cfg.root}/S")
    return "\n".join([
        f"### Default pipeline over {len(runs)} seed(s): {cfg.sft_steps} SFT steps, then {cfg.grpo_steps} GRPO steps",
        "", "Held-out accuracy: greedy answers to the 64 held-out problems (grpo.py's evaluation) before and after "
        "GRPO; the SFT format rate is sft.py's greedy evaluation of the same problems.", "",
        *accuracy_table(runs), "",
        f"Critical-token entropy (entropy.py: responses sampled at temperature 1, up to {cfg.entropy_tokens} new "
        f"tokens; change = from the SFT model; picked = entropy.py's choice):", "",
        *entropy_table(runs), "",
        f"{minutes(wall)} in all, {time.strftime('%Y-%m-%d')}, {machine_line()}.", "",
        "```", f"python docs/reproduce.py --seeds {cfg.seeds} --sft-steps {cfg.sft_steps} "
        f"--grpo-steps {cfg.grpo_steps}", "# runs, for each seed S:",
        *(f"python {shlex.join(argv)}" for argv in cmd.values()), "```"])


def main(cfg: ReproduceConfig) -> str:
    t0 = time.time()
    cfg.root = os.path.join(ROOT, cfg.root)  # the same place from any working directory (unchanged if absolute)
    runs = [run_seed(cfg, seed) for seed in range(cfg.seeds)]
    cfg.root = os.path.relpath(cfg.root, ROOT)  # the table shows commands as run from the repository root
    md = markdown(cfg, runs, time.time() - t0)
    print("\n" + md)
    with open(os.path.join(ROOT, cfg.root, "results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(ROOT, cfg.root, "results.json"), "w") as f:
        json.dump({"config": asdict(cfg), "runs": runs, "wall_sec": round(time.time() - t0, 1)}, f, indent=1)
    return md


if __name__ == "__main__":
    main(parse_config(ReproduceConfig, None, __doc__.split("\n")[0]))
