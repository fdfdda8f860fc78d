import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sft
from data import Tokenizer, build_prompt, read_jsonl, shuffled_indices
from model import R1VConfig, SkyworkR1V, token_logprobs_and_entropy
from sft import Run, SFTConfig, fit, load_sft, main, make_batch, parse_args, sft_loss, step_indices, synthetic_data, truncate
from logs import MetricsLog, read_metrics
from optim import make_optimizer
from parallel import load, setup

GOOD = "<think>\n1 + 1 = 2\n</think>\n\nThe answer is \\boxed{2}."


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def load_data(path, ckpt, **kw):
    cfg = R1VConfig.from_dir(ckpt)
    return load_sft(path, Tokenizer.from_dir(ckpt), SFTConfig(**kw), cfg)


@pytest.fixture
def red_png(tmp_path):
    Image.new("RGB", (448, 448), "red").save(tmp_path / "red.png")
    return "red.png"


def test_labels_only_on_assistant_tokens(tiny_ckpt, tmp_path, red_png):
    tok = Tokenizer.from_dir(tiny_ckpt)
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"images": [red_png], "question": "What is 1+1?", "response": GOOD},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": GOOD}, {"role": "user", "content": "And 1+2?"},
                      {"role": "assistant", "content": "1 + 2 = 3</think> \\boxed{3}"}]},  # starts inside <think>
    ])
    (a, b), _ = load_data(path, tiny_ckpt)
    batch = make_batch([a, b], tok.pad_id, R1VConfig.from_dir(tiny_ckpt), 12, "cpu")
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()

    prompt = ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 + "</img>\nWhat is 1+1?<|im_end|>\n"
              "<|im_start|>assistant\n")
    n = len(tok.encode(prompt))
    assert tok.decode(ids[0][:len(a.ids)]) == prompt + GOOD + "<|im_end|>" + "\n"
    assert tok.decode(ids[0][n:len(a.ids) - 1]) == GOOD + "<|im_end|>"
    assert labels[0][:len(a.ids)] == [-100] * n + ids[0][n:len(a.ids) - 1] + [-100]  # the final "\n" has no loss
    for row, e in enumerate((a, b)):  # padding: no loss, no attention
        assert all(x == -100 for x in labels[row][len(e.ids):]) and batch["attention_mask"][row].sum() == len(e.ids)
    assert len(a.ids) != len(b.ids)
    # the prompt sampling uses (thinking mode: it ends in "<think>\n") is token for token the sample's prefix
    gen = tok.encode(build_prompt("What is 1+1?", [1], 256))
    assert ids[0][:len(gen)] == gen and gen[n:] == tok.encode("<think>\n")
    assert batch["pixel_values"].shape == (1, 3, 448, 448)

    # multi-turn: both assistant turns (+ <|im_end|>) and nothing else; the second got its "<think>\n" prefix
    kept = [t if lab != -100 else None for t, lab in zip(ids[1], labels[1])][:len(b.ids)]
    runs, cur = [], []
    for t in kept + [None]:
        if t is None and cur:
            runs.append(tok.decode(cur))
            cur = []
        elif t is not None:
            cur.append(t)
    assert runs == [GOOD + "<|im_end|>", "<think>\n1 + 2 = 3</think> \\boxed{3}<|im_end|>"]
    assert tok.decode(ids[1][:len(b.ids)]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?")


def test_padding_does_not_change_loss(tiny_ckpt, tmp_path, red_png):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"images": [red_png], "question": "How many?", "response": GOOD},
        {"question": "A much longer question without an image, " * 8, "response": GOOD.replace("2", "2 " * 20)},
        {"question": "Short.", "response": GOOD},
    ])
    exs, _ = load_data(path, tiny_ckpt)
    assert len({len(e.ids) for e in exs}) == 3
    tok, model = Tokenizer.from_dir(tiny_ckpt), SkyworkR1V.from_pretrained(tiny_ckpt)
    with torch.no_grad():
        alone = [sft_loss(model, make_batch([e], tok.pad_id, model.config, 12, "cpu"), 1.0)[0].item() for e in exs]
        for order in ([0, 1, 2], [1, 2, 0]):  # the image sample first, and last behind two padded rows
            batch = make_batch([exs[i] for i in order], tok.pad_id, model.config, 12, "cpu")
            assert batch["attention_mask"].sum(1).tolist() == [len(exs[i].ids) for i in order]
            together = sft_loss(model, batch, 1.0)[0].item()
            assert together == pytest.approx(sum(alone), rel=1e-5)


def test_train_connector_only(tiny_ckpt, tmp_path):
    train_path, eval_path = synthetic_data(str(tmp_path / "data"), 4, 2, seed=0)
    ctx = setup()
    model = load(tiny_ckpt, ctx, "connector")
    (train_set, _), (eval_set, _) = load_data(train_path, tiny_ckpt), load_data(eval_path, tiny_ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, 1e-2)
    cfg = SFTConfig(steps=3, batch_size=2, warmup=0, eval_every=100, out=str(tmp_path / "sft"))
    fit(Run(cfg, ctx, model, opt, Tokenizer.from_dir(tiny_ckpt).pad_id, train_set, eval_set,
            MetricsLog(str(tmp_path / "m.jsonl"))))
    for name, v in model.state_dict().items():
        if name.startswith("mlp1."):
            assert not torch.equal(v, before[name]), f"{name} did not train"
        else:
            assert torch.equal(v, before[name]), f"{name} changed"
    mlp1 = {id(p) for p in model.mlp1.parameters()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == mlp1
    assert {id(p) for p in opt.state} == mlp1 and all(opt.state[p] for p in model.mlp1.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("mlp1."))


def test_loss_falls_on_synthetic_task(tiny_ckpt, tmp_path):
    out = str(tmp_path / "sft")
    result = main(SFTConfig(ckpt=tiny_ckpt, synthetic_dir=str(tmp_path / "data"), n_train=32, n_eval=4, out=out,
                            steps=20, batch_size=2, warmup=1, lr=1e-2, eval_every=20, gen_eval=0,
                            train="llm,connector"))  # frozen ViT: no backward through its 1025 tokens a tile
    rows = read_metrics(out + ".metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.4 * losses[0], losses
    assert evals[-1] < 0.4 * evals[0], evals
    assert rows[0]["data_samples"] == 32 and rows[0]["data_truncated"] == 0
    assert result["steps"] == 20 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    SkyworkR1V.from_pretrained(out)  # the release format: what grpo.py starts from


def test_resume_continues_exactly(tiny_ckpt, tmp_path, monkeypatch):
    base = dict(ckpt=tiny_ckpt, synthetic_dir=str(tmp_path / "data"), n_train=6, n_eval=2, steps=4, batch_size=1,
                warmup=1, eval_every=100, gen_eval=0, train="llm")
    main(SFTConfig(**base, out=str(tmp_path / "a")))
    real_save = sft.save_checkpoint

    def save_then_crash(*args):  # the run dies right after its step-2 checkpoint
        real_save(*args)
        raise KeyboardInterrupt

    b = str(tmp_path / "b")
    monkeypatch.setattr(sft, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main(SFTConfig(**base, out=b, save_every=2))
    monkeypatch.undo()
    assert json.load(open(os.path.join(b, "train_state", "trainer_state.json")))["step"] == 2
    main(SFTConfig(**base, out=b, resume=True))

    def weights(d):
        return {k: v for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(d, f)).items()}
    wa, wb = weights(str(tmp_path / "a")), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in read_metrics(b + ".metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("line, error, words", [
    ('{"question": "q", "response": ', ValueError, "invalid JSON"),
    ('{"question": "q"}', ValueError, "response"),
    ('{"question": "q", "response": 5}', ValueError, "response"),
    ('{"images": ["nope.png"], "question": "q", "response": "R"}', ValueError, "nope.png"),
    ('{"images": ["bad.png"], "question": "q", "response": "R"}', ValueError, "bad.png"),
    ('{"messages": "hi"}', ValueError, "messages"),
    ('{"messages": [{"role": "bot", "content": "R"}]}', ValueError, "role"),
    ('{"images": ["red.png"], "question": "<image> <image> q", "response": "R"}', ValueError, "placeholders"),
])
def test_bad_data_names_file_and_line(tiny_ckpt, tmp_path, red_png, line, error, words):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    good = json.dumps({"question": "q", "response": GOOD})
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", line.replace("\"R\"", json.dumps(GOOD))])
    with pytest.raises(error, match=words) as e:
        load_data(path, tiny_ckpt)
    assert f"{path}:3" in str(e.value)


def test_untagged_responses_reported_and_skipped(tiny_ckpt, tmp_path, capsys):
    rows = [{"question": "q", "response": r} for r in
            (GOOD, "The answer is 2.", "<think>\nno box\n</think> 2", "\\boxed{2}", GOOD)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    exs, stats = load_data(path, tiny_ckpt)
    assert len(exs) == 2 and stats["untagged"] == 3
    assert stats["untagged_at"] == [f"{path}:{i}" for i in (2, 3, 4)]
    assert "skipped 3 sample(s)" in capsys.readouterr().out and f"{path}:2" in stats["untagged_at"]
    exs, stats = load_data(path, tiny_ckpt, allow_untagged=True)
    assert len(exs) == 5 and stats["untagged"] == 0
    write_jsonl(path, rows[1:2])
    with pytest.raises(ValueError, match="no usable samples"):
        load_data(path, tiny_ckpt)


def test_truncation_policy(tiny_ckpt, tmp_path, red_png):
    assert truncate([1, 2, 3, 4, 5], [0, 0, 1, 1, 1], 3, 99) == ([1, 2, 3], [0, 0, 1])  # tail of the response cut
    assert truncate([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], 3, 99) is None  # no assistant token left
    assert truncate([1, 99, 2, 3, 4], [1, 0, 0, 1, 1], 1, 99) is None  # would split an image's tokens
    assert truncate([1, 2], [0, 1], 3, 99) == ([1, 2], [0, 1])
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "q", "response": GOOD.replace("2", "2 " * 100)},  # long response: cut
        {"images": [red_png], "question": "q", "response": GOOD},       # 256 image tokens alone > 100: dropped
        {"question": "q", "response": GOOD},
    ])
    exs, stats = load_data(path, tiny_ckpt, max_len=100)
    assert (stats["truncated"], stats["dropped"], len(exs)) == (1, 1, 2)
    assert len(exs[0].ids) == 100 and exs[0].mask[-1] == 1


def test_data_order_and_flags():
    n, per = 10, 3
    seen = [i for s in range(10) for i in step_indices(s, n, per, seed=0)]  # 30 samples = 3 epochs
    assert all(sorted(seen[e * n:(e + 1) * n]) == list(range(n)) for e in range(3))
    assert seen[:n] != seen[n:2 * n]  # reshuffled every epoch
    ranks = [step_indices(4, n, per, 0, rank=r, world=2) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(step_indices(4, n, 2 * per, 0))  # ranks split one global batch
    cfg = parse_args(["--train", "vision,connector", "--max-len", "64", "--allow-untagged", "--lr", "1e-5"])
    assert (cfg.train, cfg.max_len, cfg.allow_untagged, cfg.lr) == ("vision,connector", 64, True, 1e-5)


def test_step_indices_are_data_shuffled_indices():
    """step_indices is data.shuffled_indices' stream cut into global batches, ranks interleaved: the same order as
    the earlier per-rank formula (sample k of the run = item k mod n of epoch k // n's seeded permutation)."""
    def per_rank_formula(step, n, per, seed, rank, world):
        ks = range(step * per * world + rank, (step + 1) * per * world, world)
        perm = lambda e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))  # noqa: E731
        return [int(perm(k // n)[k % n]) for k in ks]
    for step, n, per, seed, world in [(0, 10, 3, 0, 1), (7, 10, 3, 1, 2), (5, 7, 4, 3, 3), (11, 5, 1, 0, 8)]:
        for rank in range(world):
            assert step_indices(step, n, per, seed, rank, world) == per_rank_formula(step, n, per, seed, rank, world)
        assert step_indices(step, n, per * world, seed) == shuffled_indices(step * per * world, per * world, n, seed)


def selected_loss(model, batch, n_tokens, chunk=1024):
    """The loss as sft_loss computed it before: only the assistant positions, selected by a boolean mask."""
    hidden = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], return_hidden=True)
    targets = batch["labels"][:, 1:]
    keep = targets >= 0
    logp, ent = token_logprobs_and_entropy(model.language_model.lm_head, hidden[:, :-1][keep][None],
                                           targets[keep][None], chunk=chunk)
    return -logp.sum() / n_tokens, ent.detach().sum()


@pytest.mark.parametrize("chunk", [1024, 7])
def test_masked_loss_equals_selected_loss(tiny_ckpt, tmp_path, red_png, chunk):
    """Masking by multiplication over the full [B, T] gives the loss, entropy and gradients of selecting the
    assistant positions (padding, an image, a second turn; one chunk and many)."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"images": [red_png], "question": "How many?", "response": GOOD},
        {"question": "A longer question, " * 6, "response": GOOD.replace("2", "2 " * 12)},
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": GOOD},
                      {"role": "user", "content": "Again?"}, {"role": "assistant", "content": GOOD}]},
    ])
    exs, _ = load_data(path, tiny_ckpt)
    model, tok = SkyworkR1V.from_pretrained(tiny_ckpt), Tokenizer.from_dir(tiny_ckpt)
    batch = make_batch(exs, tok.pad_id, model.config, 12, "cpu")
    results = []
    for fn in (sft_loss, selected_loss):
        model.zero_grad(set_to_none=True)
        loss, ent = fn(model, batch, 37.0, chunk)
        loss.backward()
        results.append((loss.item(), ent.item(), [p.grad.clone() for p in model.parameters()]))
    (l1, e1, g1), (l2, e2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-6) and e1 == pytest.approx(e2, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g1, g2))


def test_loss_traces_under_fake_tensors(tiny_ckpt, tmp_path):
    """No host sync and no data-dependent shape in sft_loss: it runs on fake tensors (plan.py's dry run), where
    .item() or a boolean-mask index would raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = SkyworkR1V.from_pretrained(tiny_ckpt)
    T = 40
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        ids = torch.zeros(2, T, dtype=torch.long)
        labels = torch.full((2, T), -100, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones(2, T, dtype=torch.long), "labels": labels,
                 "pixel_values": None}
        loss, ent = sft_loss(model, batch, 10.0, chunk=16)
        loss.backward()
        assert mode.is_our_fake(loss) and loss.shape == () and ent.shape == ()


def heldout_worker(rank, ckpt, task, out):
    import parallel
    import tp
    ctx = setup(dtype="fp32")
    calls = []
    real = tp.TPDecoder.decode
    tp.TPDecoder.decode = lambda self, *a, **kw: calls.append(a[1].shape[0]) or real(self, *a, **kw)
    model, tok = parallel.load(ckpt, ctx).eval(), Tokenizer.from_dir(ckpt)
    problems = read_jsonl(task)
    cfg = SFTConfig(batch_size=2, max_new_tokens=12, max_tiles=1)
    got = sft.heldout_generation(model, tok, problems, cfg, ctx)
    torch.save({"result": got, "tp_calls": calls}, f"{out}.{rank}")


def test_heldout_generation_goes_through_the_tp_copy(tiny_ckpt, tmp_path):
    """SFT's held-out answers on 2 ranks are decoded by tp.py's tensor-parallel copy (each rank's prompts, every
    generate call: counted on TPDecoder.decode), not from the FSDP shards, and they are one process's answers
    (format rate, accuracy, rank 0's first text). Fails if sft.main generates without the copy."""
    from data import make_visual_task
    from ranks import WORLD, spawn
    task = make_visual_task(str(tmp_path / "task"), 4, 0, "heldout")
    spawn(heldout_worker, tiny_ckpt, task, str(tmp_path / "r"))
    ranks = [torch.load(f"{tmp_path / 'r'}.{r}") for r in range(WORLD)]
    assert all(r["tp_calls"] == [2] for r in ranks)  # one generate call of 2 prompts per rank, through the copy
    model, tok = SkyworkR1V.from_pretrained(tiny_ckpt), Tokenizer.from_dir(tiny_ckpt)
    want = sft.heldout_generation(model, tok, read_jsonl(task), SFTConfig(batch_size=2, max_new_tokens=12,
                                                                          max_tiles=1), setup(dtype="fp32"))
    assert ranks[0]["result"] == want, (ranks[0]["result"], want)


# ------------------------------------------------------------------------------------ your own runs (issue 23)

def test_run_keeps_curves_and_answers_and_a_rerun_is_refused(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Curves are drawn at every evaluation (a run killed before its final save keeps them); the held-out answers
    are saved as text; running again into the same --out is refused, one line, exit 2, before any weight is read,
    with nothing changed on disk."""
    import cli
    out = str(tmp_path / "sft")
    cfg = SFTConfig(ckpt=tiny_ckpt, synthetic_dir=str(tmp_path / "data"), n_train=4, n_eval=2, out=out, steps=1,
                    batch_size=1, warmup=0, eval_every=1, gen_eval=2, max_new_tokens=4, train="connector")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        main(cfg)
    assert os.path.isfile(out + ".png") and not os.path.isdir(out)  # drawn at the evaluations, before the save
    monkeypatch.undo()
    main(SFTConfig(**{**cfg.__dict__, "overwrite": True}))
    answers = read_metrics(out + ".heldout_answers.jsonl")
    assert len(answers) == 2 and all(isinstance(a["response"], str) and a["gold"] for a in answers)
    saved = json.load(open(out + ".run_config.json"))
    assert saved["config"]["steps"] == 1 and saved["preset"] is None
    capsys.readouterr()

    files = {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(tmp_path) for f in fs}
    monkeypatch.setattr(sft, "load", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(SystemExit) as e:
        cli.main(main, cfg, prog="sft.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"sft.py: error: {out} holds a previous run")
    assert "--resume" in err and "sft.metrics.jsonl" in err
    assert files == {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
                     for d, _, fs in os.walk(tmp_path) for f in fs}


def test_dropped_samples_named_by_line_with_a_hint(tiny_ckpt, tmp_path, red_png, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "q", "response": GOOD},
        {"images": [red_png], "question": "q", "response": GOOD},       # 256 image tokens alone > 100: dropped
        {"question": "q", "response": GOOD},
        {"images": [red_png], "question": "q2", "response": GOOD},
    ])
    exs, stats = load_data(path, tiny_ckpt, max_len=100)
    out = capsys.readouterr().out
    assert len(exs) == 2 and stats["dropped"] == 2
    assert f"{path}:2 (" in out and f"{path}:4 (" in out and "--max-tiles" in out and "1 tiles" in out


def test_every_problem_of_an_sft_file_at_once(tiny_ckpt, tmp_path, red_png):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "q", "response": GOOD},
        {"question": "q"},
        {"messages": [{"role": "bot", "content": GOOD}]},
        {"images": [red_png], "question": "<image> <image> q", "response": GOOD},
    ])
    with pytest.raises(ValueError) as e:
        load_data(path, tiny_ckpt)
    lines = str(e.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:{n}" for n in (2, 3, 4)], lines


def test_held_out_share_is_said(tiny_ckpt, tmp_path, capsys):
    from sft import load_datasets
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "response": GOOD}] * 10)
    cfg = SFTConfig(data=path, n_eval=64)
    train, held, _ = load_datasets(path, "", Tokenizer.from_dir(tiny_ckpt), cfg, R1VConfig.from_dir(tiny_ckpt),
                                   setup())
    assert (len(train), len(held)) == (5, 5)
    assert "no --eval-data: holding out 5 of the 10 samples" in capsys.readouterr().out
