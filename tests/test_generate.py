"""generate.py: the repetition penalty against its rule written out, the compiled step's graphs (bounded over prompt
lengths, static cache), host reads every few tokens, and the tensor-parallel divergence guard on 2 gloo ranks."""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import tp
from generate import decode, sample, seen_tokens
from model import LLMConfig, Qwen2ForCausalLM
from parallel import setup
from ranks import spawn

SMALL = LLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=64, max_position_embeddings=4096)


def small_decoder(seed=0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(SMALL).eval()


def left_padded(lengths, seed=1):
    """Random prompts of the given lengths -> ids [B,T], mask [B,T] (0 = left padding)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, SMALL.vocab_size, (len(lengths), T), generator=g)
    mask = torch.stack([torch.arange(T) >= T - n for n in lengths]).long()
    return ids, mask


def run(decoder, ids, mask, **kw):
    x = decoder.model.embed_tokens(ids)
    return decode(decoder, x, ids, mask, eos=-1, **kw)


# ------------------------------------------------------------------------------------------ repetition penalty
def penalised_by_hand(logits: list, seen: set, penalty: float) -> list:
    """CTRL (arXiv 1909.05858) / HF RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the penalty
    when positive and multiplied by it when negative; unseen tokens keep theirs."""
    return [(z / penalty if z > 0 else z * penalty) if i in seen else z for i, z in enumerate(logits)]


def test_repetition_penalty_vs_its_rule():
    """sample() at the release's inference default (1.05), greedy and sampled, against the rule written out per
    token. Logits of both signs, close to each other, so dividing where the rule multiplies (or the reverse) moves
    the argmax in many rows and every sampled row."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.rand(300, 16, generator=g) - 0.5) * 0.4                       # [-0.2, 0.2]: near ties
    seen = torch.rand(300, 16, generator=g) < 0.5
    want = torch.tensor([penalised_by_hand(z, set(torch.nonzero(s).flatten().tolist()), 1.05)
                         for z, s in zip(logits.tolist(), seen)])
    assert torch.equal(sample(logits, seen, repetition_penalty=1.05), want.argmax(-1))
    got = sample(logits, seen, temperature=0.7, repetition_penalty=1.05, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(want / 0.7, -1)
    assert torch.equal(got, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))[:, 0])


class FixedLogits:
    """A stand-in decoder whose next-token logits are the same at every step (one vector per row), so the only
    thing that changes the greedy token from step to step is the repetition penalty."""

    def __init__(self, logits):
        self.rows, self.config = logits, type("C", (), {"vocab_size": logits.shape[1]})

    class Cache:  # only its size: the stand-in attends to nothing
        def __init__(self, rows, length):
            self.rows, self.length = rows, length

        def repeat_rows(self, n, rows, length):
            self.rows = rows * n

    def kv_cache(self, rows, length, keep=False):
        return self.Cache(rows, length)

    def prefill(self, x, input_ids, attention_mask, cache):
        return torch.zeros(x.shape[0], x.shape[1], 1), attention_mask.long().cumsum(-1) - 1, attention_mask

    def decode_step(self, tok, pos, cache, start, real=None):
        return torch.zeros(tok.shape[0], 1, 1)

    def lm_head(self, h):  # [b,1] -> [b,V]
        return self.rows.repeat_interleave(h.shape[0] // self.rows.shape[0], 0)


def greedy_by_hand(logits: list, prompt: list, steps: int, penalty: float) -> list:
    seen, out = set(prompt), []
    for _ in range(steps):
        z = penalised_by_hand(logits, seen, penalty)
        out.append(max(range(len(z)), key=z.__getitem__))
        seen.add(out[-1])
    return out


def test_repetition_penalty_sees_prompt_and_output_not_padding():
    """Through decode: the penalty applies to the prompt's real tokens and to every token generated so far, never to
    the padding's id (5, the best token of row 0, which it then picks first), and to each of G sample rows."""
    logits = torch.tensor([[-0.5, 1.00, 0.98, -0.45, 0.2, 1.02],                  # both signs
                           [-1.0, -1.02, -3.0, -1.04, -1.1, -0.99]])              # all negative: the * side
    ids = torch.tensor([[5, 5, 3, 1], [2, 4, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    new = decode(FixedLogits(logits), torch.zeros(2, 4, 1), ids, mask, max_new_tokens=7, eos=-1,
                 repetition_penalty=1.05, num_return_sequences=2)
    for row in range(2):
        prompt = [i for i, m in zip(ids[row].tolist(), mask[row].tolist()) if m]
        want = greedy_by_hand(logits[row].tolist(), prompt, 7, 1.05)
        assert new[2 * row].tolist() == new[2 * row + 1].tolist() == want, (row, want)
    assert new[0, 0] == 5  # the padding's id was not penalised


def test_seen_tokens_excludes_padding_even_when_the_pad_id_is_real():
    seen = seen_tokens(torch.tensor([[0, 0, 7], [0, 3, 3]]), torch.tensor([[0, 0, 1], [1, 1, 1]]), 8)
    assert torch.nonzero(seen).tolist() == [[0, 7], [1, 0], [1, 3]]


# ----------------------------------------------------------------------------------------------- compiled step
def counting_backend(graphs: list, inspect=None):
    """An aot_eager-like backend that records each graph it compiles (one entry per compile, recompiles included)
    and, with inspect, what cudagraph trees check before recording: the mutated inputs that are not static."""
    def fw(gm, inputs):
        meta = torch._guards.TracingContext.get().fw_metadata
        graphs.append([i for i in meta.mutated_inp_runtime_indices if i not in meta.static_input_indices])
        return gm
    return aot_autograd(fw_compiler=fw)


def test_compiled_step_graphs_stay_bounded_over_20_prompt_lengths():
    """GRPO's prompt lengths change every step: 20 lengths from 3 to 700 tokens, up to 3 prompts x 2 samples a call,
    left-padded or not. The compiled step keeps one cache per run, its length grown geometrically (256 -> 512 ->
    1024 tokens), so it compiles at most 3 graphs (one per cache length, row count or padding case would pass
    torch's recompile limit of 8 and raise FailOnRecompileLimitHit under fullgraph), and every call decodes the
    eager tokens."""
    torch._dynamo.reset()
    decoder, graphs = small_decoder(), []
    backend = counting_backend(graphs)
    lengths = [3, 9, 17, 40, 64, 100, 130, 180, 220, 250, 270, 300, 333, 380, 420, 470, 500, 560, 640, 700]
    for k, n in enumerate(lengths):
        rows = [n, n, n] if k == 0 else [n] if k % 3 == 0 else [n, max(1, n - 2 - k)] if k % 3 == 1 else [n, n, n // 2]
        ids, mask = left_padded(rows, seed=k)
        kw = dict(max_new_tokens=3, num_return_sequences=2 if k % 2 == 0 else 1)
        assert torch.equal(run(decoder, ids, mask, compile=backend, **kw), run(decoder, ids, mask, **kw)), n
    assert 1 <= len(graphs) <= 3, len(graphs)


def test_compiled_step_mutates_only_static_inputs_one_graph_per_run():
    """CUDA graphs (mode="reduce-overhead") skip a graph that mutates an input that is not static ("skipping
    cudagraphs due to mutated inputs"). The step's only mutation is the KV cache write; kept as module buffers at
    one address for the run, the cache is static: no non-static mutated input, one graph for two calls of other
    prompt lengths and row counts, the same cache storage."""
    torch._dynamo.reset()
    decoder, graphs = small_decoder(), []
    backend = counting_backend(graphs)
    ids, mask = left_padded([12, 7])
    run(decoder, ids, mask, compile=backend, max_new_tokens=4)
    address = decoder.kept["cache"].k.data_ptr()
    ids, mask = left_padded([30], seed=2)
    run(decoder, ids, mask, compile=backend, max_new_tokens=5, num_return_sequences=2)
    assert graphs == [[]]  # one graph; the list of non-static mutated inputs is empty
    assert decoder.kept["cache"].k.data_ptr() == address


# ------------------------------------------------------------------------------------------------- host reads
def test_host_reads_every_few_tokens_and_exact_output(monkeypatch):
    """The loop reads the device (bool/int/tolist/item: a sync on a GPU) after the first token and every
    check_every tokens, not per token; the stream gets every token in a few chunks; and the output is the same
    whatever check_every is, cut where the last row finished."""
    decoder = small_decoder()
    ids, mask = left_padded([6, 4])
    ref = run(decoder, ids, mask, max_new_tokens=33, check_every=1)
    eos = int(ref[0, 5])  # row 0 stops at token 6 or before; row 1 later, or never
    reads = []
    for name in ("__bool__", "__int__", "item", "tolist", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name: reads.append(_n) or _r(self, *a))
    chunks = []
    x = decoder.model.embed_tokens(ids)
    out = decode(decoder, x, ids, mask, max_new_tokens=33, eos=eos, check_every=8, stream=chunks.append)
    monkeypatch.undo()
    assert len(reads) <= 8, reads  # the prefill's padding check; tokens 1, 8, 16, 24, 32, 33 at most; the final cut
    one = decode(decoder, x, ids, mask, max_new_tokens=33, eos=eos, check_every=1)
    assert torch.equal(out, one)
    assert torch.equal(torch.cat(chunks, 1)[:, :out.shape[1]], out) and len(chunks) < out.shape[1]


# ------------------------------------------------------------------------------- tensor parallel divergence
def tp_worker(rank, diverge):
    setup(dtype="fp32")
    torch.manual_seed(0)  # the same weights on both ranks (any weights: the collectives make the logits agree)
    decoder = tp.TPDecoder(SMALL, rank, 2).eval()
    for p in decoder.parameters():
        p.normal_(0, 0.1)
    if diverge:  # each rank keeps its own generator instead of the shared seed: different samples
        tp.shared_generator = lambda generator, device, group=None: generator
    ids, mask = left_padded([5, 3])
    x = decoder.model.embed_tokens(ids)
    g = torch.Generator().manual_seed(rank)
    try:
        decoder.decode(x, ids, mask, max_new_tokens=20, eos=-1, temperature=1.0, generator=g)
    except RuntimeError as e:
        assert diverge and "ranks sampled different tokens" in str(e), e
    else:
        assert not diverge, "diverging ranks went on decoding"


@pytest.mark.parametrize("diverge", [False, True])
def test_tp_ranks_that_sample_different_tokens_raise(diverge):
    """Every rank of the tensor-parallel copy must sample the same tokens; a rank that does not would stop at
    another step and leave the others in a collective until NCCL's timeout. The guard (a checksum compared at each
    host read) raises on every rank within check_every tokens instead."""
    spawn(tp_worker, diverge)


def test_compile_from_fsdp_shards_is_refused_up_front(monkeypatch):
    """Issue 22, item 3: dynamo cannot capture FSDP2's hooks, so --compile without the tensor-parallel copy under
    torchrun is refused when the flags are read, and generate.decode refuses the combination before any work."""
    import grpo
    import generate as gen
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--compile with --no-tp under torchrun"):
        grpo.GRPOConfig(compile=True, tp=False)
    grpo.GRPOConfig(compile=True, tp=True)                  # the TP copy compiles
    x, ids = torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="decoding from FSDP shards cannot be compiled"):
        gen.decode(None, x, ids, max_new_tokens=1, eos=0, compile=True, all_done=gen.all_ranks_done)
