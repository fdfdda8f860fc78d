"""The command line: a bad flag value is one line on stderr naming the flag, exit 2, no traceback (cli.py).

Each script's own entry point is called in this process (importing torch again in a subprocess per case would
take seconds each); one subprocess test checks the real command end to end."""
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from cli import at_least, check_choices, choice, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> the function its __main__ hands the command line to (a parse_args, or a main(argv) returning its exit
# status)
ENTRY = {"sft.py": "parse_args", "entropy.py": "parse_args", "grpo.py": "parse_args", "sample.py": "main",
         "tools/plan.py": "main", "tools/bench.py": "parse_args"}


NO_CKPT = ["--ckpt", "no-such-ckpt"]  # sample.py must fail fast, never write a default checkpoint
CASES = [
    ("sft.py", ["--train", "vison"], "--train"),
    ("sft.py", ["--steps", "0"], "--steps"),
    ("sft.py", ["--lr", "fast"], "--lr"),
    ("sft.py", ["--data", "missing.jsonl"], "--data"),
    ("sft.py", ["--ckpt", "no-such-ckpt"], "--ckpt"),
    ("entropy.py", ["--ckpts", "a", "--data", "d.jsonl", "--mode", "sampel"], "--mode"),
    ("entropy.py", ["--data", "d.jsonl"], "--ckpts"),
    ("entropy.py", ["--ckpts", "a", "--data", "d.jsonl", "--dtype", "fp16"], "--dtype"),
    ("entropy.py", ["--ckpts", "a", "--data", "d.jsonl", "--top-p", "0"], "--top-p"),
    ("entropy.py", ["--ckpts", "a", "--data", "missing.jsonl"], "--data"),
    ("grpo.py", ["--steps", "x"], "--steps"),
    ("grpo.py", ["--group-size", "0"], "--group-size"),
    ("grpo.py", ["--train", "vison"], "--train"),
    ("sample.py", NO_CKPT + ["--dtype", "fp16"], "--dtype"),
    ("sample.py", NO_CKPT + ["--temperature", "-1"], "--temperature"),
    ("tools/plan.py", ["--seq", "x"], "--seq"),
    ("tools/plan.py", ["--gpus", "0"], "--gpus"),
    ("tools/bench.py", ["--config", "huge"], "--config"),
    ("tools/bench.py", ["--repeats", "x"], "--repeats"),
    ("tools/bench.py", ["--threads", "0"], "--threads"),
]


def exit_status(script: str, argv: list):
    """Run the script's entry point on argv -> its exit status: SystemExit's code, or what main(argv) returned;
    None if the flags were accepted (a parse_args returned a config)."""
    entry = getattr(importlib.import_module(script.removesuffix(".py").replace("/", ".")), ENTRY[script])
    try:
        status = entry(argv)
    except SystemExit as e:
        return e.code
    return status if isinstance(status, int) else None


@pytest.mark.parametrize("script, args, flag", CASES)
def test_bad_flag_is_one_line_exit_2(tmp_path, monkeypatch, capsys, script, args, flag):
    (tmp_path / "d.jsonl").write_text('{"question": "q"}\n')
    monkeypatch.chdir(tmp_path)  # an empty directory: nothing a failing command might write lands in the repository
    status = exit_status(script, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and flag in lines[0], (status, lines)
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_command_line_end_to_end(tmp_path):
    """The one subprocess: `python sft.py --train vison` as a user types it (the issue's example)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--train", "vison"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr and p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith("sft.py: error: ")
    assert "--train" in p.stderr and "vision" in p.stderr and os.listdir(tmp_path) == []


@dataclass
class Demo:
    mode: str = choice("fast", "slow")
    steps: int = 10
    names: list = field(default_factory=list, metadata={"required": True})

    def __post_init__(self):
        check_choices(self)
        at_least(self, 1, "steps")


def test_parse_config(capsys):
    cfg = parse_config(Demo, ["--names", "a", "b", "--steps", "3"], defaults={"mode": "slow", "steps": 5})
    assert (cfg.mode, cfg.steps, cfg.names) == ("slow", 3, ["a", "b"])  # flags win over defaults
    cfg = parse_config(Demo, ["--names", "a"], defaults=lambda flags: {"steps": 7 if "mode" in flags else 8})
    assert cfg.steps == 8
    for argv, words in ((["--names", "a", "--mode", "medium"], ["--mode", "'fast'", "'slow'"]),
                        (["--names", "a", "--steps", "0"], ["--steps", ">= 1"]),
                        (["--names", "a", "--steps", "x"], ["--steps", "'x'"]),
                        (["--steps", "2"], ["--names"])):
        with pytest.raises(SystemExit) as e:
            parse_config(Demo, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    with pytest.raises(ValueError, match="--mode"):  # the same rule for a config built in code
        Demo(mode="medium")


# ---------------------------------------------------------------------------------------------- --help (issue 23)

def help_blocks(script: str, capsys) -> dict:
    """`script --help` -> {first flag name: its entry as one line of words} (argparse wraps its columns)."""
    import re
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as e:
        getattr(module, ENTRY[script])(["--help"])
    assert e.value.code in (0, None)
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:", 1)[1])
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


@pytest.mark.parametrize("script, flag, words", [
    ("sft.py", "--max-len", ["tokens per sample, image tokens included", "(default: 1024)"]),
    ("sft.py", "--overwrite", ["delete what --out holds", "(default: False)"]),
    ("entropy.py", "--temperature", ["sampling temperature and the one entropy is measured at",
                                     "0 = greedy, measured at 1.0"]),  # a comment continued on the next line
    ("entropy.py", "--data", ["JSONL {\"images\", \"question\"", "(required)"]),  # the comment above the field
    ("sample.py", "--max-tiles", ["448px tiles per image", "(default: 0)"]),
    ("grpo.py", "--group-size", ["G responses per prompt", "(default: 8)"]),
    ("grpo.py", "--prompts-per-step", ["over all ranks", "(default: 64; preset tiny: 4)"]),  # the tiny run's value
])
def test_help_shows_each_flags_description_and_default(capsys, script, flag, words):
    entry = help_blocks(script, capsys)[flag]
    assert all(w in entry for w in words), entry


def test_every_field_has_a_description():
    """Every flag of the scripts' configs is described in --help: a new field without a comment fails here."""
    from dataclasses import fields
    from cli import field_comments
    import entropy
    import grpo
    import sample
    import sft
    import eval as ev
    for cls in (sft.SFTConfig, entropy.EntropyConfig, sample.SampleConfig, ev.EvalConfig):
        helps = field_comments(cls)
        assert all(helps.get(f.name) for f in fields(cls)), [f.name for f in fields(cls) if not helps.get(f.name)]
    assert set(field_comments(grpo.GRPOConfig)) == {f.name for f in fields(grpo.GRPOConfig)}


@dataclass
class Commented:
    steps: int = 10               # optimizer steps
    lr: float = 1e-3              # peak learning rate,
                                  # after warmup
    # the file to read, one record a line
    data: str = ""
    quiet: bool = field(default=False, metadata={"help": "say less"})  # (the metadata wins)


def test_field_comments():
    from cli import field_comments
    assert field_comments(Commented) == {"steps": "optimizer steps", "lr": "peak learning rate, after warmup",
                                         "data": "the file to read, one record a line", "quiet": "say less"}


def test_no_prefix_matching(capsys):
    """`--step 1` must not run as `--steps 1`: argparse's abbreviations are off."""
    assert exit_status("sft.py", ["--step", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unrecognized arguments: --step 1" in err
    assert parse_config(Demo, ["--names", "a", "--steps", "3"]).steps == 3


def test_main_turns_a_users_mistake_into_one_line_per_problem(capsys):
    from cli import UserError, main

    def fails(exc):
        raise exc

    for exc, lines in ((UserError("d.jsonl:3: empty 'answer'"), 1), (FileNotFoundError("no such file: x"), 1),
                       (UserError("d.jsonl:1: a\nd.jsonl:4: b"), 2)):
        with pytest.raises(SystemExit) as e:
            main(fails, exc, prog="x.py")
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == lines and all(line.startswith("x.py: error: d") or
                                                               "no such file" in line for line in err)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main(fails, KeyError("bug"))
    with pytest.raises(SystemExit) as e:
        main(lambda: 3)
    assert e.value.code == 3
