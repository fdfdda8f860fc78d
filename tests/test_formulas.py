"""Every formula of the recipe, pinned against an independent computation (issue 18).

Each test compares the code with something that does not share its code path: numbers worked out by hand in the
comments, a brute-force / exact alternative written out here (loops, complex numbers, Python's `statistics`), or
PyTorch's own implementation (torch.optim.AdamW, torch.log_softmax, torch.distributions.Categorical). No expected
value was copied from the code's output. Tiny shapes, CPU, no checkpoint: the module runs in a few seconds.

Breakages each test is there to catch. Every row was tried, one at a time, in a scratch copy of the repository:
each makes the tests named fail, and all pass without it.

  test                                         breakage (in the code under test)
  -------------------------------------------  ---------------------------------------------------------------------
  test_group_advantages_scaled_unbiased_std    biased std (unbiased=False); 1e-6 dropped; mean not subtracted; groups
                                               not contiguous (view(G, -1)); flat check never true
  test_group_advantages_vs_statistics_stdev    biased std, 1e-6 dropped, mean not subtracted, non-contiguous groups,
                                               on random rewards vs statistics.stdev (ddof 1)
  test_group_advantages_unscaled_and_flat      scale=False still divides by std; flat check never true; mean not
                                               subtracted; groups not contiguous
  test_clipped_surrogate_values_and_grads      min instead of max; clip_low / clip_high swapped; ratio =
                                               exp(logp_old - logp); gradient flowing through a clipped token
                                               (straight-through clamp)
  test_clip_fraction_metrics                   clip_frac_high counting the low side; ratio reversed
  test_token_mean_over_micro_batches           loss = per-sequence mean; num_tokens ignored (each micro-batch divided
                                               by its own token count); ratio reversed
  test_optimise_accumulates_token_mean         grpo.optimise passing the micro-batch's token count, or a per-sequence
                                               mean, instead of the minibatch's count; grpo_loss's per-sequence mean,
                                               ignored num_tokens, reversed ratio
  test_k3_mean_approaches_exact_kl             k3 argument reversed (x = logp - logp_ref); k2 (x^2 / 2) instead of k3
  test_k3_hand_values_and_gradient             k3 argument reversed; k2 instead of k3
  test_adamw_fp32_moments_equal_torch_adamw    weight decay without lr (p *= 1 - wd); weight decay after the Adam
                                               update; coupled L2 (g += wd p); no bias correction; bias correction
                                               one step ahead; eps inside the sqrt; lr read from the defaults (stale)
  test_adamw_bf16_moments_close_to_torch_adamw the same except decay-after-update and eps-inside-sqrt (below its
                                               stated tolerance); moments stored in fp32 instead of bf16
  test_lr_schedule_closed_form                 warmup off by one (step / W); cosine progress off by one; no
                                               min_lr_ratio (decay to 0); no clamp after total_steps
  test_chunked_logprobs_entropy_vs_torch       temperature dropped from the log-probs, or multiplied; temperature
                                               dropped from the entropy only; ignore index not giving 0; chunks
                                               concatenated out of order
  test_chunked_gradients_vs_torch              the same, for the gradients (activation-checkpointed chunks)
  test_sampling_temperature_and_top_p          sampling temperature dropped; nucleus dropping the token that crosses
                                               top_p (cumsum > top_p)
  test_rope_rotation_vs_complex_numbers        RoPE sign (cat(x2, -x1)); interleaved pairs instead of halves;
                                               inv_freq exponent 2i/(d - 2)
  test_rope_left_padding                       the same three; positions ignoring left padding (arange)
  test_pixel_shuffle_vs_internvl_code          channel order (b a d); token order (j i); the v1 order (both)
  test_pixel_shuffle_brute_force               the same three
  test_sample_buffer_choice                    smallest |A| first; oldest first among equal |A|; age limit off by one
                                               (<= max_age); mixing at flat_frac == threshold; used samples kept;
                                               |A| <= min_abs_adv kept
  test_critical_positions_hand_computed        token of a cue off by one (bisect_left); a shorter cue winning over a
                                               longer one with the same start; word-boundary check dropped
  test_critical_positions_byte_tokens          token of a cue off by one (bisect_left), with characters split over
                                               byte tokens

Found while writing these (test_top_p_nucleus_at_an_exact_boundary): generate.sample kept one token too many when the
probability mass before it equalled top_p exactly (`>` where the docstring's "smallest set whose probability reaches
top_p", and HF's TopPLogitsWarper, mean `>=`); fixed in generate.sample.
"""
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from connector import pixel_shuffle
from entropy import critical_positions
from generate import sample
from grpo import GRPOConfig, SampleBuffer, group_advantages, grpo_loss
from model import apply_rope, positions, rope_cos_sin, token_logprobs_and_entropy
from optim import LowPrecisionAdamW, lr_at

import grpo


# ---------------------------------------------------------------------------------------------------------------
# group advantages: A_i = (r_i - mean_g r) / (std_g r + 1e-6), std unbiased (ddof 1).
# GRPO (DeepSeekMath eq. 3) writes std(r) without saying which; the reference implementations the R1V recipe builds
# on (verl's compute_grpo_outcome_advantage, TRL's GRPOTrainer, OpenRLHF) all call torch.std, which is unbiased, and
# grpo.py's docstring says so: pinned to unbiased.

def test_group_advantages_scaled_unbiased_std():
    rewards = torch.tensor([1., 0., 0., 0.,   1., 1., 0., 0.,   2., 2., 2., 2.])
    adv, flat = group_advantages(rewards, 4)
    # group 1: mean 0.25, deviations (0.75, -0.25, -0.25, -0.25), sum of squares 0.75;
    #          unbiased std = sqrt(0.75 / 3) = 0.5      (biased: sqrt(0.75 / 4) = 0.433 -> A = 1.732)
    # group 2: mean 0.5, deviations +-0.5, sum of squares 1; unbiased std = sqrt(1/3) (biased: 0.5 -> A = +-1)
    # group 3: flat -> 0
    s2 = math.sqrt(1 / 3)
    want = [0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3 + [0.5 / (s2 + 1e-6)] * 2 + [-0.5 / (s2 + 1e-6)] * 2 \
        + [0.0] * 4
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-6)
    assert flat.tolist() == [False, False, True]
    assert adv[0].item() == pytest.approx(1.5, abs=1e-5)          # the round number, for the reader


def test_group_advantages_vs_statistics_stdev():
    g = torch.Generator().manual_seed(1)
    G = 5
    rewards = torch.randint(0, 4, (6 * G,), generator=g).float() / 2   # some groups may be flat
    adv, flat = group_advantages(rewards, G)
    want, want_flat = [], []
    for k in range(6):
        r = [float(x) for x in rewards[k * G:(k + 1) * G]]
        mu = statistics.fmean(r)
        if max(r) == min(r):
            want += [0.0] * G
        else:
            want += [(x - mu) / (statistics.stdev(r) + 1e-6) for x in r]   # stdev: ddof 1
        want_flat.append(max(r) == min(r))
    torch.testing.assert_close(adv, torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert flat.tolist() == want_flat


def test_group_advantages_unscaled_and_flat():
    rewards = torch.tensor([1., 0., 0., 0.,   3., 3., 3., 3.,   0.5, 1.5, 1.0, 1.0])
    adv, flat = group_advantages(rewards, 4, scale=False)
    want = [0.75, -0.25, -0.25, -0.25,   0., 0., 0., 0.,   -0.5, 0.5, 0., 0.]   # r - mean, no division
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-7)
    assert flat.tolist() == [False, True, False]
    adv1, flat1 = group_advantages(torch.tensor([0., 1., 1.]), 1)              # G = 1: every group is flat
    assert adv1.tolist() == [0., 0., 0.] and flat1.tolist() == [True] * 3


# ---------------------------------------------------------------------------------------------------------------
# clipped surrogate: PPO maximises min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A); the loss is its negative.
# Six one-token rows, one for each side of each clip (eps_low 0.2, eps_high 0.28):
#   ratio  A    ratio*A  clip(ratio)*A   min -> objective   d objective / d logp  (= ratio * A when unclipped)
#   1.5   +1     1.5        1.28           1.28  (clipped)      0
#   1.5   -1    -1.5       -1.28          -1.5                 -1.5
#   0.5   -1    -0.5       -0.8           -0.8   (clipped)      0
#   0.5   +1     0.5        0.8            0.5                  0.5
#   1.1   +1     1.1        1.1            1.1                  1.1
#   1.1   -1    -1.1       -1.1           -1.1                 -1.1

CLIP_CASES = [  # ratio, A, objective, d objective / d logp
    (1.5, 1.0, 1.28, 0.0),
    (1.5, -1.0, -1.5, -1.5),
    (0.5, -1.0, -0.8, 0.0),
    (0.5, 1.0, 0.5, 0.5),
    (1.1, 1.0, 1.1, 1.1),
    (1.1, -1.0, -1.1, -1.1),
]


def test_clipped_surrogate_values_and_grads():
    ratio = torch.tensor([[c[0]] for c in CLIP_CASES], dtype=torch.float64)
    adv = torch.tensor([c[1] for c in CLIP_CASES])
    logp_old = torch.full_like(ratio, -1.0)
    logp = (logp_old + ratio.log()).float().requires_grad_()
    mask = torch.ones(len(CLIP_CASES), 1)
    # each token alone: loss = -objective, gradient = -d objective / d logp
    for b, (_, _, obj, dobj) in enumerate(CLIP_CASES):
        lp = logp[b:b + 1].detach().clone().requires_grad_()
        loss, _ = grpo_loss(lp, logp_old[b:b + 1].float(), adv[b:b + 1], mask[b:b + 1], 0.2, 0.28)
        loss.backward()
        assert loss.item() == pytest.approx(-obj, abs=1e-5), CLIP_CASES[b]
        assert lp.grad.item() == pytest.approx(-dobj, abs=1e-5), CLIP_CASES[b]
    # all six together: the token mean of the same numbers
    loss, _ = grpo_loss(logp, logp_old.float(), adv, mask, 0.2, 0.28)
    loss.backward()
    assert loss.item() == pytest.approx(-sum(c[2] for c in CLIP_CASES) / 6, abs=1e-5)
    torch.testing.assert_close(logp.grad[:, 0], torch.tensor([-c[3] / 6 for c in CLIP_CASES]), rtol=0, atol=1e-5)


def test_clip_fraction_metrics():
    cases = CLIP_CASES + [(2.0, 1.0, 1.28, 0.0)]        # a second token above 1 + eps_high: high and low differ
    ratio = torch.tensor([[c[0]] for c in cases])
    adv = torch.tensor([c[1] for c in cases])
    _, m = grpo_loss(ratio.log(), torch.zeros_like(ratio), adv, torch.ones_like(ratio), 0.2, 0.28)
    # clipped: rows 0 and 6 (above 1 + eps_high, A > 0) and row 2 (below 1 - eps_low, A < 0); 7 tokens
    assert m["clip_frac"] == pytest.approx(3 / 7)
    assert m["clip_frac_high"] == pytest.approx(2 / 7) and m["clip_frac_low"] == pytest.approx(1 / 7)
    assert m["ratio_mean"] == pytest.approx((1.5 + 1.5 + 0.5 + 0.5 + 1.1 + 1.1 + 2.0) / 7, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# token-mean (DAPO): loss = sum over all response tokens of the batch / number of tokens. At ratio 1 each token
# contributes -A of its sequence, so loss = -sum_i A_i L_i / sum_i L_i (per-sequence mean would be -mean_i A_i).

LENGTHS, ADVS = [2, 5, 1], [1.0, -0.5, 2.0]


def _ragged(values_per_seq, T):
    out = torch.zeros(len(values_per_seq), T)
    for b, v in enumerate(values_per_seq):
        out[b, :len(v)] = torch.tensor(v)
    return out


def test_token_mean_over_micro_batches():
    g = torch.Generator().manual_seed(2)
    T, n = max(LENGTHS), sum(LENGTHS)
    mask = _ragged([[1.0] * L for L in LENGTHS], T).bool()
    logp_old = -torch.rand(3, T, generator=g)
    adv = torch.tensor(ADVS)
    # hand value at ratio 1: -(1*2 - 0.5*5 + 2*1) / 8 = -1.5 / 8   (per-sequence mean: -(1 - 0.5 + 2) / 3)
    loss, _ = grpo_loss(logp_old.clone(), logp_old, adv, mask)
    assert loss.item() == pytest.approx(-1.5 / 8, abs=1e-6)
    # micro-batches of one sequence with the whole batch's token count: same loss (summed) and same gradient
    logp = (logp_old + 0.1 * torch.randn(3, T, generator=g)).requires_grad_()
    big, _ = grpo_loss(logp, logp_old, adv, mask)
    (g_big,) = torch.autograd.grad(big, logp)
    small, g_small = 0.0, torch.zeros_like(logp)
    for b in range(3):
        lp = logp.detach()[b:b + 1].clone().requires_grad_()
        part, _ = grpo_loss(lp, logp_old[b:b + 1], adv[b:b + 1], mask[b:b + 1], num_tokens=n)
        part.backward()
        small, g_small[b:b + 1] = small + part.item(), lp.grad
    assert small == pytest.approx(big.item(), abs=1e-6)
    torch.testing.assert_close(g_small, g_big)
    # and both equal the formula written out: sum_t L_t / n with L_t = max(-A r, -A clip(r))
    r = (logp.detach() - logp_old).exp()
    per_tok = torch.maximum(-adv[:, None] * r, -adv[:, None] * r.clamp(0.8, 1.28))
    assert big.item() == pytest.approx((per_tok * mask).sum().item() / n, abs=1e-6)


class _TableModel(torch.nn.Module):
    """A stand-in policy: the log-prob of token t of sample i is the parameter w[i, t] (no network)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(-torch.rand(len(LENGTHS), max(LENGTHS), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_optimise_accumulates_token_mean(monkeypatch, micro):
    """grpo.optimise over one minibatch of 3 sequences in micro-batches of `micro`, plain SGD (lr 1): at ratio 1 the
    gradient of the token-mean loss w.r.t. w[i, t] is -A_i / (total tokens), so w moves by +A_i / 8 on real tokens."""
    m = _TableModel()

    def fake_logprobs(model, batch, cfg, ctx):  # row i's log-probs are w[i] (the row's id rides in batch.images)
        mask = batch.targets >= 0
        return torch.where(mask, model.w[batch.images, :mask.shape[1]], 0.0), torch.zeros(mask.shape), mask

    monkeypatch.setattr(grpo, "response_logprobs", fake_logprobs)
    samples = [grpo.Sample(0, torch.zeros(L, dtype=torch.long)) for L in LENGTHS]
    prompts = {0: grpo.Prompt(torch.zeros(2, dtype=torch.long), None, None)}
    batch = grpo.make_batch(samples, ADVS, prompts, pad_id=1, img_id=-1)
    batch.images = list(range(len(LENGTHS)))
    batch.old_logp = torch.where(batch.targets >= 0, m.w.detach()[:, :batch.targets.shape[1]], 0.0)
    cfg = GRPOConfig(ppo_epochs=1, minibatch_size=3, micro_batch_size=micro, grad_clip=1e9, beta=0.0)
    w0 = m.w.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    grpo.optimise(m, opt, batch, cfg, SimpleNamespace(device="cpu"), torch.Generator().manual_seed(0))
    want = w0.clone()
    for i, (L, a) in enumerate(zip(LENGTHS, ADVS)):
        want[i, :L] += a / sum(LENGTHS)                 # per-sequence mean would give a / (L * 3)
    torch.testing.assert_close(m.w.detach(), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# k3 KL (Schulman, "Approximating KL divergence"): with x = log pi_ref(o) - log pi(o) and o ~ pi,
# k3 = exp(x) - x - 1 is unbiased for KL(pi || pi_ref): E_pi[pi_ref/pi] = 1 and E_pi[-x] = KL. The reversed form
# x' = log pi - log pi_ref has E_pi[exp(x') - x' - 1] = sum pi^2 / pi_ref - 1 - KL, which is not KL.

def test_k3_mean_approaches_exact_kl():
    pi = torch.tensor([0.7, 0.2, 0.05, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    kl = float((pi * (pi / ref).log()).sum())                              # 0.5152
    reversed_mean = float((pi ** 2 / ref).sum()) - 1 - kl                   # 2.14 - 1 - 0.515 = 0.625
    assert kl == pytest.approx(0.7 * math.log(2.8) + 0.2 * math.log(0.8) + 0.1 * math.log(0.2))
    n = 200_000
    o = torch.multinomial(pi, n, replacement=True, generator=torch.Generator().manual_seed(4))
    logp, logp_ref = pi.log()[o].float()[None], ref.log()[o].float()[None]
    # adv 0, logp_old = logp: the surrogate is 0 and the loss is beta * mean k3
    loss, metrics = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, n), beta=1.0, logp_ref=logp_ref)
    # k3's std under pi is 0.64 (by hand: values 0.387, 0.027, 2.391 w.p. 0.7, 0.2, 0.1): standard error 0.0014
    assert loss.item() == pytest.approx(kl, abs=0.01)
    assert metrics["kl"] == pytest.approx(kl, abs=0.01)
    assert abs(loss.item() - reversed_mean) > 0.08


def test_k3_hand_values_and_gradient():
    # token 1: pi = 1/2, pi_ref = 1/4: x = ln(1/2): k3 = 0.5 + ln 2 - 1 = 0.19315; d k3 / d logp = 1 - pi_ref/pi = 0.5
    # token 2: pi = 1/4, pi_ref = 1/2: x = ln 2:     k3 = 2 - ln 2 - 1 = 0.30685;   d k3 / d logp = 1 - 2 = -1
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    loss, _ = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), beta=0.5, logp_ref=ref)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (0.5 + math.log(2) - 1 + 1 - math.log(2)) / 2, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5 * 0.5 / 2, 0.5 * -1.0 / 2]]))


# ---------------------------------------------------------------------------------------------------------------
# LowPrecisionAdamW against torch.optim.AdamW (decoupled weight decay p *= 1 - lr wd, bias corrections 1 - b^t),
# several steps with a changing learning rate (as the schedule sets it), weight decay on.

def _run_adamw(moments_dtype, steps=12):
    g = torch.Generator().manual_seed(5)
    p0 = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) * (0.1 + t) for p in p0] for t in range(steps)]
    lrs = [3e-2 * (0.5 + 0.5 * math.cos(t)) + 1e-3 for t in range(steps)]
    ours, ref = [p.clone().requires_grad_() for p in p0], [p.clone().requires_grad_() for p in p0]
    kw = dict(lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = LowPrecisionAdamW(ours, moments_dtype=moments_dtype, **kw)
    opt_ref = torch.optim.AdamW(ref, foreach=False, **kw)
    for t in range(steps):
        for o, group in ((opt, opt.param_groups[0]), (opt_ref, opt_ref.param_groups[0])):
            group["lr"] = lrs[t]
        for ps in (ours, ref):
            for p, gr in zip(ps, grads[t]):
                p.grad = gr.clone()
        opt.step()
        opt_ref.step()
    return p0, ours, ref, opt, lrs


def test_adamw_fp32_moments_equal_torch_adamw():
    p0, ours, ref, opt, lrs = _run_adamw(torch.float32)
    for o, r, p in zip(ours, ref, p0):
        assert not torch.equal(r, p)
        torch.testing.assert_close(o.detach(), r.detach(), rtol=0, atol=1e-6)
    assert opt.state[ours[0]]["step"].item() == 12


def test_adamw_bf16_moments_close_to_torch_adamw():
    """Tolerance: bf16 keeps 8 significant bits, so each stored moment is off by up to 2^-9 relative (m) and the
    update m / sqrt(v) by about 2^-9 + 2^-10 ~ 0.3% (rounding errors of later steps partly average out). Each step
    moves a weight by at most ~lr (Adam's update is ~1 in size), so after 12 steps the weights may differ by about
    0.003 * sum(lr) ~ 1e-3 * lr_max * steps; we allow 2% of the summed learning rates, well below what a wrong
    formula gives (weight decay without lr alone moves each weight by ~10% per step)."""
    p0, ours, ref, opt, lrs = _run_adamw(torch.bfloat16)
    tol = 0.02 * sum(lrs)
    for o, r in zip(ours, ref):
        err = (o.detach() - r.detach()).abs().max().item()
        assert err < tol, (err, tol)
    st = opt.state[ours[0]]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# learning-rate schedule: lr(s) = base (s + 1) / W for s < W, then
# base (m + (1 - m) cos^2(pi p / 2)) with p = min(1, (s - W) / (total - W))   [0.5 (1 + cos x) = cos^2(x / 2)]

def test_lr_schedule_closed_form():
    base, total, W, m = 2.0, 10, 2, 0.1
    hand = {0: 1.0, 1: 2.0,                                   # warmup: 2 * 1/2, 2 * 2/2
            2: 2.0,                                           # p = 0
            4: 2.0 * (0.1 + 0.9 * math.cos(math.pi / 8) ** 2),   # p = 1/4: 1.73640
            6: 2.0 * (0.1 + 0.9 * 0.5),                       # p = 1/2: 1.1
            9: 2.0 * (0.1 + 0.9 * math.cos(7 * math.pi / 16) ** 2),   # p = 7/8
            10: 0.2, 15: 0.2}                                 # p = 1 and beyond: min_lr_ratio * base
    for s, want in hand.items():
        assert lr_at(s, total, base, W, m) == pytest.approx(want, rel=1e-12, abs=1e-12), s
    assert hand[4] == pytest.approx(1.7364, abs=1e-4)
    # no warmup; min_lr_ratio = 1 (grpo.py's constant schedule)
    assert lr_at(0, 4, 1.0, 0, 0.0) == 1.0 and lr_at(2, 4, 1.0, 0, 0.0) == pytest.approx(0.5)
    assert lr_at(4, 4, 1.0, 0, 0.0) == pytest.approx(0.0, abs=1e-15)
    assert all(lr_at(s, 8, 3e-6, 2, 1.0) == pytest.approx(3e-6) for s in range(2, 12))


# ---------------------------------------------------------------------------------------------------------------
# chunked log-probs and entropy at a temperature, against torch.log_softmax / Categorical on the full logits

def _head_and_inputs(B=2, T=5, D=6, V=11):
    g = torch.Generator().manual_seed(6)
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 2)
    hidden = torch.randn(B, T, D, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, -2:] = -100
    return head, hidden, targets


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_logprobs_entropy_vs_torch(temperature, chunk):
    head, hidden, targets = _head_and_inputs()
    with torch.no_grad():
        logits = hidden @ head.weight.T / temperature
        full = torch.log_softmax(logits, -1)
        want_logp = torch.where(targets >= 0, full.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
        want_ent = torch.distributions.Categorical(logits=logits).entropy()
        logp, ent = token_logprobs_and_entropy(head, hidden, targets, temperature, chunk)
    torch.testing.assert_close(logp, want_logp)
    torch.testing.assert_close(ent, want_ent)
    assert (logp[1, -2:] == 0).all()


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_chunked_gradients_vs_torch(temperature):
    head, hidden, targets = _head_and_inputs()
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    w = torch.randn(targets.shape, generator=torch.Generator().manual_seed(7))
    logp, ent = token_logprobs_and_entropy(head, h1, targets, temperature, chunk=3)   # recomputed chunks
    ((logp * w).sum() + (ent * w).sum()).backward()
    g_head, head.weight.grad = head.weight.grad, None
    logits = head(h2) / temperature
    full = torch.log_softmax(logits, -1)
    lp = torch.where(targets >= 0, full.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
    en = torch.distributions.Categorical(logits=logits).entropy()
    ((lp * w).sum() + (en * w).sum()).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(g_head, head.weight.grad)


def test_sampling_temperature_and_top_p():
    """generate.sample: frequencies over many draws vs softmax(logits / T), nucleus cut written out by hand."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 40_000
    for T in (0.5, 2.0):
        p = torch.tensor([math.exp(z / T) for z in logits.tolist()])
        p /= p.sum()
        x = sample(logits.expand(n, 4).contiguous(), None, temperature=T, generator=torch.Generator().manual_seed(8))
        freq = torch.bincount(x, minlength=4).double() / n
        torch.testing.assert_close(freq, p.double(), rtol=0, atol=0.012)        # 4+ standard errors
    # T = 1: p = (0.644, 0.237, 0.087, 0.032); top_p 0.7: 0.644 < 0.7 <= 0.881 -> keep tokens 0 and 1, renormalised
    p = torch.softmax(logits.double(), -1)
    x = sample(logits.expand(n, 4).contiguous(), None, temperature=1.0, top_p=0.7,
               generator=torch.Generator().manual_seed(9))
    freq = torch.bincount(x, minlength=4).double() / n
    want = torch.tensor([p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0, 0], dtype=torch.float64)
    torch.testing.assert_close(freq, want, rtol=0, atol=0.012)


def test_top_p_nucleus_at_an_exact_boundary():
    # p = (1/2, 1/4, 1/4) exactly in binary; top_p = 1/2: the smallest set reaching 1/2 is {0} (HF: same)
    logits = torch.tensor([0.5, 0.25, 0.25]).log()
    x = sample(logits.expand(2000, 3).contiguous(), None, temperature=1.0, top_p=0.5,
               generator=torch.Generator().manual_seed(10))
    assert (x == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# RoPE (Qwen2: rotate halves). Pair i of a head is (x_i, x_{i+E/2}), seen as the complex number x_i + j x_{i+E/2};
# position p rotates it by the angle p * theta^(-2i/E): multiply by exp(j p theta^(-2i/E)).

def _rope_complex(x, pos, theta):  # x [B,H,T,E], pos [B,T] -> rotated x, via complex multiplication in float64
    E = x.shape[-1]
    z = torch.complex(x[..., :E // 2].double(), x[..., E // 2:].double())
    freq = torch.tensor([theta ** (-2 * i / E) for i in range(E // 2)], dtype=torch.float64)
    angle = pos.double()[:, None, :, None] * freq                              # [B,1,T,E/2]
    out = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([out.real, out.imag], -1).float()


def test_rope_rotation_vs_complex_numbers():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 6, 8, generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 20, 100, 3, 0, 1]])
    cos, sin = rope_cos_sin(pos, 8, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), _rope_complex(x, pos, 10000.0), rtol=1e-5, atol=1e-5)
    # by hand: E = 2, theta anything: the single pair (1, 0) at position 1 turns by 1 radian -> (cos 1, sin 1)
    cos, sin = rope_cos_sin(torch.tensor([[1]]), 2, 10000.0)
    torch.testing.assert_close(apply_rope(torch.tensor([[[[1.0, 0.0]]]]), cos, sin),
                               torch.tensor([[[[math.cos(1), math.sin(1)]]]]))


def test_rope_left_padding():
    g = torch.Generator().manual_seed(12)
    T, pad, E = 5, 3, 8
    ids = torch.randint(0, 50, (1, T), generator=g)
    q = torch.randn(1, 2, T, E, generator=g)
    ids_pad = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
    q_pad = torch.cat([torch.randn(1, 2, pad, E, generator=g), q], 2)
    batch_ids = torch.cat([torch.cat([ids, torch.randint(0, 50, (1, pad), generator=g)], 1), ids_pad])   # 2 rows
    attn = torch.tensor([[1] * (T + pad), [0] * pad + [1] * T])
    pos = positions(batch_ids, attn)
    assert pos[1, pad:].tolist() == list(range(T)) and pos[0].tolist() == list(range(T + pad))
    # the left-padded row's real tokens get the same rotation as the unpadded row (positions 0..T-1)
    cos, sin = rope_cos_sin(pos, E, 1e6)
    q_batch = torch.cat([torch.cat([q, torch.randn(1, 2, pad, E, generator=g)], 2), q_pad])
    rot = apply_rope(q_batch, cos, sin)
    torch.testing.assert_close(rot[1, :, pad:], rot[0, :, :T], rtol=0, atol=0)
    torch.testing.assert_close(rot[1:, :, pad:], _rope_complex(q, torch.arange(T)[None], 1e6), rtol=1e-5, atol=1e-5)
    cos1, sin1 = rope_cos_sin(positions(ids, None), E, 1e6)                    # no mask at all: same
    torch.testing.assert_close(apply_rope(q, cos1, sin1), rot[:1, :, :T], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# pixel shuffle (0.5, InternVL ps_version "v2"): the release / transformers code, written out as its
# view/permute sequence on [n, w, h, c], and a brute-force gather

def _internvl_pixel_shuffle(x, scale_factor=0.5):  # x [n, w, h, c], as InternVLChatModel.pixel_shuffle (v2)
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_vs_internvl_code():
    x = torch.randn(2, 8 * 8, 3)
    # extract_feature: reshape [n, L, c] -> [n, h, w, c], shuffle, reshape back to [n, L/4, 4c]
    want = _internvl_pixel_shuffle(x.reshape(2, 8, 8, 3)).reshape(2, 16, 12)
    assert torch.equal(pixel_shuffle(x), want)


def test_pixel_shuffle_brute_force():
    side, d = 6, 2
    # patch (row, col) channel k holds the number 100 row + 10 col + k: every value says where it came from
    x = torch.tensor([[[100 * r + 10 * c + k for k in range(d)] for r in range(side) for c in range(side)]],
                     dtype=torch.float32)
    out = pixel_shuffle(x)
    assert out.shape == (1, 9, 8)
    for i in range(3):
        for j in range(3):
            want = [100 * (2 * i + a) + 10 * (2 * j + b) + k for a in range(2) for b in range(2) for k in range(d)]
            assert out[0, 3 * i + j].tolist() == want, (i, j)
    # by hand, token (0, 1): patches (0,2), (0,3), (1,2), (1,3)
    assert out[0, 1].tolist() == [20, 21, 30, 31, 120, 121, 130, 131]


# ---------------------------------------------------------------------------------------------------------------
# selective sample buffer: keep |A| > min_abs_adv, drop age >= max_age, keep the `capacity` largest |A| (newest
# first among equals); when more than `threshold` of the groups are flat, fill the flat samples' slots in order
# with the best buffered samples, each used once.

def test_sample_buffer_choice():
    buf = SampleBuffer(capacity=4, max_age=2)
    buf.add(["a", "b", "c", "d"], [0.5, -2.0, 0.0, 1e-7], step=1)          # c, d carry no signal: not kept
    assert [s for _, _, s in buf.items] == ["b", "a"]
    buf.add(["e", "f", "g"], [-0.5, 1.0, 3.0], step=2)
    # by |A|: g 3.0, b 2.0, f 1.0, then a 0.5 (step 1) and e 0.5 (step 2): newest first -> e before a; capacity 4
    assert [s for _, _, s in buf.items] == ["g", "b", "f", "e"]
    # not enough flat groups: nothing changes (flat_frac == threshold is not "more than")
    samples, adv = ["x0", "x1", "x2", "x3"], [0.0, 0.0, 0.7, 0.0]
    out, out_adv, n = buf.mix(samples, adv, [True, True, False, True], flat_frac=0.5, threshold=0.5)
    assert (out, out_adv, n) == (samples, adv, 0) and len(buf) == 4
    # flat slots 0, 1, 3 take g, b, f with their own advantages; the non-flat sample stays; inputs untouched
    out, out_adv, n = buf.mix(samples, adv, [True, True, False, True], flat_frac=0.75, threshold=0.5)
    assert out == ["g", "b", "x2", "f"] and out_adv == [3.0, -2.0, 0.7, 1.0] and n == 3
    assert samples == ["x0", "x1", "x2", "x3"]
    assert [s for _, _, s in buf.items] == ["e"]                            # used samples are gone
    # ageing: at step 4, e (added at step 2) is 2 steps old = max_age: dropped
    buf.add(["h"], [0.1], step=3)
    assert [s for _, _, s in buf.items] == ["e", "h"]
    buf.add([], [], step=4)
    assert [s for _, _, s in buf.items] == ["h"]
    # more flat slots than buffered samples: only as many as there are
    out, out_adv, n = buf.mix(["y0", "y1"], [0.0, 0.0], [True, True], flat_frac=1.0, threshold=0.5)
    assert out == ["h", "y1"] and out_adv == [0.1, 0.0] and n == 1 and len(buf) == 0


# ---------------------------------------------------------------------------------------------------------------
# critical tokens: the token whose decoded text holds a cue's first character. Two stand-in tokenizers, so the
# token boundaries are chosen here and the expected indices can be counted by hand.

class _PieceTok:
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special=False):
        return "".join(self.pieces[i] for i in ids)


class _ByteTok:  # byte-level: a token is raw bytes; a split character decodes as U+FFFD, as byte-level BPE does
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special=False):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_critical_positions_hand_computed():
    pieces = ["So", " x", "=2", ". W", "ait", ",", " but", " wait", " the", " waiter", " said", " Hmm", ".",
              "Actually", "!", " However"]
    #          0     1     2     3     4    5     6       7       8       9          10      11     12
    #          13          14   15
    tok = _PieceTok(pieces)
    text, found = critical_positions(tok, list(range(len(pieces))))
    assert text == "So x=2. Wait, but wait the waiter said Hmm.Actually! However"
    # "Wait": its W is in token 3 (". W"); "but wait" (longest cue, counted once) starts in token 6 (" but");
    # "waiter" is no cue; "Hmm" token 11; "Actually" token 13; "However" token 15 (its leading space is token 15 too)
    assert found == [(3, "Wait"), (6, "but wait"), (11, "Hmm"), (13, "Actually"), (15, "However")]
    # a cue that starts exactly at a token boundary belongs to the token after it, not the one before
    text, found = critical_positions(_PieceTok(["ok ", "Wait"]), [0, 1])
    assert found == [(1, "Wait")]
    # cues sharing a start: the longest wins and the occurrence is counted once, whatever the order of the list
    tok = _PieceTok(["x", " Wait a", " moment", ", 等", "等"])
    for cues in [("Wait", "Wait a moment", "等", "等等"), ("Wait a moment", "Wait", "等等", "等")]:
        assert critical_positions(tok, [0, 1, 2, 3, 4], cues)[1] == [(1, "Wait a moment"), (3, "等等")]


def test_critical_positions_byte_tokens():
    d = "等等".encode()                                      # 6 bytes: two characters of 3 bytes each
    pieces = ["答".encode(), b".", d[:2], d[2:4], d[4:], "，或者".encode()[:4], "，或者".encode()[4:]]
    #          0             1      2      3       4      5 (， + 1 byte)          6
    text, found = critical_positions(_ByteTok(pieces), list(range(len(pieces))))
    assert text == "答.等等，或者"
    # 等等 starts with the bytes of token 2; 或者's first byte (或 = 3 bytes) is the 4th byte of "，或者" -> token 5
    assert found == [(2, "等等"), (5, "或者")]
