import json
import math
import os

import pytest
import torch

from data import Tokenizer, encode_prompt, make_visual_task, read_jsonl
from rollout import Engine
from entropy import (EntropyConfig, critical_positions, decode_with_offsets, format_table, pick_checkpoint,
                     response_entropy, run, score_checkpoint, score_response, stats)
from model import entropy_from_logits, token_logprobs_and_entropy
from model import SkyworkR1V
from parallel import setup


# ---------------------------------------------------------------------------------------------- entropy values

@pytest.mark.parametrize("V", [2, 7, 640])
def test_uniform_logits_give_log_v(V):
    for logits in (torch.zeros(3, V), torch.full((3, V), 12.5)):
        assert torch.allclose(entropy_from_logits(logits), torch.full((3,), math.log(V)), atol=1e-5)
        assert torch.allclose(entropy_from_logits(logits, temperature=0.3), torch.full((3,), math.log(V)), atol=1e-5)


def test_one_hot_gives_zero():
    z = torch.full((4, 100), -float("inf"))
    z[torch.arange(4), torch.tensor([0, 5, 50, 99])] = 0.0
    assert torch.equal(entropy_from_logits(z).abs(), torch.zeros(4))  # exact, no NaN from 0 * log 0
    peaked = torch.zeros(100)
    peaked[3] = 200.0  # finite one-hot: e^-200 underflows
    assert entropy_from_logits(peaked).abs() < 1e-6


def test_temperature_scaling():
    z = torch.randn(1000) * 3
    temps = [0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 1e4]
    h = torch.stack([entropy_from_logits(z, t) for t in temps])
    assert (h[1:] > h[:-1]).all()                      # hotter -> flatter -> more uncertain
    assert h[0] < 1e-2                                 # T -> 0: argmax, entropy -> 0
    assert abs(h[-1] - math.log(1000)) < 1e-3          # T -> inf: uniform, entropy -> log V
    assert torch.allclose(entropy_from_logits(z, 2.0), entropy_from_logits(z / 2.0))


def test_chunked_equals_unchunked_values_and_gradients():
    V, D = 97, 16
    head = torch.nn.Linear(D, V, bias=False)
    targets = torch.randint(0, V, (2, 11))
    targets[1, 3] = -100  # ignore index -> logp 0
    results = []
    for chunk in (1, 5, 4096):
        hidden = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        head.zero_grad()
        logp, ent = token_logprobs_and_entropy(head, hidden, targets, temperature=0.7, chunk=chunk)
        (logp.sum() + 0.5 * ent.sum()).backward()  # both outputs are differentiable
        results.append((logp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    z = head(hidden.detach()).float() / 0.7
    ref_logp = z.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref_logp[1, 3] = 0.0
    ref_ent = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)  # H = logsumexp(z) - sum softmax(z) z
    for logp, ent, gh, gw in results:
        assert logp.dtype == ent.dtype == torch.float32
        torch.testing.assert_close(logp, ref_logp)
        torch.testing.assert_close(ent, ref_ent)
        torch.testing.assert_close(gh, results[0][2])
        torch.testing.assert_close(gw, results[0][3])
    with torch.no_grad():  # the no-grad path (no checkpointing) gives the same numbers
        logp, ent = token_logprobs_and_entropy(head, hidden, targets, temperature=0.7, chunk=3)
    torch.testing.assert_close(ent, ref_ent)


# ---------------------------------------------------------------------------------------------- critical tokens

def _ids(tok, *pieces):
    """Concatenate separately encoded pieces: forces token boundaries the tokenizer would not choose itself."""
    return [i for p in pieces for i in tok.encode(p)]


@pytest.mark.parametrize("pieces, cue, char", [
    (["So 2.", " Wait", ", no."], "Wait", "W"),           # " Wait" as one token with its space
    (["So 2. ", "Wait", ","], "Wait", "W"),
    (["x", " W", "ait"], "Wait", "W"),                     # the cue split over two tokens
    (["so wait", " that"], "wait", "w"),
    (["Ok. But wait, 3"], "But wait", "B"),                # longest cue wins; "wait" inside is not counted twice
    (["Hmm", "."], "Hmm", "H"),
    (["答案是2。等等，再看"], "等等", "等"),  # byte-level BPE splits 等 into several byte tokens
    (["让我检查一下"], "让我检查", "让"),
])
def test_cue_matching_across_tokenisations(tiny_ckpt, pieces, cue, char):
    tok = Tokenizer.from_dir(tiny_ckpt)
    ids = _ids(tok, *pieces)
    text, found = critical_positions(tok, ids)
    assert text == tok.decode(ids)
    assert [c for _, c in found] == [cue]
    k = found[0][0]
    # the chosen token is the one whose bytes start the cue: decoding up to it shows the cue's first character
    # (or a partial-character U+FFFD), decoding up to the token before does not
    start = text.index(cue)
    assert len(tok.decode(ids[:k + 1])) > start >= len(tok.decode(ids[:k]).rstrip("\ufffd"))
    assert tok.decode(ids[:k + 1])[start] in (char, "\ufffd")


def test_no_false_cues(tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    for s in ["The waiter awaits. Hmmm, whatever.", "", "howeverything"]:
        assert critical_positions(tok, tok.encode(s))[1] == []
    text, found = critical_positions(tok, tok.encode("Wait. wait! Actually 不过"), cues=("wait", "不过"))
    assert [c for _, c in found] == ["wait", "不过"]      # configurable, case-sensitive


def test_decode_with_offsets_is_consistent(tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    ids = tok.encode("Hmm 等等，emoji 😀 <think> ok") + [tok.eos_id]
    text, ends = decode_with_offsets(tok, ids)
    assert text == tok.decode(ids)
    assert len(ends) == len(ids) and ends[-1] == len(text) and ends == sorted(ends)


# ---------------------------------------------------------------------------------------------- scoring

def test_teacher_forcing_alignment(tiny_ckpt, tmp_path):
    model = SkyworkR1V.from_pretrained(tiny_ckpt)
    tok = Tokenizer.from_dir(tiny_ckpt)
    rec = {"question": "How many?", "images": []}
    prompt, pv = encode_prompt(tok, model.config, rec["question"], rec["images"])
    response = tok.encode("Wait, 2") + [tok.eos_id]
    ent = response_entropy(model, prompt, pv, response, temperature=0.8, chunk=2)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response]))[0]
    ref = entropy_from_logits(logits[len(prompt) - 1:-1], 0.8)  # position P-1+j predicts response token j
    torch.testing.assert_close(torch.tensor(ent), ref)


def test_empty_no_cue_and_unloadable(tiny_ckpt, tmp_path):
    cfg = EntropyConfig(mode="score")
    ctx = setup("fp32")
    recs = [{"question": "q", "images": [], "response": "", "answer": "1"},
            {"question": "q", "images": [], "response": "no reflection here"}]
    report, raw = score_checkpoint(tiny_ckpt, recs, cfg, ctx)
    assert report["error"] is None and report["n_empty"] == 1 and report["n_cues"] == 0
    assert report["critical"]["mean"] is None and report["per_cue"] == {}
    assert report["all"]["n"] == len(raw["all"]) > 0 and math.isfinite(report["all"]["mean"])
    assert report["accuracy"] == 0.0  # one answered record, empty response
    json.dumps(report, allow_nan=False)  # n/a is null, never NaN
    assert stats([]) == {"n": 0, "mean": None, "p50": None, "p80": None, "p95": None}
    broken = tmp_path / "step_5"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for path in (str(broken), str(tmp_path / "missing")):
        bad, _ = score_checkpoint(path, recs, cfg, ctx)
        assert bad["error"].startswith("failed to load")
    assert "not found" in bad["error"]
    assert "step_5" in format_table([report | {"ckpt": "ok", "step": 1}, {**bad, "ckpt": str(broken), "step": 5}])


# ---------------------------------------------------------------------------------------------- selection

def _report(name, step, crit, acc=None, n_cues=5, error=None):
    return {"ckpt": name, "step": step, "error": error, "n_empty": 0, "n_cues": 0 if crit is None else n_cues,
            "critical": stats([] if crit is None else [crit] * n_cues), "all": stats([1.0]), "accuracy": acc}


def test_ranking_by_critical_entropy():
    reports = [_report("a", 100, 0.2), _report("b", 200, 0.9), _report("c", 300, None), _report("d", 400, 0.5),
               _report("e", 500, None, error="failed to load: boom")]
    chosen, why = pick_checkpoint(reports)
    assert chosen["ckpt"] == "b" and "0.900" in why and "no answers" in why
    rows = [line.split("|")[2].strip() for line in format_table(reports).splitlines()[2:]]
    assert rows == ["b", "d", "a", "c", "e"]  # n/a after ranked ones, failures last
    assert "failed to load: boom" in format_table(reports)


def test_ranking_guarded_by_accuracy():
    reports = [_report("noisy", 1, 2.5, acc=0.10), _report("good", 2, 0.8, acc=0.61), _report("best", 3, 0.4, acc=0.62)]
    chosen, why = pick_checkpoint(reports, acc_tolerance=0.02)
    assert chosen["ckpt"] == "good" and "0.620" in why  # noisy has the highest entropy but is far less accurate
    chosen, _ = pick_checkpoint([_report("x", 1, None, acc=0.3), _report("y", 2, None, acc=0.5)])
    assert chosen["ckpt"] == "y"  # no cues anywhere: accuracy alone
    chosen, why = pick_checkpoint([_report("z", 1, None)])
    assert chosen is None and "nothing to rank by" in why
    chosen, why = pick_checkpoint([_report("e", 1, None, error="failed")])
    assert chosen is None and "could be loaded" in why


def test_run_end_to_end(tiny_ckpt, tmp_path):
    data = make_visual_task(str(tmp_path / "task"), 1, split="heldout")
    assert read_jsonl(data)[0]["images"]
    out = tmp_path / "out" / "report.json"
    cfg = EntropyConfig(ckpts=[tiny_ckpt, str(tmp_path / "step_*")], data=data, out=str(out), max_new_tokens=4)
    result = run(cfg)
    reports = result["checkpoints"]
    assert len(reports) == 2 and reports[0]["error"] is None and reports[0]["all"]["n"] >= 1
    assert "not found" in reports[1]["error"]  # an unmatched pattern is reported, not dropped
    assert json.loads(out.read_text())["pick"] == tiny_ckpt
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "report_hist.png").exists()


def test_default_output_is_under_out_entropy(tiny_ckpt, tmp_path, monkeypatch):
    """With no --out, every file the command writes lands in out/entropy/ of the working directory (git-ignored),
    none in the directory itself."""
    monkeypatch.chdir(tmp_path)
    data = make_visual_task("task", 1, split="heldout")
    before = set(os.listdir(tmp_path))
    run(EntropyConfig(ckpts=[tiny_ckpt], data=data, max_new_tokens=4))
    assert set(os.listdir(tmp_path)) - before == {"out"}
    assert os.listdir(tmp_path / "out") == ["entropy"]
    assert {"report.json", "report.md", "report_hist.png"} <= set(os.listdir(tmp_path / "out" / "entropy"))


def test_sampled_image_token_ends_the_response(tiny_ckpt):
    """A model that samples <IMG_CONTEXT> (an early checkpoint can) gets a response that ends there, as in GRPO's
    rollouts: fed back in teacher forcing it would ask for an image that does not exist (it used to raise)."""
    model, tok = SkyworkR1V.from_pretrained(tiny_ckpt).eval(), Tokenizer.from_dir(tiny_ckpt)
    head = model.language_model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[model.config.img_context_token_id] = 30.0  # every sampled token is the image token
    model.language_model.lm_head = biased
    cfg = EntropyConfig(ckpts=[tiny_ckpt], data="", max_new_tokens=8)
    text, ent, _ = score_response(Engine(model, tok, setup()), {"question": "How many?", "images": []}, cfg,
                                  torch.Generator().manual_seed(0))
    assert text == "<IMG_CONTEXT>" and len(ent) == 1


def sharded_worker(rank, cfgs, out):
    import tp
    calls = []
    real = tp.TPDecoder.decode
    tp.TPDecoder.decode = lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw)
    results = [run(cfg) for cfg in cfgs]
    torch.save({"results": results, "tp_calls": len(calls)}, f"{out}.{rank}")


def test_two_ranks_give_the_one_process_numbers(tiny_ckpt, tmp_path):
    """entropy.py under torchrun: FSDP2-sharded loading (each rank 1/W of the weights), each rank scores its share
    of the records (3 records on 2 ranks: one rank pads), responses generated through tp.py's tensor-parallel copy
    (every generate call: counted on TPDecoder.decode). Greedy generation and teacher forcing give one process's
    responses and entropies (fp32, 1e-5). Fails if every rank scores every record or generation skips the copy."""
    import dataclasses
    from ranks import WORLD, spawn
    data = make_visual_task(str(tmp_path / "task"), 3, split="heldout")
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({**r, "response": "Wait, 2. Hmm, actually \\boxed{2}"}) + "\n"
                              for r in read_jsonl(data)))
    cfgs = [EntropyConfig(ckpts=[tiny_ckpt], data=data, out=str(tmp_path / "g" / "report.json"), max_new_tokens=6,
                          temperature=0.0, dtype="fp32"),
            EntropyConfig(ckpts=[tiny_ckpt], data=str(scored), out=str(tmp_path / "s" / "report.json"), mode="score",
                          dtype="fp32")]
    want = [run(cfg) for cfg in cfgs]
    two = [dataclasses.replace(c, out=c.out.replace("report", "two")) for c in cfgs]
    spawn(sharded_worker, two, str(tmp_path / "r"))
    ranks = [torch.load(f"{tmp_path / 'r'}.{r}", weights_only=False) for r in range(WORLD)]
    assert ranks[1]["results"] == [None, None]  # rank 0 writes the report
    assert all(r["tp_calls"] == 2 for r in ranks)  # 2 generate calls per rank (its record, and the padding one)
    for got, exp in zip(ranks[0]["results"], want):
        g, e = got["checkpoints"][0], exp["checkpoints"][0]
        assert [(x["response"], [c for c, _ in x["cues"]]) for x in g["examples"]] == \
            [(x["response"], [c for c, _ in x["cues"]]) for x in e["examples"]]  # same texts and cues
        for key in ("n_responses", "n_cues", "accuracy", "per_cue"):
            assert (g[key] == e[key]) if key != "per_cue" else g[key].keys() == e[key].keys(), key
        for key in ("critical", "all"):
            assert g[key]["n"] == e[key]["n"], key
            for stat in ("mean", "p50", "p95"):
                assert g[key][stat] == pytest.approx(e[key][stat], rel=1e-5, abs=1e-6), (key, stat)


# ---------------------------------------------------------------------------------------------- issue 23

def test_step_comes_from_the_saved_training_state(tmp_path):
    from entropy import expand_ckpts
    from checkpoint import trained_step as checkpoint_step
    for name, step in (("my-sft3", 110), ("step_000020", 20), ("step_000005", 5)):
        os.makedirs(tmp_path / name / "train_state")
        (tmp_path / name / "train_state" / "trainer_state.json").write_text(json.dumps({"step": step}))
    os.makedirs(tmp_path / "release7")
    assert checkpoint_step(str(tmp_path / "my-sft3")) == 110 and checkpoint_step(str(tmp_path / "release7")) is None
    # the patterns' order is kept (the pipeline's: SFT, then the GRPO steps), each glob ordered by step
    got = expand_ckpts([str(tmp_path / "my-sft3"), str(tmp_path / "step_*")])
    assert [os.path.basename(p) for p in got] == ["my-sft3", "step_000005", "step_000020"]


def test_no_loadable_checkpoint_exits_non_zero(tiny_ckpt, tmp_path, capsys):
    import shutil
    import cli
    data = make_visual_task(str(tmp_path / "task"), 1, split="heldout")
    cfg = EntropyConfig(ckpts=[str(tmp_path / "missing")], data=data, out=str(tmp_path / "r" / "report.json"),
                        max_new_tokens=2)
    with pytest.raises(SystemExit) as e:  # nothing that is a checkpoint: refused before anything is read
        cli.main(run, cfg, prog="entropy.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no checkpoint to score" in err
    broken = tmp_path / "broken"  # a config and a tokenizer but no weights: it fails to load
    shutil.copytree(tiny_ckpt, broken, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(SystemExit) as e:
        cli.main(run, EntropyConfig(**{**cfg.__dict__, "ckpts": [str(broken)]}), prog="entropy.py")
    assert e.value.code == 2 and "no checkpoint could be loaded" in capsys.readouterr().err
    assert json.load(open(tmp_path / "r" / "report.json"))["pick"] is None  # the report says why


def test_bad_data_is_refused_before_any_weight_is_read(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import cli
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "1"}\n{"question": "q", "images": ["bad.png"]}\n'
                                      '{"question": "q", "answer": ""}\n')
    monkeypatch.setattr(SkyworkR1V, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(SystemExit) as e:
        cli.main(run, EntropyConfig(ckpts=[tiny_ckpt], data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "r.json")))
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 2 and "d.jsonl:2: image 'bad.png'" in err[0] and "d.jsonl:3" in err[1]
    assert not (tmp_path / "r.json").exists()


def test_a_pick_with_every_accuracy_zero_says_so():
    chosen, why = pick_checkpoint([_report("a", 1, 0.5, acc=0.0), _report("b", 2, 0.9, acc=0.0)])
    assert chosen["ckpt"] == "b" and why.startswith("WARNING: every checkpoint's accuracy is 0")
    chosen, why = pick_checkpoint([_report("a", 1, 0.5, acc=0.1), _report("b", 2, 0.9, acc=0.0)])
    assert "WARNING" not in why
