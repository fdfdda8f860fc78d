"""Training logs: one JSON line per step, and the curves drawn from them (matplotlib optional)."""
import json
import os


class MetricsLog:
    """One JSON object per step, appended (main rank only); resuming truncates entries after the resumed step."""

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


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl_path: str, png_path: str, keys) -> bool:
    """One panel per metric over steps, in a grid of at most 4 columns (8 metrics: 2 x 4), so each curve stays
    wide enough to read. matplotlib is optional: without it, say so and skip."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {png_path} (pip install matplotlib)")
        return False
    rows = read_metrics(jsonl_path)
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return False
    n_rows = -(-len(keys) // 4)
    n_cols = -(-len(keys) // n_rows)  # 5 metrics: 2 x 3, not 2 x 4 with three empty panels
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*pts), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True

