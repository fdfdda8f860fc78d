import json
import math
import os
import random
import time

import pytest
import torch

from data import Tokenizer, make_visual_task, read_jsonl
from grpo import (TINY_RUN, GRPOConfig, Sample, SampleBuffer, batch_logprobs, describe_preset, encode_problems,
                  group_advantages, grpo_loss, load_problems, make_batch, old_logprobs, optimise, parse_args,
                  prompt_indices, response_logprobs, sample_groups, score, train)
from checkpoint import latest_checkpoint
from rewards import accuracy_reward, extract_boxed, format_reward
from model import SkyworkR1V
from parallel import setup


# ---------------------------------------------------------------------------------------------------------------
# rewards

R = "<think>\nsome reasoning\n</think>\nThe answer is "
ACCURACY_CASES = [  # (response, reference answer, expected reward)
    (R + r"\boxed{5}", "5", 1.0),
    (R + r"\boxed{5}", "6", 0.0),
    (R + r"\boxed{ 5 }", "5", 1.0),
    (R + r"$\boxed{-3}$", "-3", 1.0),
    (R + "\\boxed{\u22123}", "-3", 1.0),                        # unicode minus
    (R + r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (R + r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (R + r"\boxed{1/2}", "0.5", 1.0),
    (R + r"\boxed{\dfrac{2}{4}}", "1/2", 1.0),
    (R + r"\boxed{\tfrac12}", "0.5", 1.0),
    (R + r"\boxed{-\frac{3}{4}}", "-0.75", 1.0),
    (R + r"\boxed{\frac{-3}{4}}", "-3/4", 1.0),
    (R + r"\boxed{1\frac{1}{2}}", "3/2", 1.0),                  # mixed number
    (R + r"\boxed{0.33}", "1/3", 0.0),                         # exact comparison
    (R + r"\boxed{5.0}", "5", 1.0),
    (R + r"\boxed{.5}", "0.5", 1.0),
    (R + r"\boxed{1/0}", "1/0", 1.0),                          # not a number, equal strings
    (R + r"\boxed{1/0}", "0", 0.0),
    (R + r"\boxed{1,000}", "1000", 1.0),                       # thousands separators
    (R + r"\boxed{1{,}234{,}567}", "1234567", 1.0),
    (R + r"\boxed{1\,000}", "1000", 1.0),
    (R + r"\boxed{12,34}", "1234", 0.0),                       # not a thousands grouping
    (R + r"\boxed{90^\circ}", "90", 1.0),
    (R + r"\boxed{90^{\circ}}", "90", 1.0),
    (R + "\\boxed{90\u00b0}", "90^\\circ", 1.0),
    (R + r"\boxed{90 \text{ degrees}}", "90", 1.0),
    (R + r"\boxed{5 \text{ cm}}", "5", 1.0),
    (R + r"\boxed{5\mathrm{cm}}", "5 cm", 1.0),
    (R + r"\boxed{12 \text{ square units}}", "12", 1.0),
    (R + r"\boxed{3 m^2}", "3", 1.0),
    (R + r"\boxed{50\%}", "50", 1.0),
    (R + r"\boxed{x = 4}", "4", 1.0),
    (R + r"\boxed{\left(1, 2\right)}", "(1,2)", 1.0),
    (R + r"\boxed{\text{\textbf{7}}}", "7", 1.0),
    (R + r"\boxed{B}", "B", 1.0),
    (R + r"\boxed{(B)}", "B", 1.0),
    (R + r"\boxed{B. 12 cm}", "B", 1.0),
    (R + r"\boxed{B: twelve}", "(B)", 1.0),
    (R + r"\boxed{\text{(C)}}", "C", 1.0),
    (R + r"\boxed{Option D}", "D", 1.0),
    (R + r"\boxed{C}", "B", 0.0),
    (R + r"\boxed{b}", "B", 1.0),                              # a lower-case letter answers choice B
    (R + r"\boxed{(b)}", "B", 1.0),
    (R + r"\boxed{b}", "C", 0.0),
    (R + r"\boxed{B}", "b", 0.0),                              # a reference answer `b` is a word, not a choice
    (R + r"\boxed{\$5}", "5", 1.0),                             # an escaped dollar is currency, not a backslash
    (R + r"\boxed{\$5.00}", "\\$5", 1.0),
    (R + r"\boxed{\$6}", "5", 0.0),
    (R + r"\boxed{Blue}", "B", 0.0),
    (R + r"\boxed{red}", "Red", 1.0),
    (R + r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
    (R + r"\boxed{\frac{\sqrt{3}}{2}}", r"\dfrac{\sqrt{3}}{2}", 1.0),
    (R + r"\boxed{\{1, 2\}}", r"\{1,2\}", 1.0),
    (R + r"\boxed{f(\{x\})}", r"f(\{x\})", 1.0),               # escaped braces in the walk
    (R + r"\boxed{x+\frac{1}{2}}", r"\frac{x+1}{2}", 0.0),     # (x+1)/2 is not x+1/2
    (R + r"\boxed{\frac{\frac{1}{2}}{3}}", r"\frac{\frac{1}{2}}{3}", 1.0),   # nested braces
    (R + r"first \boxed{3} then \boxed{4}", "4", 1.0),         # several boxes: the last counts
    (R + r"first \boxed{4} then \boxed{3}", "4", 0.0),
    (R + r"\boxed{\boxed{6}}", "6", 1.0),
    (R + r"\boxed 5", "5", 1.0),                               # without braces
    (R + r"\boxed 5$.", "5", 1.0),
    (R + r"\boxed{}", "", 0.0),                                # empty
    (R + r"\boxed{ }", "5", 0.0),
    (R + r"\boxed{5", "5", 0.0),                               # unclosed
    (R + r"\boxed{5} and \boxed{", "5", 0.0),                  # the last box is unclosed
    (R + "5", "5", 0.0),                                       # no box
    ("", "5", 0.0),
    (R + r"\boxedx{5}", "5", 0.0),
    (R + r"\boxed{" + "1" * 60 + "}", "1" * 60, 1.0),           # long digit strings: string comparison
    (R + r"\boxed{" + "1" * 60 + "}", "1" * 59, 0.0),
    (R + r"\boxed{" + "9" * 300 + "}", "9" * 300, 0.0),        # longer than the boxed cap
    (R + r"\boxed{10^{10^{10^{10}}}}", "10^{10^{10^{10}}}", 1.0),
    (R + r"\boxed{1e5}", "100000", 0.0),                       # no exponents
]


@pytest.mark.parametrize("response,answer,expected", ACCURACY_CASES)
def test_accuracy_reward(response, answer, expected):
    assert accuracy_reward(response, answer) == expected


FORMAT_CASES = [
    ("<think>\nreason\n</think>\n\\boxed{5}", 1.0),
    ("reason</think>answer \\boxed{5}", 1.0),                   # the prompt already opened <think>
    ("  <think>reason</think>\n\\boxed{x+1}", 1.0),
    ("reason</think>no box", 0.0),
    ("reason \\boxed{5}</think>no box", 0.0),                   # a box inside the thinking does not count
    ("reason</think>\\boxed{}", 0.0),                           # empty box
    ("reason</think>\\boxed{5", 0.0),                           # unclosed box
    ("</think>\\boxed{5}", 0.0),                                # empty thinking
    ("<think>a</think><think>b</think>\\boxed{5}", 0.0),
    ("a</think>b</think>\\boxed{5}", 0.0),
    ("text<think>reason</think>\\boxed{5}", 0.0),               # text before <think>
    ("\\boxed{5}", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize("response,expected", FORMAT_CASES)
def test_format_reward(response, expected):
    assert format_reward(response) == expected


def test_extract_boxed():
    assert extract_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed(r"\boxed{a} \boxed{b}") == "b"
    assert extract_boxed(r"\boxed 7 apples") == "7"
    assert extract_boxed("no box") is None


def _adversarial():
    yield "{" * 100_000
    yield "{" * 500_000 + "}" * 500_000                         # 1 MB of braces
    yield "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}"
    yield "\\boxed{" * 10_000
    yield "\\boxed{" * 10_000 + "}" * 10_000
    yield "<think>" * 10_000 + "</think>" * 10_000
    yield "x</think>" + "\\boxed{" * 10_000 + "1" + "}" * 10_000
    yield "\\boxed{10^{10^{10^{10}}}}"
    yield "\\boxed{5^{5^{5^{5^5}}}}"
    yield "\\boxed{" + "9" * 500 + "}"
    yield "\\boxed{" + "9" * 45 + "/" + "0" * 45 + "}"
    yield "\\boxed{" + "1," * 20 + "000}"
    yield "\\boxed{" + "\\frac{" * 30 + "1" + "}{2}" * 30 + "}"
    yield "\\boxed{" + "\\text{" * 60 + "7" + "}" * 60 + "}"
    yield "\\boxed{" + "1" * 40 + "\\frac{" + "1" * 40 + "}{" + "1" * 40 + "}}"
    yield "\\boxed{" + "(" * 100 + "1" + ")" * 100 + "}"
    yield "\\boxed{" + "1." * 100 + "}"
    yield "\\boxed{" + "a=" * 100 + "}"
    yield "\\boxed{" + " " * 190 + "cm}"
    yield "\\boxed{1" + " m" * 90 + "}"
    yield "\\boxed{" + "\\left" * 40 + "}"
    yield "\\boxed " + "x" * 1_000_000
    yield "\\boxed{\x00\x00}\x00" * 1000
    yield "\\boxed{\U0001F600\u0301\u200b\ufeff}" * 1000
    yield "\\" * 1_000_000
    yield "\\boxed{" + "\\" * 199 + "}"
    yield "</think>" + "\\boxed{1}" * 100_000


def test_reward_fuzz():
    rng = random.Random(0)
    alphabet = list("{}\\$^_()[]/,. -+=:%0123456789abcxyzABCDE\n\t") + [
        "\\boxed{", "\\boxed ", "\\frac{", "\\dfrac", "\\text{", "^\\circ", "</think>", "<think>", "\\left", "\\right",
        "\u00b0", "\u2212", "\x00", "\U0001F600", "\u0301", "1,000", "{,}", "cm", "degrees", "(B)", "e9999"]
    cases = list(_adversarial()) + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
                                    for _ in range(3000)]
    answers = ["5", "1/2", "B", "", "\\frac{1}{2}", "1" * 500, "{" * 1000]
    # CPU time of this thread, not wall time: catastrophic backtracking costs seconds of CPU, while a loaded machine
    # only adds waiting (wall-clock limits failed here under other jobs' load)
    worst, start = 0.0, time.thread_time()
    for i, text in enumerate(cases):
        t = time.thread_time()
        a = accuracy_reward(text, answers[i % len(answers)])
        f = format_reward(text)
        worst = max(worst, time.thread_time() - t)
        assert a in (0.0, 1.0) and f in (0.0, 1.0)
    total = time.thread_time() - start
    assert worst < 0.02, f"slowest string took {worst * 1e3:.1f} ms"
    assert total < 5.0


# ---------------------------------------------------------------------------------------------------------------
# math

def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, flat = group_advantages(r, 4)
    s = math.sqrt(1 / 3)                                        # unbiased std of [1, 0, 0, 1]
    want = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (s + 1e-6) * torch.tensor([1.0] * 4 + [0.0] * 4)
    torch.testing.assert_close(adv, want)
    assert flat.tolist() == [False, True]
    adv, _ = group_advantages(torch.tensor([3.0, 1.0, 0.0, 0.0]), 4, scale=False)   # unnormalised: r - mean
    torch.testing.assert_close(adv, torch.tensor([2.0, 0.0, -1.0, -1.0]))


def test_group_advantages_flat_and_single():
    adv, flat = group_advantages(torch.full((6,), 0.1), 3)        # 0.1 is inexact in binary: still exactly 0
    assert torch.equal(adv, torch.zeros(6)) and flat.all()
    adv, flat = group_advantages(torch.tensor([1.0, 0.0, 2.0]), 1)   # G = 1: every group is flat
    assert torch.equal(adv, torch.zeros(3)) and flat.all()
    adv, _ = group_advantages(torch.tensor([1.0, 1.0 + 1e-7]), 2)
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("adv,ratio,zero_grad", [
    (1.0, 1.5, True),     # A > 0, ratio > 1 + clip_high: clipped
    (1.0, 1.2, False),    # inside the range
    (1.0, 0.5, False),    # A > 0 and ratio < 1 - clip_low: pessimistic branch is the unclipped one
    (-1.0, 0.5, True),    # A < 0, ratio < 1 - clip_low: clipped
    (-1.0, 0.9, False),
    (-1.0, 1.5, False),   # A < 0 and ratio > 1 + clip_high: unclipped, still pushed down
])
def test_clipped_loss_gradient(adv, ratio, zero_grad):
    logp_old = torch.tensor([[-1.0]])
    logp = (logp_old + math.log(ratio)).requires_grad_()
    loss, m = grpo_loss(logp, logp_old, torch.tensor([adv]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
    loss.backward()
    assert (logp.grad.abs().item() == 0) == zero_grad
    assert m["clip_frac"] == float(zero_grad)
    if not zero_grad:
        torch.testing.assert_close(logp.grad, torch.tensor([[-adv * ratio]]))   # d(-A e^x)/dx


def test_loss_token_mean_and_mask():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -2.0]), mask)
    torch.testing.assert_close(loss, torch.tensor((-1 - 1 - 1 + 2) / 4))   # over the 4 response tokens
    loss.backward()
    assert logp.grad[1, 1:].abs().sum() == 0                      # padding gets no gradient


def test_k3_kl():
    logp = torch.log_softmax(torch.randn(2, 5), -1)
    mask = torch.ones(2, 5)
    _, m = grpo_loss(logp, logp, torch.zeros(2), mask, beta=0.1, logp_ref=logp.clone())
    assert m["kl"] == 0
    ref = logp + 0.3 * torch.randn(2, 5)
    loss, m = grpo_loss(logp, logp, torch.zeros(2), mask, beta=0.1, logp_ref=ref)
    assert m["kl"] > 0 and loss > 0
    _, m = grpo_loss(logp, logp, torch.zeros(2), mask)              # beta = 0: no KL at all
    assert "kl" not in m


def test_sample_buffer():
    buf = SampleBuffer(capacity=3, max_age=2)
    buf.add(["a", "b", "c", "d"], [0.0, 2.0, -3.0, 0.5], step=0)     # "a" has no signal
    assert [s for _, _, s in buf.items] == ["c", "b", "d"]
    buf.add(["e"], [1.0], step=1)
    assert [s for _, _, s in buf.items] == ["c", "b", "e"]           # capacity: smallest |A| dropped
    samples, adv, n = buf.mix(["x", "y", "z"], [0.0, 0.0, 1.0], [True, True, False], flat_frac=0.4, threshold=0.5)
    assert n == 0 and samples == ["x", "y", "z"]
    samples, adv, n = buf.mix(["x", "y", "z"], [0.0, 0.0, 1.0], [True, True, False], flat_frac=0.7, threshold=0.5)
    assert (samples, adv, n) == (["c", "b", "z"], [-3.0, 2.0, 1.0], 2)
    assert [s for _, _, s in buf.items] == ["e"]                     # used once
    buf.add([], [], step=3)
    assert len(buf) == 0                                             # too old


def test_sample_buffer_state_roundtrip():
    buf = SampleBuffer(4, 3)
    buf.add([Sample(3, torch.tensor([5, 6, 7])), Sample(1, torch.tensor([9]))], [0.7, -1.25], step=2)
    other = SampleBuffer(4, 3)
    other.load_state_dict(buf.state_dict())
    assert [(s, a, p.problem, p.response.tolist()) for s, a, p in other.items] == \
        [(2, -1.25, 1, [9]), (2, 0.7, 3, [5, 6, 7])]


# ---------------------------------------------------------------------------------------------------------------
# the loop, on the tiny checkpoint

TIMING = ("step_time", "tokens_per_s", "rollout_time", "refresh_time")  # wall-clock: differ run to run


def strip(rows: list) -> list:
    """Metric rows without their wall-clock figures (TIMING)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(autouse=True)
def _one_thread():
    # the tiny model's ops take microseconds: with 2 intra-op threads on 2 shared cores they spend most of their
    # time waiting for each other (30x slower per op under load), so these tests run single-threaded
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vowel_reward(text, answer):  # a reward a random tiny model can climb: the share of vowels in its output
    return sum(c in "aeiou" for c in text) / max(1, len(text))


def text_task(tmp_path, n=1):
    """Text-only problems: no ViT in the loop, so loop tests stay fast (the image path has its own test)."""
    path = tmp_path / f"task{n}.jsonl"
    path.write_text("".join(json.dumps({"question": f"Say something {i}.", "answer": "a"}) + "\n" for i in range(n)))
    return str(path)


def small_cfg(ckpt, out_dir, **kw):
    base = dict(ckpt=ckpt, out_dir=str(out_dir), steps=2, prompts_per_step=2, group_size=8, max_new_tokens=8,
                rollout_batch_size=16, lr=1e-2, ppo_epochs=2, minibatch_size=8, micro_batch_size=8, eval_size=0,
                eval_every=2, save_every=100)
    return GRPOConfig(**{**base, **kw})


def rollout_samples(m, tok, problems, idxs, cfg, ctx, seed=0):
    """grpo.train's step 1 on problems idxs -> (samples, prompts, rewards, stats)."""
    prompts = encode_problems(problems, idxs, tok, m, cfg, ctx)
    groups = sample_groups(m, tok, [prompts[i] for i in idxs], cfg, ctx, torch.Generator().manual_seed(seed))
    rewards, stats = score(tok, groups, [problems[i]["answer"] for i in idxs], vowel_reward, cfg.max_new_tokens)
    samples = [Sample(i, torch.tensor(r, dtype=torch.long)) for i, g in zip(idxs, groups) for r in g]
    return samples, prompts, rewards, stats


def mean_sampled_reward(ckpt_dir, tok, task, n=128):
    """Mean reward of n fresh samples (fixed seed) for the task's prompt."""
    m = SkyworkR1V.from_pretrained(ckpt_dir)
    problems = read_jsonl(task)
    cfg, ctx = GRPOConfig(group_size=n, max_new_tokens=8, rollout_batch_size=n, max_tiles=1), setup()
    return rollout_samples(m, tok, problems, [0], cfg, ctx, seed=123)[3]["reward"]


def test_grpo_raises_reward(tiny_ckpt, tmp_path):
    task = text_task(tmp_path)
    cfg = small_cfg(tiny_ckpt, tmp_path / "run", data=task, steps=5)
    history = train(cfg, vowel_reward)
    assert [h["step"] for h in history] == list(range(1, 6))
    assert all(math.isfinite(h["loss"]) and h["skipped_updates"] == 0 for h in history)
    assert 0 < history[0]["clip_frac"] < 1 and history[0]["entropy"] > 0
    tok = Tokenizer.from_dir(tiny_ckpt)
    before, after = mean_sampled_reward(tiny_ckpt, tok, task), mean_sampled_reward(latest_checkpoint(cfg.out_dir), tok, task)
    assert after > before + 0.05, (before, after)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 6))
    for key in ("reward", "accuracy", "format", "response_len", "entropy", "clip_frac", "flat_frac", "tokens_per_s"):
        assert key in rows[-1]


def test_response_logprobs_match_full_forward(tiny_ckpt, tmp_path):
    """Batched, padded, prompt-aligned log-probs == one full forward per sample; images fill the right rows."""
    m, tok, ctx = SkyworkR1V.from_pretrained(tiny_ckpt), Tokenizer.from_dir(tiny_ckpt), setup()
    problems = read_jsonl(make_visual_task(str(tmp_path), 1, 0, "train")) + read_jsonl(text_task(tmp_path))
    cfg = GRPOConfig(group_size=2, max_new_tokens=5, rollout_batch_size=4, logprob_chunk=3, max_tiles=1)
    samples, prompts, _, _ = rollout_samples(m, tok, problems, [1, 0], cfg, ctx)
    img = m.config.img_context_token_id
    samples.append(Sample(0, torch.tensor([5, 6, img])))   # a sampled <IMG_CONTEXT> ends a response
    batch = make_batch(samples, [0.0] * len(samples), prompts, tok.pad_id, img)
    logp, ent, mask = response_logprobs(m, batch, cfg, ctx)
    for b, s in enumerate(samples):
        prompt, pix, _ = prompts[s.problem]
        ids = torch.cat([prompt, s.response])[None, :-1]
        logits = m(ids, pix)[0, len(prompt) - 1:].float()
        want = logits.log_softmax(-1).gather(-1, s.response[:, None])[:, 0]
        n = len(s.response)
        torch.testing.assert_close(logp[b, :n], want, atol=1e-5, rtol=1e-5)
        assert mask[b].sum() == n and not mask[b, n:].any()
        assert (ent[b, :n] > 0).all()


def test_resume_matches_uninterrupted(tiny_ckpt, tmp_path):
    # G = 2 and a 0/1 reward give many flat groups, so the sample buffer is filled, saved, restored and mixed in
    coin = lambda text, answer: float(len(text) % 2)  # noqa: E731
    task = text_task(tmp_path, 3)
    # text-only prompts give the connector no gradient: resume must restore an AdamW state in which some trainable
    # parameters never stepped (and the default bf16 moments must stay bf16 through the round trip)
    kw = dict(data=task, eval_data=task, eval_every=1, group_size=2, max_new_tokens=6, flat_threshold=0.0,
              ppo_epochs=1, minibatch_size=2, micro_batch_size=2)
    full = train(small_cfg(tiny_ckpt, tmp_path / "a", steps=3, **kw), coin)
    train(small_cfg(tiny_ckpt, tmp_path / "b", steps=1, **kw), coin)
    resumed = train(small_cfg(tiny_ckpt, tmp_path / "b", steps=3, resume=True, **kw), coin)
    assert full[1]["buffer_size"] > 0 and sum(h["buffer_mixed"] for h in full[2:]) > 0
    assert strip(resumed) == strip(full[2:])                # steps 2, 3 (full[0] is the step-0 evaluation)
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert strip(rows) == strip(full)                       # the log reads as one run


def test_update_does_not_depend_on_how_many_numbers_the_rollout_drew(tiny_ckpt, tmp_path, monkeypatch):
    """How many random numbers a rollout draws depends on where its rows finish and how often the host checks
    (generate.CHECK_EVERY); it must not move the update. The minibatch order has its own stream, so a rollout that
    draws more (the same samples) gives the same step. With one shared stream the shuffles moved: a CHECK_EVERY of
    1 vs 8 changed the default run's losses from its first step."""
    import grpo
    task = text_task(tmp_path, 2)
    kw = dict(data=task, steps=1, ppo_epochs=2, minibatch_size=4, micro_batch_size=4, group_size=4)
    want = train(small_cfg(tiny_ckpt, tmp_path / "a", **kw), vowel_reward)
    real = grpo.sample_groups

    def drawing_more(m, tok, prompts, cfg, ctx, gen, decoder=None):
        groups = real(m, tok, prompts, cfg, ctx, gen, decoder)
        torch.rand(7, generator=gen)  # e.g. 7 steps sampled past the last row's end before the host looked
        return groups
    monkeypatch.setattr(grpo, "sample_groups", drawing_more)
    got = train(small_cfg(tiny_ckpt, tmp_path / "b", **kw), vowel_reward)
    assert strip(got) == strip(want)


def test_synthetic_task_with_kl(tiny_ckpt, tmp_path):
    """The default run's path (synthetic images, held-out eval, checkpoint) with the k3 KL term on."""
    cfg = small_cfg(tiny_ckpt, tmp_path / "run", steps=1, prompts_per_step=1, group_size=2, max_new_tokens=4,
                    synthetic_size=2, eval_size=1, minibatch_size=2, micro_batch_size=2, beta=0.1)
    history = train(cfg, vowel_reward)
    assert history[0] == {"step": 0, "heldout_accuracy": 0.0}
    assert history[1]["kl"] > 0                             # 0 on the first update, > 0 once the policy moved
    assert "heldout_accuracy" in history[1]
    assert os.path.isfile(tmp_path / "run" / "step_000001" / "config.json")


def test_nan_loss_skips_update(tiny_ckpt, tmp_path):
    cfg = small_cfg(tiny_ckpt, tmp_path / "run", data=text_task(tmp_path), steps=1, ppo_epochs=1, minibatch_size=16)
    with pytest.warns(UserWarning, match="non-finite loss"):
        history = train(cfg, lambda text, answer: float("nan"))
    assert history[-1]["skipped_updates"] == 1
    before, after = SkyworkR1V.from_pretrained(tiny_ckpt), SkyworkR1V.from_pretrained(latest_checkpoint(cfg.out_dir))
    for (name, p), q in zip(before.named_parameters(), after.parameters()):
        assert torch.equal(p, q), name


def test_missing_checkpoint_and_bad_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                             # no out/sft here
    with pytest.raises(FileNotFoundError, match="python sft.py"):
        train(GRPOConfig())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*answer"):
        load_problems(GRPOConfig(data=str(bad)))


def test_prompt_indices_and_args():
    steps = [prompt_indices(s, 5, 2, seed=0) for s in range(1, 6)]     # 10 draws = 2 epochs of 5 problems
    flat = sum(steps, [])
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    assert prompt_indices(3, 5, 2, seed=0) == steps[2]
    assert parse_args([]).lr == TINY_RUN["lr"] and parse_args([]).ckpt == "out/sft"
    cfg = parse_args(["--ckpt", "x", "--no-scale_adv", "--beta", "0.001"])
    assert (cfg.lr, cfg.scale_adv, cfg.beta, cfg.group_size) == (1e-6, False, 0.001, 8)


def test_presets_are_named_and_printed():
    """`python grpo.py` runs the tiny preset and says so with the values that differ from the recipe; --ckpt alone
    keeps the recipe (r1v3); --preset picks either explicitly; explicit flags win over both."""
    tiny = describe_preset(parse_args([]))
    assert tiny.startswith("preset: tiny (") and "steps=40" in tiny and "lr=0.0001" in tiny
    assert "group_size" not in tiny                                       # same in both: not listed
    assert describe_preset(parse_args(["--ckpt", "x"])) == "preset: r1v3 (ckpt=x)"
    cfg = parse_args(["--ckpt", "x", "--preset", "tiny", "--steps", "3"])
    assert (cfg.preset, cfg.steps, cfg.lr) == ("tiny", 3, TINY_RUN["lr"])
    assert parse_args(["--preset", "r1v3"]).steps == GRPOConfig().steps


# ------------------------------------------------------------------------ each piece of work once (issue 14)

@pytest.mark.parametrize("ppo_epochs, minibatch_size", [(2, 8), (1, 64)])
def test_vit_runs_once_per_prompt_per_step(tiny_ckpt, tmp_path, monkeypatch, ppo_epochs, minibatch_size):
    """With the ViT frozen (the default), a step's tiles go through the ViT in one call, each prompt's once, and the
    rollout, the old log-probs and the PPO epochs reuse them; the metrics count it (an on-policy update, one epoch
    and one minibatch, makes no old-log-prob pass: grpo.old_logprobs)."""
    from data import encode_prompt
    from vision import InternViT
    calls, real = [], InternViT.forward
    monkeypatch.setattr(InternViT, "forward", lambda self, pv, *a, **kw: calls.append(pv.shape[0]) or real(
        self, pv, *a, **kw))
    task = make_visual_task(str(tmp_path), 8, 0, "train")
    cfg = small_cfg(tiny_ckpt, tmp_path / "run", data=task, group_size=4, rollout_batch_size=8, max_tiles=2,
                    flat_threshold=1.0, ppo_epochs=ppo_epochs, minibatch_size=minibatch_size)  # no buffer mixing
    history = train(cfg, vowel_reward)
    tok, problems = Tokenizer.from_dir(tiny_ckpt), read_jsonl(task)
    config = SkyworkR1V.from_pretrained(tiny_ckpt).config
    for step, h in enumerate(history, 1):
        idxs = set(prompt_indices(step, len(problems), cfg.prompts_per_step, cfg.seed))
        tiles = sum(encode_prompt(tok, config, problems[i]["question"], problems[i]["images"], 2)[1].shape[0]
                    for i in idxs)
        assert h["vit_tiles"] == tiles > 0
    assert [c for c in calls if c] == [h["vit_tiles"] for h in history]


def test_step_features_give_the_loss_and_gradients_of_pixels(tiny_ckpt, tmp_path):
    """The GRPO loss and every gradient (connector, decoder) from the step's ViT features equal those from pixels
    through the ViT (today's computation, and what a training ViT uses), on a fixed batch with images and text."""
    m, tok, ctx = SkyworkR1V.from_pretrained(tiny_ckpt).train(), Tokenizer.from_dir(tiny_ckpt), setup()
    problems = read_jsonl(make_visual_task(str(tmp_path), 2, 0, "train")) + read_jsonl(text_task(tmp_path))
    cfg = GRPOConfig(group_size=2, max_new_tokens=6, rollout_batch_size=4, logprob_chunk=5, max_tiles=2)
    samples, prompts, _, _ = rollout_samples(m, tok, problems, [0, 2, 1], cfg, ctx)
    adv = torch.linspace(-1, 1, len(samples))
    old = None
    out = {}
    for features in (True, False):
        m.zero_grad(set_to_none=True)
        batch = make_batch(samples, adv.tolist(), prompts, tok.pad_id, m.config.img_context_token_id, features)
        logp, _, mask = response_logprobs(m, batch, cfg, ctx)
        old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)) \
            if old is None else old
        loss, _ = grpo_loss(logp, old, adv, mask)
        loss.backward()
        out[features] = loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                        if not n.startswith("vision_model")}
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=0)
    for name, g in out[False][1].items():
        assert g is not None or out[True][1][name] is None, name
        torch.testing.assert_close(out[True][1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert out[True][1]["mlp1.1.weight"].abs().sum() > 0   # the connector did get gradient through the features


def test_on_policy_update_skips_the_old_pass_and_gives_the_same_step(tiny_ckpt, tmp_path):
    """One epoch and one minibatch make one optimizer step: grpo.old_logprobs returns None and optimise uses the
    update's own log-probs, detached. The step (SGD, so the update is the gradient itself) equals the one taken with
    the separate no-grad pass; with two epochs or two minibatches the pass is still made."""
    tok, ctx = Tokenizer.from_dir(tiny_ckpt), setup()
    problems = read_jsonl(make_visual_task(str(tmp_path), 2, 0, "train")) + read_jsonl(text_task(tmp_path))
    cfg = GRPOConfig(group_size=2, max_new_tokens=6, rollout_batch_size=4, max_tiles=1, ppo_epochs=1,
                     minibatch_size=6, micro_batch_size=4, grad_clip=1e9)
    m = SkyworkR1V.from_pretrained(tiny_ckpt).train()
    samples, prompts, _, _ = rollout_samples(m, tok, problems, [0, 2, 1], cfg, ctx)
    adv = torch.linspace(-1, 1, len(samples))
    batch = make_batch(samples, adv.tolist(), prompts, tok.pad_id, m.config.img_context_token_id)
    assert len(batch) == 6 and old_logprobs(m, batch, cfg, ctx) is None
    for other in (dict(ppo_epochs=2), dict(minibatch_size=3)):
        off = GRPOConfig(**{**cfg.__dict__, **other})
        assert old_logprobs(m, batch, off, ctx).shape == batch.targets.shape
    steps, metrics = {}, {}
    for way, old in (("pass", batch_logprobs(m, batch, cfg, ctx)), ("on-policy", None)):
        model = SkyworkR1V.from_pretrained(tiny_ckpt).train()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        batch.old_logp = old
        metrics[way] = optimise(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, cfg, ctx,
                                torch.Generator().manual_seed(1))
        steps[way] = {n: p.detach() - start[n] for n, p in model.named_parameters()}
    moved = 0
    for name, d in steps["pass"].items():
        torch.testing.assert_close(steps["on-policy"][name], d, rtol=1e-4, atol=1e-7, msg=name)
        moved += bool(d.abs().sum() > 0)
    assert moved > 10  # the decoder and connector did move
    assert metrics["on-policy"]["ratio_mean"] == 1.0 and metrics["on-policy"]["clip_frac"] == 0.0
    assert metrics["on-policy"]["entropy"] == pytest.approx(metrics["pass"]["entropy"], rel=1e-5)
    assert metrics["on-policy"]["entropy"] > 0


def test_score_counts_truncated_responses(tiny_ckpt):
    """A response that reached max_new_tokens without <|im_end|> was cut: truncation_rate counts them (a short one
    without it, or a long one ending in it, was not cut)."""
    tok = Tokenizer.from_dir(tiny_ckpt)
    ids = tok.encode("<think>\nx\n</think>\n\\boxed{3}")
    rewards, stats = score(tok, [[ids + [tok.eos_id], ids], [ids[:2], ids + [tok.eos_id]]], ["3", "4"],
                           lambda text, answer: float(answer in text), max_new_tokens=len(ids))
    assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert stats["truncation_rate"] == 0.25 and stats["accuracy"] == 0.5


def test_a_run_you_can_debug(tiny_ckpt, tmp_path):
    """rollouts.jsonl holds the step's responses as text with rewards and gold answers, heldout_answers.jsonl the
    greedy answers; a run whose every group stays flat warns (flat_patience); --keep-last prunes old checkpoints;
    run_config.json records the config and its preset."""
    task = text_task(tmp_path, 2)
    cfg = small_cfg(tiny_ckpt, tmp_path / "run", data=task, eval_data=task, steps=2, save_every=1, keep_last=1,
                    log_rollouts=1, flat_patience=2, group_size=2, ppo_epochs=1, minibatch_size=4, micro_batch_size=4)
    with pytest.warns(UserWarning, match="every group has been flat .* for 2 steps"):
        train(cfg, lambda text, answer: 1.0)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "rollouts.jsonl")]
    assert [r["step"] for r in rows] == [1, 1, 2, 2]                          # 1 prompt x G = 2 per step
    assert all(r["answer"] == "a" and r["reward"] == 1.0 and isinstance(r["response"], str) for r in rows)
    answers = [json.loads(line) for line in open(tmp_path / "run" / "heldout_answers.jsonl")]
    assert sorted({a["step"] for a in answers}) == [0, 2] and all("response" in a for a in answers)
    assert set(os.listdir(tmp_path / "run")) - {"curves.png"} == {     # (curves.png: if matplotlib is there)
        "heldout_answers.jsonl", "metrics.jsonl", "rollouts.jsonl", "run_config.json", "step_000002"}
    assert json.load(open(tmp_path / "run" / "run_config.json"))["config"]["keep_last"] == 1
