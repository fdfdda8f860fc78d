"""Training logs and run directories: one JSON line per step, text samples of rollouts and held-out answers, the
curves drawn from them (matplotlib optional; `python -m logs out/grpo/metrics.jsonl` redraws them), a run directory
that is never overwritten by accident and records its config, and a watch for runs that stop learning."""
import glob
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import MISSING, asdict, fields

from checkpoint import by_saved_step, trained_step
from cli import UserError


class MetricsLog:
    """One JSON object per step, appended (main rank only); resuming truncates entries after the resumed step.
    Also the run's text logs (rollouts.jsonl, heldout_answers.jsonl): write_rows puts a few rows under one step."""

    def __init__(self, path: str, enabled: bool = True, resume_step: int = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        rows = read_metrics(path) if resume_step is not None and os.path.isfile(path) else []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step)

    def write(self, step: int, metrics: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def write_rows(self, step: int, rows: list, limit: int = 0):
        """The first `limit` rows (0 = all), one line each, tagged with the step: a sample of a step's rollouts
        (prompt, response, reward, gold answer) or the held-out answers of an evaluation, as text to read."""
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n"
                             for r in (rows[:limit] if limit else rows))


def read_metrics(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Run directories: never overwrite a previous run by accident; say what the run was started with

def describe(path: str) -> str:
    """What a run's file or directory holds, in a few words: `metrics.jsonl (65 lines)`, `step_000020`, ..."""
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(path):
        if path.endswith(".jsonl"):
            with open(path, "rb") as f:
                return f"{name} ({sum(1 for line in f if line.strip())} lines)"
        return name
    entries = sorted(os.listdir(path))
    step = trained_step(path)
    inside = [describe(os.path.join(path, e)) if e.endswith(".jsonl") else e for e in entries[:6]]
    more = f", +{len(entries) - 6} more" if len(entries) > 6 else ""
    return f"{name}/ ({'checkpoint at step %d; ' % step if step is not None else ''}{', '.join(inside)}{more})"


def prepare_run(parts: list, config, *, resume: bool, overwrite: bool, config_path: str, preset: str = None,
                step: int = None, schedule: tuple = (), lr_at=None, is_main: bool = True, prog: str = "",
                barrier=None) -> dict:
    """Claim the run's files before anything is written, and record what the run starts with. Call it after the
    flags and the data are checked, before any weight is read.

    parts: the paths a run writes (its directory; for sft.py the checkpoint dir and the files beside it). If any
    holds something, the run is refused (UserError, one line naming what is there) unless --resume continues it
    or --overwrite deletes all of it first (stale step_* included, so a later --resume or an entropy.py glob never
    mixes two runs). Then the resolved config is printed and written to config_path with the preset it came from.
    Resuming (step = the saved step) compares it with the saved one: every changed flag is printed, and a change
    of a `schedule` flag warns with the learning rate at the resumed step before and after (lr_at(config dict,
    step) -> lr), since e.g. a larger --steps restarts the warmup-cosine curve from a different point.
    -> the saved config dict of the run being resumed, or None. Every rank checks; only is_main deletes, writes
    and prints, after `barrier` (parallel.barrier under torchrun), so no rank mistakes the new run for an old one."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run, or delete it")
    there = [p for p in parts if os.path.isfile(p) or (os.path.isdir(p) and os.listdir(p))]
    if there and not resume and not overwrite:
        raise UserError(f"{parts[0]} holds a previous run ({'; '.join(describe(p) for p in there)}): --resume "
                        f"continues it, --overwrite deletes it, or choose another output path")
    cfg = asdict(config)
    old = None
    if resume and os.path.isfile(config_path):
        with open(config_path) as f:
            old = json.load(f).get("config")
    if barrier is not None:
        barrier()
    if is_main:
        if overwrite and there:
            for p in there:
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            print(f"--overwrite: deleted the previous run ({', '.join(there)})")
        print(format_config(config, preset, prog))
        if old is not None:
            for line in config_changes(old, cfg, step, schedule, lr_at):
                print(line)
        os.makedirs(os.path.dirname(os.path.abspath(config_path)), exist_ok=True)
        with open(config_path, "w") as f:
            json.dump({"preset": preset, "resumed_at_step": step if resume else None, "argv": sys.argv[1:],
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "config": cfg}, f, indent=1)
            f.write("\n")
    return old


def changed_fields(config) -> set:
    """Names of the fields whose value is not the dataclass default (a flag or a preset set them)."""
    return {f.name for f in fields(config)
            if getattr(config, f.name) != (f.default_factory() if f.default_factory is not MISSING else f.default)}


def format_config(config, preset: str = None, prog: str = "") -> str:
    """The resolved config, a few fields a line; `*` marks a value that is not the dataclass default (a flag or
    the preset set it)."""
    changed = changed_fields(config)
    items = [f"{f.name}={getattr(config, f.name)!r}" + ("*" if f.name in changed else "") for f in fields(config)]
    lines, line = [], ""
    for item in items:
        if line and len(line) + len(item) > 116:
            lines.append(line)
            line = ""
        line += ("  " if line else "") + item
    head = f"{prog + ' ' if prog else ''}config" + (f" (preset: {preset})" if preset else "") + \
        " (* = not the default):"
    return "\n".join([head] + ["  " + x for x in lines + [line]])


def config_changes(old: dict, new: dict, step=None, schedule=(), lr_at=None) -> list:
    """Lines saying what a resumed run changes against the saved config, with a warning for schedule flags."""
    out = []
    changed = [k for k in new if k in old and old[k] != new[k] and k not in ("resume", "overwrite")]
    if changed:
        out.append("resuming with changed flags: " + ", ".join(f"--{k.replace('_', '-')} {old[k]!r} -> {new[k]!r}"
                                                              for k in changed))
    sched = [k for k in changed if k in schedule]
    if sched:
        at = ""
        if lr_at is not None and step is not None:
            at = (f": at step {step} the learning rate was {lr_at(old, step):.3g} on the saved run's curve and is "
                  f"{lr_at(new, step):.3g} on the new one")
        msg = (f"--{', --'.join(k.replace('_', '-') for k in sched)} changed on resume: the learning-rate schedule "
               f"is recomputed from the new values{at}")
        warnings.warn(msg)
        out.append("warning: " + msg)
    return out


def keep_last(out_dir: str, n: int, pattern: str = "step_*") -> list:
    """--keep-last N: delete all but the newest n checkpoints out_dir/pattern (checkpoint.by_saved_step's order)
    -> the deleted paths. n <= 0 keeps everything. Call it after a save has completed (the newest is whole)."""
    if n <= 0:
        return []
    dirs = [p for p in glob.glob(os.path.join(out_dir, pattern)) if os.path.isdir(p) and not p.endswith(".partial")]
    dirs.sort(key=by_saved_step)
    gone = dirs[:-n]
    for p in gone:
        shutil.rmtree(p)
    return gone


# ----------------------------------------------------------------------------------------------------------------
# Watching a run: is it learning anything?

def truncation_rate(responses: list, stop_ids, max_new_tokens: int) -> float:
    """Fraction of responses that hit max_new_tokens without a stop token: cut, so never answered. A high rate
    means --max-new-tokens is too small for the model's reasoning (or the model rambles)."""
    stop_ids = set(stop_ids)
    cut = [len(r) >= max_new_tokens and (not len(r) or int(r[-1]) not in stop_ids) for r in responses]
    return sum(cut) / max(len(cut), 1)


class FlatWatch:
    """Warns when a run stops learning: every group flat (all G rewards equal, so every advantage is 0) or a
    gradient norm of exactly 0, for `patience` steps in a row (and again every `patience` steps while it lasts).
    Such a run would otherwise finish "0.000 -> 0.000" with nothing said."""

    def __init__(self, patience: int = 5):
        self.patience, self.flat, self.zero = patience, 0, 0

    def update(self, step: int, flat_frac: float = None, grad_norm: float = None) -> str | None:
        self.flat = self.flat + 1 if flat_frac is not None and flat_frac >= 1.0 else 0
        self.zero = self.zero + 1 if grad_norm is not None and grad_norm == 0.0 else 0
        why = []
        if self.flat and self.flat % self.patience == 0:
            why.append(f"every group has been flat (all rewards of a group equal) for {self.flat} steps")
        if self.zero and self.zero % self.patience == 0:
            why.append(f"the gradient norm has been 0 for {self.zero} steps")
        if not why:
            return None
        msg = (f"step {step}: {' and '.join(why)}: nothing is being learnt. Read rollouts.jsonl: are answers "
               f"extracted (\\boxed{{}})? is every response cut at --max-new-tokens (truncation_rate)? is the task "
               f"too hard or too easy for this model?")
        warnings.warn(msg)
        return msg


# ----------------------------------------------------------------------------------------------------------------
# Curves

def smooth(values: list, weight: float = None) -> list:
    """Exponential moving average, debiased (as TensorBoard's smoothing); the weight grows with the run's length
    (0.6 for 20 points, 0.9 for 100+), so short curves stay close to their points."""
    if weight is None:
        weight = min(0.9, max(0.0, 1 - 8 / max(len(values), 1)))
    out, avg = [], 0.0
    for k, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** k) if weight else v)
    return out


def plot_curves(jsonl_path: str, png_path: str, keys=None, xlabel: str = "step") -> bool:
    """One panel per metric over steps, in a grid of at most 4 columns (8 metrics: 2 x 4), so each curve stays
    wide enough to read: the raw points faint, a smoothed line over them (from 10 points on). keys=None: every
    numeric metric in the file. Safe to call at every evaluation: a killed run keeps its last curves.
    matplotlib is optional: without it, say so and skip."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {png_path} (pip install matplotlib)")
        return False
    rows = read_metrics(jsonl_path)
    if keys is None:
        keys = list(dict.fromkeys(k for r in rows for k, v in r.items()
                                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)))
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return False
    n_rows = -(-len(keys) // 4)
    n_cols = -(-len(keys) // n_rows)  # 5 metrics: 2 x 3, not 2 x 4 with three empty panels
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = zip(*[(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))])
        if len(values) >= 10:
            ax.plot(steps, values, ".", alpha=0.3, color="C0", markersize=3)
            ax.plot(steps, smooth(list(values)), color="C0")
        else:
            ax.plot(steps, values, marker=".", color="C0")
        ax.set_title(key)
        ax.set_xlabel(xlabel)
        if key in ("lr", "grad_norm") and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    tmp = png_path + ".tmp.png"  # written whole, then renamed: a viewer never sees half a file
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, png_path)
    plt.close(fig)
    return True


def curves_path(jsonl_path: str) -> str:
    """Where a metrics file's curves go: out/sft.metrics.jsonl -> out/sft.png, out/grpo/metrics.jsonl ->
    out/grpo/curves.png."""
    if jsonl_path.endswith(".metrics.jsonl"):
        return jsonl_path.removesuffix(".metrics.jsonl") + ".png"
    return os.path.join(os.path.dirname(jsonl_path), "curves.png")



if __name__ == "__main__":  # python -m logs out/grpo/metrics.jsonl [--out curves.png] [--keys reward lr ...]
    import argparse

    p = argparse.ArgumentParser(description="Draw the curves of a metrics.jsonl (any run, finished or not).",
                                allow_abbrev=False)
    p.add_argument("metrics", help="a metrics JSONL: out/grpo/metrics.jsonl, out/sft.metrics.jsonl")
    p.add_argument("--out", default="", help="the PNG (default: curves.png beside it; out/sft.png for sft)")
    p.add_argument("--keys", nargs="+", default=None, help="the metrics to draw (default: every numeric one)")
    args = p.parse_args()
    if not os.path.isfile(args.metrics):
        p.exit(2, f"{p.prog}: error: {args.metrics}: no such file\n")
    out = args.out or curves_path(args.metrics)
    if plot_curves(args.metrics, out, args.keys):
        print(out)
