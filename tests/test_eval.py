"""Tests for eval.py: MMMU's official scoring rules (cases worked out by hand from its eval_utils.py), the thinking
rule, the MMMU parquet layout end to end on the tiny model (generate, resume, torchrun), bad input, and data.py's
parquet reader for training data."""
import io
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval as ev  # noqa: E402

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

ABCD = ["A", "B", "C", "D"]
PAINTINGS = {"A": "Mona Lisa", "B": "The Scream", "C": "Starry Night", "D": "Guernica"}


# ----------------------------------------------------------------------------------------------------------------
# MMMU's official rules

@pytest.mark.parametrize("response, pred, how", [
    ("The answer is (B).", "B", "bracket"),
    ("(A) is tempting, but the answer is (C)", "C", "bracket"),           # the last bracketed letter wins
    ("A is wrong; (B) is right; A again", "B", "bracket"),                 # a bracketed letter beats bare letters
    ("B.", "B", "letter"),                                                 # ",.!?;:'" stripped from both ends
    ("I choose A not B", "B", "letter"),                                   # several bare letters: the last one
    ("B is it", "B", "letter"),
    ("So the painting shown must be the Starry Night by van Gogh", "C", "option text"),  # > 5 words: option text
    ("not the mona lisa , it is starry night or else guernica", "D", "option text"),    # its last occurrence
    ("Starry Night", None, "random"),                                      # option text needs more than 5 words
    ("it is the Starry Night", None, "random"),                            # 5 words: still not enough
    ("Answer:B", None, "random"),                                          # a letter glued to a word is no letter
])
def test_multi_choice_rules(response, pred, how):
    random.seed(42)
    got, got_how = ev.parse_multi_choice(response, ABCD, PAINTINGS)
    assert got_how == how
    if pred:
        assert got == pred


def test_random_fallback_is_one_seeded_stream_over_items():
    """random.seed(42) at import, then one draw per unparsed multiple-choice item, in file order: with 4 choices the
    stream gives A, A, C, B; with 3 choices first C (random.choice draws bits by the number of choices)."""
    random.seed(42)  # as a fresh `python eval.py --score` process starts
    assert [ev.parse_multi_choice("no idea", ABCD, PAINTINGS)[0] for _ in range(4)] == ["A", "A", "C", "B"]
    random.seed(42)
    assert ev.parse_multi_choice("?", ["A", "B", "C"], {})[0] == "C"


def test_open_rules():
    assert ev.normalize_str(" 1,234.567 ") == [1234.57]                   # numbers: commas out, 2 decimals
    assert ev.normalize_str("Paris") == ["paris"] and ev.normalize_str("a") == [" a", "a "]
    # commas, then scientific, then simple numbers (which also pick the pieces of the first two, as the official
    # patterns do)
    assert ev.extract_numbers("1,234,567 or 3.5e-2") == ["1,234,567", "3.5e-2", "567", "3", "-2"]
    # per line, the shortest tail after an indicator word ("is", "so", "answer", ..., "=" on the last line)
    assert ev.parse_open("The area is 12.\nSo the answer is 12 cm") == [12.0, "12 cm"]
    assert ev.parse_open("x = 7") == [7.0]                                # "=" counts on the last line
    assert ev.eval_open("3.14", ev.parse_open("so the value is 3.14159"))         # 3.14159 -> 3.14
    assert not ev.eval_open("3.2", ev.parse_open("so the value is 3.14159"))
    assert ev.eval_open("Paris", ev.parse_open("Therefore the capital is Paris, France"))  # contained in a part
    assert ev.eval_open(["12", "twelve"], ev.parse_open("the result is twelve"))
    assert not ev.eval_open("a", ev.parse_open("the answer is bad"))       # a single letter only as a word


def rec(response, answer="B", qtype="multiple-choice", options=PAINTINGS, rid="validation_Art_1"):
    return {"id": rid, "question_type": qtype, "answer": answer, "response": response,
            "all_choices": list(options), "index2ans": dict(options), "subject": "Art"}


@pytest.mark.parametrize("response, pred, how", [
    ("<think>\nMaybe (A)? No.\n</think>\nThe answer is \\boxed{B}.", "B", "boxed"),
    ("<think>\n(A)\n</think>\n\\boxed{\\text{C}}", "C", "boxed"),
    ("<think>\n(A)\n</think>\nIt is $\\boxed{(D)}$", "D", "boxed"),
    ("<think>\n(A)\n</think>\nSo: \\boxed{The Scream}", "B", "boxed"),        # an option's text -> its letter
    ("<think>\n(A)\n</think>\n\\boxed{42} but (C) it is", "C", "bracket"),     # boxes no option: official rules
    ("The answer is (A) \\boxed{B}", "B", "boxed"),                            # no </think>: read whole
    ("<think>\nThe answer is (A).\n</think>\nI cannot tell.", None, "random"),  # letters in the thinking don't count
])
def test_thinking_rule(response, pred, how):
    random.seed(42)
    got = ev.judge(rec(response))
    assert got["how"] == how and (pred is None or got["pred"] == pred)
    assert got["correct"] == (got["pred"] == "B")


def test_boxed_items_still_advance_the_random_stream():
    """The official parser runs on every multiple-choice item, so an item decided by \\boxed{} whose text the rules
    cannot parse still takes its draw: the items after it get the draws the official script gives them."""
    random.seed(42)
    assert ev.judge(rec("\\boxed{B}"))["how"] == "boxed"
    assert ev.judge(rec("hmm"))["pred"] == "A"  # second draw of the stream A, A, C, B
    assert ev.judge(rec("hmm"))["pred"] == "C"


@pytest.mark.parametrize("boxed, answer, right", [("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True),
                                                   ("3.1416", "3.14", True), ("3.2", "3.14", False),
                                                   ("12 \\text{ cm}", "12", True), ("Paris", "paris", True)])
def test_open_boxed_compares_numbers_as_numbers(boxed, answer, right):
    r = rec(f"<think>\nit is 7\n</think>\n\\boxed{{{boxed}}}", answer, "open", {})
    assert ev.judge(r) == {"pred": boxed, "correct": right, "how": "boxed"}


def test_mmmu_output_format_is_scored(tmp_path, capsys):
    """MMMU's own output.json (a JSON list) scores like our responses.jsonl; results per subject and discipline."""
    items = [rec("The answer is (B)", rid="validation_Art_1"), rec("(A)", rid="validation_Math_3"),
             {**rec("", "12", "open", {}, "validation_Physics_2"), "response": "so it is 12.0 m"},
             rec("hmm", rid="validation_Art_2")]  # unparsed: the seeded stream's first letter, A (wrong)
    for r in items:
        r.pop("subject")
    path = tmp_path / "output.json"
    path.write_text(json.dumps(items))
    random.seed(42)  # as at the import in a fresh process
    assert ev.main(["--score", str(path), "--out", str(tmp_path / "s")]) == 0
    res = json.loads((tmp_path / "s" / "results.json").read_text())
    assert res["overall"] == {"n": 4, "correct": 2, "accuracy": 0.5, "judge_range": [0.5, 0.75]}
    assert res["disciplines"]["Science"]["n"] == 2 and res["disciplines"]["Science"]["subjects"] == ["Math", "Physics"]
    scores = [json.loads(x) for x in (tmp_path / "s" / "scores.jsonl").read_text().splitlines()]
    assert [(s["pred"], s["correct"], s["unparsed"]) for s in scores] == [
        ("B", True, False), ("A", False, False), (["12.0 m", 12.0], True, False), ("A", False, True)]
    assert "| **overall** | 4 | **50.0** |" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# MMMU's parquet layout, end to end on the tiny model

def png(seed, size=(56, 56)):
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def mmmu_rows():
    img = lambda s: {"bytes": png(s), "path": f"{s}.png"}  # noqa: E731  (the hub's image struct)
    return {"Art": [dict(id="validation_Art_1", question="Which painting is <image 1>?", answer="C",
                         options="['Mona Lisa', 'The Scream', '<image 2>']", question_type="multiple-choice",
                         image_1=img(1), image_2=img(2)),
                    dict(id="validation_Art_2", question="How many figures?", options="[]", answer="3",
                         question_type="open", image_1=img(3), image_2=None)],
            "Math": [dict(id="validation_Math_1", question="What is 2+2?", options="['3', '4']", answer="B",
                          question_type="multiple-choice", image_1=None, image_2=None)]}


def write_mmmu(root, rows=None):
    for subject, rs in (rows or mmmu_rows()).items():
        os.makedirs(root / subject, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rs), root / subject / "validation-00000-of-00001.parquet")
    return root


def run(capsys, *argv):
    try:
        rc = ev.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_prompt_is_vlmevalkits_with_images_in_place(tmp_path):
    items = ev.read_mmmu(str(write_mmmu(tmp_path)), "validation")
    assert [it.id for it in items] == ["validation_Art_1", "validation_Art_2", "validation_Math_1"]
    first = items[0]
    assert first.text == ("Question: Which painting is <image>?\nOptions:\nA. Mona Lisa\nB. The Scream\nC. <image>\n"
                          "Please select the correct answer from the options above. \n")
    assert first.images == [png(1), png(2)]          # in the order the text names them
    assert items[1].text == "Question: How many figures?\n" and items[1].images == [png(3)]  # no reference: kept
    assert first.mmmu_fields()["index2ans"] == {"A": "Mona Lisa", "B": "The Scream", "C": "<image 2>"}


@pytest.fixture(scope="module")
def one_process(tiny_ckpt, tmp_path_factory):
    """One generation run over the 3-item set (batches of 2), shared by the tests below."""
    d = tmp_path_factory.mktemp("mmmu")
    data_dir = write_mmmu(d / "data")
    out = d / "out"
    assert ev.main(["--ckpt", tiny_ckpt, "--data", str(data_dir), "--out", str(out), "--max-new-tokens", "6",
                    "--batch-size", "2"]) == 0
    return data_dir, out


def test_generation_writes_responses_and_scores(one_process):
    data_dir, out = one_process
    lines = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["validation_Art_1", "validation_Art_2", "validation_Math_1"]
    assert all(r["response"].startswith("<think>\n") and r["tokens"] <= 6 for r in lines)
    assert lines[0]["all_choices"] == ["A", "B", "C"] and lines[1]["question_type"] == "open"
    res = json.loads((out / "results.json").read_text())
    assert res["counts"]["items"] == 3 and set(res["subjects"]) == {"Art", "Math"}
    assert res["settings"]["max_new_tokens"] == 6 and res["settings"]["temperature"] == 0.0
    assert len((out / "scores.jsonl").read_text().splitlines()) == 3 and (out / "results.md").is_file()


def test_resume_generates_only_the_missing_items(one_process, tiny_ckpt, tmp_path, monkeypatch, capsys):
    data_dir, full = one_process
    out = tmp_path / "out"
    out.mkdir()
    lines = (full / "responses.jsonl").read_text().splitlines()
    (out / "responses.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])  # cut while writing item 3
    asked = []
    real = ev.generate_batch
    monkeypatch.setattr(ev, "generate_batch", lambda engine, batch, *a: asked.append([i.id for i in batch]) or
                        real(engine, batch, *a))
    rc, _, err = run(capsys, "--ckpt", tiny_ckpt, "--data", data_dir, "--out", out, "--max-new-tokens", 6,
                     "--batch-size", 2)
    assert rc == 0 and asked == [["validation_Math_1"]] and "dropping the unfinished last line" in err
    assert (out / "responses.jsonl").read_text().splitlines() == lines  # greedy: the same answer as in one go
    rc, _, err = run(capsys, "--ckpt", tiny_ckpt, "--data", data_dir, "--out", out, "--max-new-tokens", 7)
    assert rc == 2 and "other settings" in err  # resuming with other settings would mix two runs in one file


def test_torchrun_two_ranks_write_the_one_process_responses(one_process, tiny_ckpt, tmp_path):
    """`torchrun --nproc_per_node 2 eval.py` (FSDP2 + tensor-parallel decoding, each rank half of a batch, the last
    batch of one item on both): the same greedy responses as one process."""
    data_dir, full = one_process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "eval.py", "--ckpt", tiny_ckpt, "--data", str(data_dir), "--out", str(tmp_path / "tp"),
                          "--max-new-tokens", "6", "--batch-size", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "tp" / "responses.jsonl").read_text() == (full / "responses.jsonl").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and item, exit 2, an existing responses.jsonl untouched

def _drop_options(rows):
    rows["Math"][0].pop("options")


def _bad_image(rows):
    rows["Art"][1]["image_1"] = {"bytes": b"not an image", "path": "x.png"}


def _image_3(rows):
    rows["Math"][0]["question"] = "What is in <image 3>?"


def _bad_options(rows):
    rows["Math"][0]["options"] = "['3', '4'"


def _code_in_options(rows):
    rows["Math"][0]["options"] = "__import__('os').system('touch PWNED')"


@pytest.mark.parametrize("corrupt, pattern", [
    (_drop_options, r"Math/validation-00000-of-00001\.parquet, item validation_Math_1: no column 'options'"),
    (_bad_image, r"Art/validation-\S+, item validation_Art_2: an image is not readable"),
    (_image_3, r"item validation_Math_1: the question or an option refers to <image 3> but there is no image_3"),
    (_bad_options, r"item validation_Math_1: 'options' is not a Python list of strings"),
    (_code_in_options, r"item validation_Math_1: 'options' is not a Python list of strings"),
], ids=["missing-column", "unreadable-image", "image-3", "malformed-options", "code-in-options"])
def test_bad_data_is_one_line(tiny_ckpt, tmp_path, capsys, monkeypatch, corrupt, pattern):
    rows = mmmu_rows()
    corrupt(rows)
    data_dir = write_mmmu(tmp_path / "data", rows)
    out = tmp_path / "out"
    out.mkdir()
    kept = '{"id": "validation_Art_1", "response": "(A)"}\n'
    (out / "responses.jsonl").write_text(kept)
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = run(capsys, "--ckpt", tiny_ckpt, "--data", data_dir, "--out", out)
    assert rc == 2 and stdout == "" and err.count("\n") == 1 and err.startswith("eval.py: error: "), err
    assert re.search(pattern, err), err
    assert (out / "responses.jsonl").read_text() == kept and not (tmp_path / "PWNED").exists()


def test_responses_with_an_unknown_id(tiny_ckpt, tmp_path, capsys):
    data_dir = write_mmmu(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    kept = '{"id": "validation_Art_1", "response": "(A)"}\n{"id": "validation_Art_99", "response": "(B)"}\n'
    (out / "responses.jsonl").write_text(kept)
    rc, _, err = run(capsys, "--ckpt", tiny_ckpt, "--data", data_dir, "--out", out)
    assert rc == 2 and err.count("\n") == 1 and "responses.jsonl:2: unknown id 'validation_Art_99'" in err
    assert (out / "responses.jsonl").read_text() == kept
    scored = tmp_path / "mine.jsonl"
    scored.write_text(json.dumps(rec("(A)", rid="validation_Cooking_1")) + "\n")
    rc, _, err = run(capsys, "--score", scored, "--out", tmp_path / "s")
    assert rc == 2 and err.count("\n") == 1 and "mine.jsonl:1: unknown id 'validation_Cooking_1'" in err


# ----------------------------------------------------------------------------------------------------------------
# data.py: parquet for training (--data x.parquet)

def test_read_records_reads_parquet_rows_for_training(tmp_path):
    rows = [{"problem": "How many?", "solution": "2", "image": {"bytes": png(5), "path": None}, "level": 3},
            {"problem": "And now?", "solution": "4", "image": None, "level": 1}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    recs = data.read_records(str(tmp_path / "train.parquet"), ("question", "answer"),
                             {"question": "problem", "answer": "solution"}, image_dir=str(tmp_path / "img"))
    where = f"{tmp_path}/train.parquet row"
    assert [(r["question"], r["answer"], r["level"], r.where) for r in recs] == [
        ("How many?", "2", 3, f"{where} 0"), ("And now?", "4", 1, f"{where} 1")]
    assert len(recs[0]["images"]) == 1 and recs[1]["images"] == []
    assert open(recs[0]["images"][0], "rb").read() == png(5)  # written once, named by content
    assert data.load_image(recs[0]["images"][0]).shape == (1, 3, 448, 448)
    with pytest.raises(ValueError, match=r"train\.parquet: no column 'question' for 'question'"):
        data.read_records(str(tmp_path / "train.parquet"), ("question",), image_dir=str(tmp_path / "img"))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"question": "a"}\n\n{"question": "b"}\n')
    assert [r.where for r in data.read_records(str(jsonl))] == [f"{jsonl}:1", f"{jsonl}:3"]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"x\.parquet: reading parquet needs pyarrow \(pip install pyarrow\)"):
        data.read_parquet(str(tmp_path / "x.parquet"))


def test_jsonl_benchmark_kind(tiny_ckpt, tmp_path, capsys):
    """The project's JSONL as a benchmark: choices make a multiple-choice item (an answer given as a choice's text
    becomes its letter), no choices an open one; subjects from the records."""
    Image.open(io.BytesIO(png(7))).save(tmp_path / "a.png")
    lines = [{"id": "q1", "question": "<image>\nWhich colour?", "images": ["a.png"], "choices": ["red", "blue"],
              "answer": "blue", "subject": "colours"},
             {"id": "q2", "question": "How many?", "answer": "2"}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, _, err = run(capsys, "--benchmark", "jsonl", "--ckpt", tiny_ckpt, "--data", tmp_path / "bench.jsonl",
                     "--out", tmp_path / "out", "--max-new-tokens", 2)
    assert rc == 0, err
    got = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert [(r["id"], r["question_type"], r["answer"], r["subject"]) for r in got] == [
        ("q1", "multiple-choice", "B", "colours"), ("q2", "open", "2", "all")]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["subjects"]) == {"colours", "all"} and res["disciplines"] == {}


def test_sft_reads_parquet(tiny_ckpt, tmp_path, monkeypatch):
    """sft.py --data x.parquet: rows of question / response / image bytes train like JSONL records, and every
    message about a sample names its row."""
    import sft
    from model import R1VConfig
    response = "<think>\nTwo shapes.\n</think>\n\nThe answer is \\boxed{2}."
    rows = [{"question": "How many shapes?", "response": response, "image": {"bytes": png(8), "path": None}},
            {"question": "And here?", "response": "no reasoning", "image": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")
    monkeypatch.chdir(tmp_path)  # the images go to out/parquet-images here
    examples, stats = sft.load_sft(str(tmp_path / "sft.parquet"), data.Tokenizer.from_dir(tiny_ckpt),
                                   sft.SFTConfig(), R1VConfig.from_dir(tiny_ckpt))
    assert len(examples) == 1 and stats["untagged_at"] == [f"{tmp_path}/sft.parquet row 1"]
    assert examples[0].where == f"{tmp_path}/sft.parquet row 0" and os.path.isfile(examples[0].images[0])
    # a hub set's own column names (--columns): the same example, token for token
    renamed = [{"problem": r["question"], "solution": r["response"], "picture": r["image"]} for r in rows]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "hub.parquet")
    cfg = sft.SFTConfig(columns="question=problem,response=solution,images=picture")
    again, _ = sft.load_sft(str(tmp_path / "hub.parquet"), data.Tokenizer.from_dir(tiny_ckpt), cfg,
                            R1VConfig.from_dir(tiny_ckpt))
    assert len(again) == 1 and torch.equal(again[0].ids, examples[0].ids)
    with pytest.raises(ValueError, match="--columns 'prompt:problem'"):
        sft.SFTConfig(columns="prompt:problem")
