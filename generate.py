"""Generation: new tokens after prompt embeddings, from any decoder with model.py's interface.

    prompts x [B,T,D] --prefill: one forward, fills the KV cache--> last states [B,1,D]
      --each prompt's cache row copied into its G sample rows b*G .. b*G+G-1--> [B*G,1,D]
      --per new token: lm_head -> sample (repetition penalty, temperature, top-p) -> one cached step--> ...

One prefill per prompt and a copied cache make G samples cost one prompt's prefill, not G (nanochat's engine,
vLLM's n > 1). The step is eager, or (compile=...) a fixed-shape step that torch.compile captures once per run:
the cache is a pair of module buffers allocated once for the run's most rows and longest length (gpt-fast), the
position is a tensor, rows are padded to the cache's, so nothing changes shape or address from token to token or
call to call, and on a GPU CUDA graphs replay the step.

The host reads tokens only every `check_every` tokens (all done? stream them), each read being a device sync, so the
GPU runs ahead in between. Rows that finished are padded with eos and the output is cut where the last row
finished: the result does not depend on check_every. Which ranks must agree that all rows are done is the caller's
choice (`all_done`): rows_done (one process), all_ranks_done (FSDP shards: every rank runs the same forwards,
parallel.py), tokens_agree (the tensor-parallel copy: every rank holds every row, tp.py).

The decoder (model.Qwen2ForCausalLM or tp.TPDecoder) provides kv_cache, prefill, decode_step, lm_head and
config.vocab_size; this file imports no project module.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

CHECK_EVERY = 8  # tokens between two host reads of the batch


@torch.no_grad()
def decode(decoder, x, input_ids, attention_mask=None, *, max_new_tokens: int, eos: int, temperature=0.0,
           top_p=1.0, repetition_penalty=1.0, stream=None, generator=None, num_return_sequences=1, compile=False,
           all_done=None, check_every: int = None):
    """Prompt embeddings x [B,T,D] (their ids [B,T] for the repetition penalty; attention_mask [B,T]: 0 = left
    padding) -> new tokens [B*G, new], G = num_return_sequences, rows b*G .. b*G+G-1 answering prompt b.
    stream(tokens [B*G, n]) receives them n at a time; all_done(done [B*G], tokens since the last read [B*G, n])
    -> bool (default rows_done); compile: False, True (inductor) or a backend name ("aot_eager" in tests)."""
    if compile and all_done is all_ranks_done:  # dynamo cannot capture FSDP2's hooks in one graph (fullgraph)
        raise ValueError("compile: decoding from FSDP shards cannot be compiled; decode with tp.py's copy (--tp)")
    G, t = num_return_sequences, input_ids.shape[1]
    b = input_ids.shape[0] * G
    cache = decoder.kv_cache(b if compile else b // G, t + max_new_tokens, keep=bool(compile))  # eager: G x later
    h, pos, pad = decoder.prefill(x, input_ids, attention_mask, cache)  # [B,T,D], [B,T], mask or None
    h, pos = h[:, -1:], pos[:, -1:]
    if G > 1:
        cache.repeat_rows(G, input_ids.shape[0], t)
        h, pos, input_ids = (z.repeat_interleave(G, 0) for z in (h, pos, input_ids))
    real = torch.ones(cache.rows, cache.length, dtype=torch.bool, device=x.device)  # generated columns are real
    if pad is not None:
        real[:b, :t] = pad.bool().repeat_interleave(G, 0)
    seen = seen_tokens(input_ids, real[:b, :t], decoder.config.vocab_size) if repetition_penalty != 1.0 else None
    step = (static_step(decoder, cache, compile, pos, real, t) if compile else
            eager_step(decoder, cache, pos, None if pad is None else real, t))
    return sample_loop(decoder, h, step, seen, eos, max_new_tokens, stream=stream, all_done=all_done,
                       check_every=check_every or CHECK_EVERY, temperature=temperature, top_p=top_p,
                       repetition_penalty=repetition_penalty, generator=generator)


def sample_loop(decoder, h, step, seen, eos: int, max_new_tokens: int, *, stream=None, all_done=None,
                check_every: int = CHECK_EVERY, **sampling):
    """Last states h [b,1,D] -> tokens [b, new]: sample (`sampling`: sample()'s arguments), pad finished rows with
    eos, step; the host reads the tokens after the first one and every check_every after that."""
    b, all_done = h.shape[0], all_done or rows_done
    out = torch.full((b, max_new_tokens), eos, dtype=torch.long, device=h.device)
    done = torch.zeros(b, dtype=torch.bool, device=h.device)
    read = 0
    for i in range(max_new_tokens):
        logits = decoder.lm_head(h[:b, -1]).float()  # [b,V]
        tok = torch.where(done, eos, sample(logits, seen, **sampling))
        out[:, i] = tok
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        done |= tok == eos
        if i == 0 or (i + 1) % check_every == 0 or i == max_new_tokens - 1:
            new, read = out[:, read:i + 1], i + 1
            if stream is not None:
                stream(new)
            if i == max_new_tokens - 1 or all_done(done, new):
                break
        h = step(tok, i)
    return cut_finished(out[:, :i + 1], eos)


def cut_finished(tokens, eos: int):
    """tokens [b, n] -> tokens[:, :w], w = the step at which the last row made its first eos (n if one never did):
    one host read per generate call, and the width one process gives for these rows (tp.py cuts its own rows)."""
    if not has_values(tokens) or tokens.shape[1] == 0:
        return tokens
    ended = tokens == eos
    last = torch.where(ended.any(1), ended.int().argmax(1), tokens.shape[1] - 1)  # [b]: each row's last step
    return tokens[:, :int(last.max()) + 1] if tokens.shape[0] else tokens


def eager_step(decoder, cache, pos, real, t: int):
    """-> step(tok [b], i): token i at cache column t+i; attention reads the t+i+1 columns written so far
    (real [b, L]: left padding, or None when nothing is padded)."""
    def step(tok, i):
        nonlocal pos
        pos = pos + 1
        return decoder.decode_step(tok, pos, cache, t + i, None if real is None else real[:, :t + i + 1])
    return step


def static_step(decoder, cache, backend, pos, real, t: int):
    """-> step(tok [b], i) through the compiled fixed-shape step: every input has the cache's rows (the rows past b
    are padding) and the position is a tensor, so every call of the run has the same shapes."""
    fn, rows = compiled(decoder.decode_step, backend, pos.is_cuda), cache.rows
    tok_all = pos.new_zeros(rows)
    pos_all = torch.cat([pos, pos.new_zeros(rows - pos.shape[0], 1)])  # [rows,1]
    at = torch.full((1,), t - 1, device=pos.device)

    def step(tok, i):
        tok_all[:tok.shape[0]] = tok
        pos_all.add_(1)
        at.add_(1)
        return fn(tok_all, pos_all, cache, at, real)
    return step


def compiled(step, backend, cuda: bool):
    """torch.compile of the fixed-shape decode step: fullgraph (a graph break is an error, not a slow path), static
    shapes. On a GPU mode="reduce-overhead" replays it as a CUDA graph, removing the per-kernel launch cost that
    dominates one-token steps; the cache it writes is static (module buffers), the only state it mutates. backend:
    True (inductor) or a name ("aot_eager": the same capture without code generation, for tests)."""
    backend = "inductor" if backend is True else backend
    mode = {"mode": "reduce-overhead"} if cuda and backend == "inductor" else {}
    return torch.compile(step, backend=backend, dynamic=False, fullgraph=True, **mode)


# -------------------------------------------------------------------------------------------- all rows done?
def rows_done(done, new) -> bool:
    """One process: are all of its rows finished?"""
    return bool(done.all())


def all_ranks_done(done, new) -> bool:
    """FSDP shards: every rank must run the same forwards (parallel.py), so a rank whose rows are finished steps on
    until every rank's are."""
    left = (~done).any().to(torch.int32)
    dist.all_reduce(left)
    return not bool(left)


def tokens_agree(done, new, group=None) -> bool:
    """The tensor-parallel copy: every rank decodes every row and must sample the same tokens; a rank that drew
    others would stop at another step and leave the rest waiting in a collective until the timeout. So compare a
    checksum of the tokens since the last read (one all-reduce of max(c), max(-c): equal on all ranks iff
    min(c) = max(c)) and raise instead; then: are all rows finished?"""
    weights = torch.arange(1, new.numel() + 1, device=new.device).view_as(new)
    c = (new * weights).sum()
    v = torch.stack([c, -c, (~done).any().long()])
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)  # the ranks decoding these rows (tp.py's group)
    high, neg_low, left = v.tolist()
    if high != -neg_low:
        raise RuntimeError("tensor-parallel ranks sampled different tokens (their generators or logits differ): "
                           "each would wait for the others in a later collective")
    return not left


def has_values(t: torch.Tensor) -> bool:
    """False while tracing (fake tensors of a dry run, torch.compile): the tensor has a shape but no values, so a
    check that reads values (a host sync: `int()`, `bool()`, `.item()`) cannot run and is skipped."""
    return not (torch.compiler.is_compiling() or isinstance(t, FakeTensor))


# ----------------------------------------------------------------------------------------------------- sampling
def seen_tokens(input_ids, real, vocab_size: int):
    """[B,V] bool: the tokens each prompt holds (padding excluded), for the repetition penalty (prompt + output,
    as in HF). scatter_add, not assign: a pad id may also be a real token."""
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.long, device=input_ids.device)
    return seen.scatter_add_(1, input_ids, real.long()) > 0


def sample(logits, seen, temperature=0.0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """logits [B,V] fp32 -> next tokens [B]. Repetition penalty as in CTRL (arXiv 1909.05858) and HF: seen tokens'
    logits are divided by the penalty when positive, multiplied when negative (both lower them). Nucleus (top-p):
    keep the smallest set of tokens whose probability reaches top_p."""
    if repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before them already reaches top_p (as HF)
        probs = probs.scatter(1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
