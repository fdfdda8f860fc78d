"""Run directories and debuggable runs (logs.py, issue 23): a previous run is never overwritten by accident, the
config a run starts with is printed and saved, a resume says what it changes; rollouts and held-out answers as
text, truncation rate, a warning when nothing is learnt, curves from metrics.jsonl, --keep-last."""
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest

import logs
from cli import UserError
from checkpoint import trained_step
from logs import (FlatWatch, MetricsLog, format_config, keep_last, plot_curves, prepare_run, read_metrics, smooth,
                  truncation_rate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RunConfig:
    steps: int = 10               # optimizer steps
    lr: float = 1e-3              # peak learning rate
    out_dir: str = "out/x"        # the run directory


def snapshot(root) -> dict:
    """{relative path: (bytes, mtime)} of every file under root: 'nothing changed on disk' made checkable."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


def fake_run(out_dir, steps=(20, 40)):
    """A previous run: metrics.jsonl, step_* checkpoints with their training state, curves."""
    os.makedirs(out_dir, exist_ok=True)
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
    for s in range(1, steps[-1] + 1):
        log.write(s, {"reward": s / 100})
    for s in steps:
        os.makedirs(os.path.join(out_dir, f"step_{s:06d}", "train_state"))
        with open(os.path.join(out_dir, f"step_{s:06d}", "train_state", "trainer_state.json"), "w") as f:
            json.dump({"step": s, "world_size": 1, "extra": {}}, f)
    with open(os.path.join(out_dir, "curves.png"), "wb") as f:
        f.write(b"png")


def claim(out_dir, cfg=None, **kw):
    kw = {"resume": False, "overwrite": False, **kw}
    return prepare_run([out_dir], cfg or RunConfig(out_dir=out_dir),
                       config_path=os.path.join(out_dir, "run_config.json"), **kw)


def test_rerun_into_an_existing_run_is_refused_with_nothing_changed(tmp_path):
    out = str(tmp_path / "grpo")
    fake_run(out)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        claim(out)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(out)
    assert "metrics.jsonl (40 lines)" in msg and "step_000040" in msg and "--resume" in msg and "--overwrite" in msg
    assert snapshot(tmp_path) == before
    claim(str(tmp_path / "fresh"))  # an empty or missing directory is fine
    os.makedirs(tmp_path / "empty")
    claim(str(tmp_path / "empty"))


def test_overwrite_clears_the_previous_run_stale_steps_included(tmp_path, capsys):
    out = str(tmp_path / "grpo")
    fake_run(out)
    claim(out, overwrite=True, preset="TINY_RUN")
    assert sorted(os.listdir(out)) == ["run_config.json"]  # no step_* of the old run left to resume or glob
    saved = json.load(open(os.path.join(out, "run_config.json")))
    assert saved["preset"] == "TINY_RUN" and saved["config"] == {"steps": 10, "lr": 1e-3, "out_dir": out}
    printed = capsys.readouterr().out
    assert "deleted the previous run" in printed and "(preset: TINY_RUN)" in printed and "steps=10" in printed
    with pytest.raises(UserError, match="contradict"):
        claim(out, resume=True, overwrite=True)


def test_sft_parts_beside_the_checkpoint_count_as_the_run(tmp_path):
    """sft.py's run is --out and the files beside it: a leftover metrics file alone is a previous run."""
    out = str(tmp_path / "sft")
    (tmp_path / "sft.metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(UserError, match=r"sft.metrics.jsonl \(1 lines\)"):
        prepare_run([out, out + ".metrics.jsonl"], RunConfig(), resume=False, overwrite=False,
                    config_path=out + ".run_config.json")


def test_resume_says_what_changes_and_warns_on_the_schedule(tmp_path, capsys):
    out = str(tmp_path / "run")
    claim(out)
    capsys.readouterr()
    lr = lambda c, s: c["lr"] * (1 - s / c["steps"])  # noqa: E731  (a schedule that depends on --steps)
    with pytest.warns(UserWarning, match="learning-rate schedule"):
        old = claim(out, RunConfig(steps=20, out_dir=out), resume=True, step=5, schedule=("steps", "lr"), lr_at=lr)
    assert old["steps"] == 10
    printed = capsys.readouterr().out
    assert "--steps 10 -> 20" in printed and "0.0005" in printed and "0.00075" in printed  # lr at step 5, old / new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing changed: no warning
        claim(out, RunConfig(steps=20, out_dir=out), resume=True, step=5, schedule=("steps", "lr"), lr_at=lr)
    assert "changed" not in capsys.readouterr().out


def test_every_rank_checks_before_rank_0_writes(tmp_path):
    """Under torchrun (sft.py passes parallel.barrier): every rank checks the run directory, then rank 0 writes
    run_config.json, so no rank can mistake the new run's file for a previous run. (Checked once by hand on 2 gloo
    ranks, `torchrun --nproc_per_node 2 sft.py` twice: the rerun is refused with one line from rank 0; too slow
    for the suite.)"""
    calls = []
    for out, is_main in ((str(tmp_path / "run"), True), (str(tmp_path / "other"), False)):
        def barrier():
            calls.append(os.path.exists(os.path.join(out, "run_config.json")))

        claim(out, barrier=barrier, is_main=is_main)
    assert calls == [False, False] and os.path.isfile(tmp_path / "run" / "run_config.json")
    assert not os.path.exists(tmp_path / "other")  # the other ranks check and wait, never write


def test_format_config_marks_what_is_not_the_default():
    text = format_config(RunConfig(steps=3), "TINY_RUN", "grpo.py")
    assert text.splitlines()[0] == "grpo.py config (preset: TINY_RUN) (* = not the default):"
    assert "steps=3*" in text and "lr=0.001 " in text + " "


def test_trained_step_reads_the_training_state_not_the_name(tmp_path):
    fake_run(str(tmp_path / "r"), steps=(7,))
    os.rename(tmp_path / "r" / "step_000007", tmp_path / "my-sft3")
    assert trained_step(str(tmp_path / "my-sft3")) == 7
    os.makedirs(tmp_path / "step_5")
    assert trained_step(str(tmp_path / "step_5")) is None


def test_keep_last(tmp_path):
    out = str(tmp_path / "grpo")
    fake_run(out, steps=(5, 10, 15, 20))
    os.makedirs(os.path.join(out, "step_000025.partial"))  # a save in progress is never counted or deleted
    assert keep_last(out, 0) == []
    gone = keep_last(out, 2)
    assert sorted(os.path.basename(p) for p in gone) == ["step_000005", "step_000010"]
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_000015", "step_000020",
                                                                           "step_000025.partial"]


# ---------------------------------------------------------------------------------------------- debuggable runs

def test_truncation_rate():
    stop = [9]
    assert truncation_rate([[1, 2, 9], [1, 2, 3], [1, 9], [4, 4, 4], [5]], stop, 3) == 0.4  # two hit the limit
    assert truncation_rate([[1, 2, 9]], stop, 3) == 0.0  # the stop token on the last allowed position: not cut
    assert truncation_rate([], stop, 3) == 0.0


def test_flat_watch_warns_after_n_steps_only():
    w = FlatWatch(patience=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert w.update(1, flat_frac=1.0, grad_norm=0.5) is None
        assert w.update(2, flat_frac=1.0, grad_norm=0.5) is None
        assert w.update(3, flat_frac=0.5, grad_norm=0.5) is None  # one group had signal: the count restarts
        assert w.update(4, flat_frac=1.0, grad_norm=0.5) is None
        assert w.update(5, flat_frac=1.0, grad_norm=0.5) is None
    with pytest.warns(UserWarning, match="every group has been flat .* for 3 steps"):
        assert "nothing is being learnt" in w.update(6, flat_frac=1.0, grad_norm=0.5)
    w = FlatWatch(patience=2)
    w.update(1, grad_norm=0.0)
    with pytest.warns(UserWarning, match="gradient norm has been 0 for 2 steps"):
        w.update(2, grad_norm=0.0)


def test_rollout_rows_and_resume_truncation(tmp_path):
    path = str(tmp_path / "rollouts.jsonl")
    log = MetricsLog(path)
    rows = [{"question": "q", "response": f"r{i}", "reward": 1.0, "answer": "2"} for i in range(5)]
    for step in (1, 2, 3):
        log.write_rows(step, rows, limit=2)
    got = read_metrics(path)
    assert len(got) == 6 and got[0] == {"step": 1, **rows[0]} and got[-1]["response"] == "r1"
    MetricsLog(path, resume_step=2)  # resuming from step 2 drops what step 3 wrote
    assert [r["step"] for r in read_metrics(path)] == [1, 1, 2, 2]


def test_smooth():
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    s = smooth([0.0, 1.0] * 50)
    assert max(s[50:]) - min(s[50:]) < 0.3  # the alternation is smoothed out


def test_curves_drawn_by_a_command_from_metrics_jsonl(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "grpo"
    os.makedirs(out)
    log = MetricsLog(str(out / "metrics.jsonl"))
    for s in range(1, 31):
        log.write(s, {"reward": s / 30, "grad_norm": 1.0 / s, "lr": 1e-4, "step_time": 2.0, "note": "text"})
    command(monkeypatch, str(out / "metrics.jsonl"))  # python -m logs out/grpo/metrics.jsonl
    assert (out / "curves.png").stat().st_size > 1000
    assert plot_curves(str(out / "metrics.jsonl"), str(tmp_path / "sft.png"), ["reward", "missing"])
    assert logs.curves_path("out/sft.metrics.jsonl") == "out/sft.png"
    with pytest.raises(SystemExit) as e:
        command(monkeypatch, str(tmp_path / "nope.jsonl"))
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


def command(monkeypatch, *argv):
    """`python -m logs *argv`, run in this process (runpy: the module's __main__ block, as the command runs it)."""
    import runpy
    monkeypatch.setattr(sys, "argv", ["logs.py", *argv])
    runpy.run_module("logs", run_name="__main__")


# ---------------------------------------------------------------------------------------------- grpo.py
def grpo_problem_file(tmp_path, bad_line=3):
    """A GRPO data file whose line `bad_line` names a truncated image."""
    from PIL import Image
    Image.new("RGB", (300, 200), "red").save(tmp_path / "ok.png")
    blob = open(tmp_path / "ok.png", "rb").read()
    (tmp_path / "cut.png").write_bytes(blob[:len(blob) // 2])
    rows = [{"images": ["ok.png"], "question": "How many?", "answer": "1"}] * 4
    if bad_line:
        rows[bad_line - 1] = {"images": ["cut.png"], "question": "How many?", "answer": "1"}
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "math.jsonl")


def test_grpo_corrupt_image_is_found_before_any_weight_is_read(tiny_ckpt, tmp_path, monkeypatch):
    import grpo
    from data import DataError
    data = grpo_problem_file(tmp_path)
    monkeypatch.setattr(grpo, "load", lambda *a, **k: pytest.fail("weights were read"))
    cfg = grpo.GRPOConfig(ckpt=tiny_ckpt, data=data, out_dir=str(tmp_path / "run"), **grpo.TINY_RUN)
    with pytest.raises(DataError) as e:
        grpo.train(cfg)
    assert str(e.value).startswith(f"{data}:3: image 'cut.png'") and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_grpo_command_corrupt_image_is_one_line_exit_2(tiny_ckpt, tmp_path):
    data = grpo_problem_file(tmp_path)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--ckpt", tiny_ckpt, "--data", data,
                        "--out-dir", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and f"{data}:3: image 'cut.png'" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_grpo_rerun_into_an_existing_run_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    import grpo
    out = str(tmp_path / "run")
    fake_run(out)
    monkeypatch.setattr(grpo, "load", lambda *a, **k: pytest.fail("weights were read"))
    cfg = grpo.GRPOConfig(ckpt=tiny_ckpt, out_dir=out, data=grpo_problem_file(tmp_path, None), **grpo.TINY_RUN)
    before = snapshot(out)
    with pytest.raises(UserError, match="holds a previous run"):
        grpo.train(cfg)
    assert snapshot(out) == before


def test_grpo_has_overwrite_and_keep_last_flags():
    import grpo
    cfg = grpo.parse_args(["--overwrite", "--keep-last", "2"])
    assert cfg.overwrite and cfg.keep_last == 2
