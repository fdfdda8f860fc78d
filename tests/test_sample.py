"""Tests for sample.py: batching with left padding, streaming, the default run, and clear input errors."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import R1VConfig, SkyworkR1V  # noqa: E402
from sample import Progress, SampleConfig, check_context, generate, main, make_request  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are microseconds of work; on a shared, busy CPU every multi-threaded op also waits
    ~20 ms for its second thread, which made these tests 3x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return SkyworkR1V.from_pretrained(tiny_ckpt), Tokenizer.from_dir(tiny_ckpt), R1VConfig.from_dir(tiny_ckpt)


def save_image(path, size=(56, 56), seed=0):  # square: 1 tile (a 4:3 image gets 4x3 tiles + thumbnail)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return str(path)


def run(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # a flag value the config rejects: cli.parse_config's one-line usage error
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------------------------
# Generation

def test_batched_generation_equals_each_prompt_alone(loaded, tmp_path):
    model, tok, c = loaded
    small, wide = save_image(tmp_path / "small.png"), save_image(tmp_path / "wide.png", (900, 300), seed=1)
    cfg = SampleConfig(greedy=True, max_new_tokens=12)  # repetition penalty 1.05 stays on: it must ignore padding
    reqs = [make_request("<image>\nWhat colour is it?", [small], tok, c, cfg, "a"),
            make_request("Count to three.", [], tok, c, cfg, "b"),  # no image at all in this row
            make_request("Compare <image> with <image>.", [wide, small], tok, c, cfg, "c")]  # 4 + 1 tiles
    assert len({len(r.ids) for r in reqs}) == 3  # three lengths: two rows are left-padded
    batched = generate(model, tok, reqs, cfg)
    alone = [generate(model, tok, [r], cfg)[0] for r in reqs]
    assert batched == alone
    assert any(batched)


def test_streamed_text_equals_final_decode(loaded, tmp_path):
    model, tok, c = loaded
    cfg = SampleConfig(temperature=1.0, top_p=1.0, max_new_tokens=48, seed=3)  # sampling: varied tokens
    req = make_request("<image>\nDescribe it.", [save_image(tmp_path / "a.png")], tok, c, cfg, "a")
    out = io.StringIO()
    progress = Progress(tok, out)
    ids = generate(model, tok, [req], cfg, progress)[0]
    progress.finish()
    assert ids and out.getvalue() == tok.decode(ids, skip_special=True)
    assert sum(progress.steps) >= len(ids) > len(progress.times)  # every step's token, a few per callback


def test_stream_holds_back_split_characters_and_skips_eos(loaded, monkeypatch):
    """Multi-byte characters split over byte-level tokens come out whole; <|im_end|> is not printed."""
    model, tok, c = loaded
    text = "你好 😀 x^2 = 4"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters really are split over tokens

    def fake_generate(input_ids, *args, stream=None, **kwargs):
        new = ids + [tok.eos_id]
        for t in new:
            stream(torch.tensor([t]))
        return torch.cat([input_ids, torch.tensor([new])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    chunks = []
    out = type("Out", (), {"write": lambda self, s: chunks.append(s), "flush": lambda self: None})()
    progress = Progress(tok, out)
    cfg = SampleConfig()
    got = generate(model, tok, [make_request("hi", [], tok, c, cfg, "a")], cfg, progress)[0]
    progress.finish()
    assert got == ids and "".join(chunks) == text
    assert not any("\ufffd" in s for s in chunks)


def test_main_streams_single_prompt(tiny_ckpt, tmp_path, capsys):
    img = save_image(tmp_path / "a.png")
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, "--image", img, "--prompt", "<image>\nWhat is it?",
                       "--max-new-tokens", 6, "--greedy")
    assert rc == 0 and out.startswith("<think>\n")
    assert "tokens/s" in err


def test_main_repeats_the_answer_after_the_reasoning(tiny_ckpt, capsys, monkeypatch):
    tok = Tokenizer.from_dir(tiny_ckpt)
    reply = tok.encode("Two red shapes.\n</think>\n\nThe answer is \\boxed{2}.") + [tok.eos_id]

    def fake_generate(self, input_ids, *args, stream=None, **kwargs):
        for t in reply:
            stream(torch.tensor([t]))
        return torch.cat([input_ids, torch.tensor([reply])], dim=1)

    monkeypatch.setattr(SkyworkR1V, "generate", fake_generate)
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, "--prompt", "How many?")
    assert rc == 0 and out == ("<think>\nTwo red shapes.\n</think>\n\nThe answer is \\boxed{2}.\n\n"
                               "--- answer ---\nThe answer is \\boxed{2}.\n\n")


def test_main_prompts_jsonl_one_json_line_each(tiny_ckpt, tmp_path, capsys):
    save_image(tmp_path / "a.png")
    records = [{"images": ["a.png"], "question": "What is it?"}, {"question": "Say hi."},
               {"images": ["a.png", "a.png"], "question": "<image> or <image>?"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, "--prompts", tmp_path / "p.jsonl", "--greedy",
                       "--max-new-tokens", 5, "--batch-size", 2, "--no-think")
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [x["question"] for x in lines] == [r["question"] for r in records]
    for x, r in zip(lines, records):
        assert set(x) == set(r) | {"response", "thinking", "extracted_answer"} and x.get("images") == r.get("images")
        assert x["thinking"] is None and x["extracted_answer"] == x["response"].strip()  # --no-think: no <think>


def test_default_run_without_ckpt(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """No --ckpt: a tiny checkpoint is written on first use; a trained out/sft is preferred once it exists."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "--max-new-tokens", 3)
    assert rc == 0 and "using out/tiny-init" in err and "synthetic image" in err
    assert os.path.isfile("out/tiny-init/config.json") and out.startswith("<think>\n")
    shutil.copytree(tiny_ckpt, "out/sft")
    rc, out, err = run(capsys, "--max-new-tokens", 3)
    assert rc == 0 and "using out/sft" in err


# ----------------------------------------------------------------------------------------------------------------
# Errors: one line on stderr naming the problem, exit code 2, before any model compute

def _truncated(path):
    save_image(path, (200, 200))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("setup, argv, pattern", [
    (None, ["--image", "{d}/nope.png", "--prompt", "q"], r"image file not found: .*nope\.png"),
    (lambda d: open(f"{d}/x.png", "w").write("not a png"), ["--image", "{d}/x.png", "--prompt", "q"],
     r"x\.png is not an image"),
    (lambda d: _truncated(f"{d}/t.png"), ["--image", "{d}/t.png", "--prompt", "q"], r"t\.png: truncated"),
    (lambda d: save_image(f"{d}/a.png"), ["--image", "{d}/a.png", "--prompt", "<image> vs <image>"],
     r"--prompt: the prompt has 2 <image> placeholders but 1 images"),
    (lambda d: save_image(f"{d}/a.png"), ["--image", "{d}/a.png", "--image", "{d}/a.png", "--prompt", "<image>?"],
     r"1 <image> placeholders but 2 images"),
    (None, ["--prompt", "<image> what is this?"], r"1 <image> placeholders but 0 images"),
    (lambda d: save_image(f"{d}/a.png"), ["--image", "{d}/a.png", "--prompt", "q", "--max-new-tokens", "8000"],
     r"the prompt has \d+ tokens \(256 of them for 1 image tiles x 256\) \+ --max-new-tokens 8000 = \d+, more "
     r"than the model's context of 8192"),
    (None, ["--prompt", "what is <IMG_CONTEXT>?"], r"literal text <IMG_CONTEXT>"),
    (lambda d: open(f"{d}/p.jsonl", "w").write('{"question": "a"}\n{"question": \n'), ["--prompts", "{d}/p.jsonl"],
     r"p\.jsonl:2: invalid JSON"),
    (lambda d: open(f"{d}/p.jsonl", "w").write('{"question": "a"}\n{"question": "<image>"}\n'),
     ["--prompts", "{d}/p.jsonl"], r"p\.jsonl:2: the prompt has 1 <image> placeholders but 0 images"),
    (lambda d: open(f"{d}/p.jsonl", "w").write('{"question": 5}\n'), ["--prompts", "{d}/p.jsonl"],
     r"p\.jsonl:1: 'question' must be a non-empty string"),
    (lambda d: save_image(f"{d}/a.png"), ["--image", "{d}/a.png"], r"--image needs a --prompt"),
    (None, ["--prompt", "q", "--dtype", "fp8"], r"--dtype: invalid choice: 'fp8'"),
    (None, ["--prompt", "q", "--max-new-tokens", "0"], r"--max-new-tokens must be >= 1, got 0"),
], ids=["missing", "not-image", "truncated", "more-placeholders", "more-images", "no-images", "context",
        "img-context-text", "jsonl-line", "jsonl-record", "jsonl-question", "image-no-prompt", "dtype", "no-new-tokens"])
def test_input_errors_are_one_clear_line(tiny_ckpt, tmp_path, capsys, setup, argv, pattern):
    if setup:
        setup(tmp_path)
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, *[a.format(d=tmp_path) for a in argv])
    assert rc == 2 and out == ""
    assert __import__("re").match(r"\S+: error: ", err) and err.count("\n") == 1, err
    assert __import__("re").search(pattern, err), err


def test_decompression_bomb(tiny_ckpt, tmp_path, capsys, monkeypatch):
    img = save_image(tmp_path / "bomb.png", (100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is now a bomb
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, "--image", img, "--prompt", "q")
    assert rc == 2 and "bomb.png: refusing to decode a possible decompression bomb" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_gpu(tiny_ckpt, capsys):
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, "--prompt", "q", "--device", "cuda")
    assert rc == 2 and "no CUDA GPU" in err


def test_missing_checkpoint(tmp_path, capsys):
    rc, out, err = run(capsys, "--ckpt", tmp_path / "nope", "--prompt", "q")
    assert rc == 2 and "no config.json" in err


def test_context_check_runs_before_any_model_compute(tiny_ckpt, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the model was touched")

    for cls, name in ((SkyworkR1V, "forward"), (SkyworkR1V, "generate"), (SkyworkR1V, "from_pretrained"),
                      (checkpoint, "load_weights")):
        monkeypatch.setattr(cls, name, boom)
    img = save_image(tmp_path / "a.png", (900, 300))  # 3 tiles + thumbnail
    argv = ["--ckpt", tiny_ckpt, "--image", img, "--prompt", "<image> what?"]
    rc, out, err = run(capsys, *argv, "--max-new-tokens", 7500)
    assert rc == 2 and "1024 of them for 4 image tiles" in err and "context of 8192" in err
    with pytest.raises(AssertionError, match="touched"):  # the patches do bite once the input is fine
        main(argv + ["--max-new-tokens", "4"])


def test_context_limit_is_exact(loaded):
    model, tok, c = loaded
    req = make_request("hello", [], tok, c, SampleConfig(), "a")
    room = c.llm.max_position_embeddings - len(req.ids)
    check_context([req], room, c)  # exactly full is fine: generate() accepts it too
    with pytest.raises(ValueError, match="context"):
        check_context([req], room + 1, c)
    with pytest.raises(ValueError, match="context"):  # and generate() itself agrees on the limit
        model.generate(torch.tensor([req.ids]), max_new_tokens=room + 1)


@pytest.fixture(scope="module")
def one_process(tiny_ckpt, tmp_path_factory) -> tuple[list, str]:
    """-> (sample.py's arguments for a prompt with an image, what `python sample.py --greedy` prints with them)."""
    args = ["sample.py", "--ckpt", tiny_ckpt, "--greedy", "--max-new-tokens", "12", "--image",
            save_image(tmp_path_factory.mktemp("img") / "a.png"), "--prompt", "<image>\nWhat is shown?"]
    one = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and one.stdout.strip(), one.stderr[-2000:]
    return args, one.stdout


@pytest.mark.parametrize("nproc, layout", [(2, []), (4, ["--replicate", "2"])], ids=["2-ranks", "4-ranks-replicate-2"])
def test_torchrun_prints_the_single_process_text(one_process, nproc, layout):
    """`torchrun --nproc_per_node 2 sample.py --greedy` (FSDP2 shards, tensor-parallel decode) prints exactly what
    one process prints, for a prompt with an image; so does a job of 4 ranks as 2 HSDP replicas of 2 (two
    tensor-parallel groups, the second without a row: the one prompt is rank 0's). The decode from the FSDP shards
    (--no-tp) is checked on forked ranks below (test_torchrun_decodes_each_row_once)."""
    args, one = one_process
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(nproc), *args, *layout], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in two.stderr.splitlines() if re.search(r"error|terminate|abort|exception", line, re.I)]
    assert two.returncode == 0, (errors[:20], two.stderr[-2000:])
    assert two.stdout == one


def ranks_worker(rank, argv, out_dir):
    """One rank of a 2-rank sample.py job, in a spawned process: rank 0's stdout and each rank's decoded row counts
    (the rows the decode loop ran, after the tensor-parallel gather) go to files."""
    import model as model_py
    real, rows = model_py.Qwen2ForCausalLM.decode, []

    def counting(self, x, *args, **kw):
        rows.append(x.shape[0])
        return real(self, x, *args, **kw)
    model_py.Qwen2ForCausalLM.decode = counting
    with open(os.path.join(out_dir, f"stdout{rank}"), "w") as out, contextlib.redirect_stdout(out):
        assert main(argv) == 0
    with open(os.path.join(out_dir, f"rows{rank}"), "w") as f:
        json.dump(rows, f)


@pytest.mark.parametrize("layout, rows", [([], [[2, 1], [2, 1]]), (["--no-tp"], [[1, 1], [1, 0]])],
                         ids=["tensor-parallel", "no-tp"])
def test_torchrun_decodes_each_row_once(tiny_ckpt, tmp_path, capsys, layout, rows):
    """2 ranks, 3 prompts in batches of 2: the prompts are split over the ranks, so the tensor-parallel pair decodes
    2 rows, then 1 (each row once; before, every rank brought every prompt and 4, then 2 were decoded); from the
    FSDP shards (--no-tp) each rank decodes its own prompts, rank 1 steps along without a row in the second
    batch. Rank 0 prints one process's lines in the input's order."""
    from ranks import spawn
    save_image(tmp_path / "a.png")
    records = [{"question": "Say hi."}, {"images": ["a.png"], "question": "What is it?"}, {"question": "Count."}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    argv = ["--ckpt", tiny_ckpt, "--prompts", str(tmp_path / "p.jsonl"), "--greedy", "--max-new-tokens", "5",
            "--batch-size", "2"]
    rc, one, _ = run(capsys, *argv)
    assert rc == 0 and len(one.splitlines()) == 3
    spawn(ranks_worker, argv + layout, str(tmp_path))
    assert open(tmp_path / "stdout0").read() == one
    assert [json.load(open(tmp_path / f"rows{r}")) for r in range(2)] == rows


# ---------------------------------------------------------------------------------------------- issue 23

def test_prompts_output_carries_the_input_record(tiny_ckpt, tmp_path, capsys):
    """Each output line holds the input record as written (id, images, gold answer, any other field) next to the
    model's response and extracted answer; an input field named like an output one is kept as input_<name>."""
    save_image(tmp_path / "a.png")
    records = [{"id": "q-17", "images": ["a.png"], "question": "<image> how many?", "answer": "3", "source": "x"},
               {"id": 42, "question": "2+2?", "answer": "4", "response": "a reference solution"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, "--prompts", tmp_path / "p.jsonl", "--greedy",
                       "--max-new-tokens", 3)
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [x["id"] for x in lines] == ["q-17", 42]
    a, b = lines
    assert a["images"] == ["a.png"] and a["answer"] == "3" and a["source"] == "x"  # as written, gold answer kept
    assert {"response", "thinking", "extracted_answer"} <= set(a) and a["response"].startswith("<think>")
    assert b["input_response"] == "a reference solution" and b["response"] != "a reference solution"


def test_every_problem_of_a_prompts_file_at_once(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(SkyworkR1V, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "p.jsonl").write_bytes(b'{"question": "ok"}\n{"question": "<image>"}\n'
                                       b'{"question": "x", "images": ["bad.png"]}\n{"question": "\xff"}\n')
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, "--prompts", tmp_path / "p.jsonl")
    lines = err.splitlines()
    assert rc == 2 and out == "" and len(lines) == 2, err  # fields, images and encoding first: lines 3 and 4
    assert "p.jsonl:3: image 'bad.png'" in lines[0] and "p.jsonl:4: not UTF-8" in lines[1]
    (tmp_path / "p.jsonl").write_text('{"question": "ok"}\n{"question": "<image>"}\n{"question": "<IMG_CONTEXT>"}\n')
    rc, out, err = run(capsys, "--ckpt", tiny_ckpt, "--prompts", tmp_path / "p.jsonl")
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 2 and "p.jsonl:2: " in lines[0] and "p.jsonl:3: " in lines[1], err
