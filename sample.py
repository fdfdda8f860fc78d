"""Ask the model about images: stream one answer, or answer a JSONL file of prompts in left-padded batches.

    python sample.py --ckpt DIR --image a.png [--image b.jpg] --prompt "What is shown?"   # streams the answer
    python sample.py --ckpt DIR --prompts questions.jsonl   # {"images": [...], "question": ...} per line -> JSON lines
    python sample.py                                        # no --ckpt: a local checkpoint + a synthetic image

Defaults follow the release's inference script (temperature 0.6, top-p 0.95, repetition penalty 1.05, up to
12 tiles per image, thinking mode: the assistant turn opens with `<think>`). Everything that can be wrong with the
input (files, images, placeholders, context length) is checked before the weights are loaded, and is reported as
one line on stderr with exit code 2.

Under torchrun (`torchrun --nproc_per_node 8 sample.py ...`, or several nodes with --replicate / --tp-size:
docs/multinode.md) the prompts are split over the ranks: each rank brings its share, each tensor-parallel group
decodes its ranks' rows once, and rank 0 gathers the answers and prints them in the order of the input.
"""
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from data import (THINK_END, THINK_PREFIX, QUESTION, StreamDecoder, Tokenizer, build_prompt, check_prompts,
                  context_problem, image_tiles, make_visual_task, left_pad, parse_response, read_jsonl, tile_count)
from model import R1VConfig, SkyworkR1V
from cli import at_least, check_choices, choice, parse_config, print_error
from parallel import Context, LayoutFlags, all_gather_objects, load, resolve, setup
from tp import check_divisible, make_decoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class SampleConfig(LayoutFlags):  # + --replicate, --tp-size (parallel.py)
    ckpt: str = ""                # release-format checkpoint dir; "" = the last out/grpo/step_*, else out/sft, else out/tiny-init
    image: list = field(default_factory=list)  # --image a.png --image b.jpg: the images of --prompt, in order
    prompt: str = ""              # "" with no --image = the synthetic task's question about a generated image
    prompts: str = ""             # JSONL of {"images": [...], "question": ...}: batched, one JSON line out per
                                  # record: its fields as written + "response", "thinking", "extracted_answer"
    system: str = ""              # system prompt ("" = none, as in the release's inference)
    think: bool = True            # --no-think: do not open the assistant turn with <think>
    greedy: bool = False          # argmax instead of sampling (the repetition penalty still applies, as in HF)
    temperature: float = 0.6      # sampling temperature (the release's)
    top_p: float = 0.95           # nucleus sampling: the smallest set of tokens with this much probability
    repetition_penalty: float = 1.05  # logits of tokens already in the sequence divided by this (HF's rule)
    max_new_tokens: int = 1024    # the release allows 64000 for long reasoning
    max_tiles: int = 0            # 448px tiles per image (+ thumbnail); 0 = the checkpoint's max_dynamic_patch (12)
    batch_size: int = 16          # prompts per generate() call with --prompts
    seed: int = 0                 # sampling stream; also picks the synthetic image without --prompt
    dtype: str = choice("", "fp32", "bf16")  # "" = bf16 on GPU, fp32 on CPU
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # one-process device (torchrun: one GPU a rank)
    tp: bool = True               # under torchrun: decode with a tensor-parallel copy of the decoder (tp.py);
                                  # --no-tp decodes from the FSDP shards (an all-gather of every layer per token)
    compile: bool = False         # torch.compile the fixed-shape decode step (CUDA graphs on a GPU)

    def __post_init__(self):  # a bad value is one line naming the flag (cli.parse_config), before any work
        super().__post_init__()  # the layout
        check_choices(self)
        at_least(self, 1, "max_new_tokens", "batch_size")
        at_least(self, 0, "temperature", "max_tiles")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class Request:
    question: str
    ids: list                     # prompt token ids, image tokens included
    images: list                  # image paths, in <image> order
    n_tiles: int                  # tiles of all its images (thumbnails included)
    where: str                    # "--prompt" or "file.jsonl:3": what error messages point at
    record: dict = None           # --prompts: the input record as written, echoed back with the response


# ----------------------------------------------------------------------------------------------------------------
# Inputs: checkpoint, images, prompts. All of it runs before the weights are loaded.

def default_checkpoint() -> tuple[str, str]:
    """-> (dir, description): the most trained local checkpoint, else a tiny random one (written on first use)."""
    grpo = sorted(glob.glob("out/grpo/step_*"))
    for path, what in ((grpo[-1] if grpo else "", "the GRPO model from `python grpo.py`"),
                       ("out/sft", "the cold-start SFT model from `python sft.py`")):
        if path and os.path.isfile(os.path.join(path, "config.json")):
            return path, what
    path = "out/tiny-init"
    if not os.path.isfile(os.path.join(path, "config.json")):
        from sft import write_tiny_checkpoint
        write_tiny_checkpoint(path)
    return path, "a tiny random-weight model, so expect gibberish (`python sft.py` trains it)"


def make_request(question, images: list, tok: Tokenizer, c: R1VConfig, cfg: SampleConfig, where: str) -> Request:
    """Decode the images (so a bad one fails now), build the release's chat prompt and tokenise it. Only the tile
    counts are kept: generate() decodes the images again per batch, so a long --prompts file does not hold every
    image's tiles in memory at once."""
    if not isinstance(question, str):
        raise ValueError(f"{where}: 'question' must be a string, got {question!r:.100}")
    tiles = [tile_count(p, c, cfg.max_tiles) for p in images]  # decodes the image: a bad one fails now
    try:  # build_prompt checks that <image> placeholders and images pair up
        text = build_prompt(question, tiles, c.num_image_token, cfg.system or None, cfg.think)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    ids = tok.encode(text)
    if ids.count(c.img_context_token_id) != sum(tiles) * c.num_image_token:
        raise ValueError(f"{where}: the question contains the literal text <IMG_CONTEXT>, which is reserved for "
                         f"image tokens")
    return Request(question, ids, list(images), sum(tiles), where)


def check_context(requests: list, max_new_tokens: int, c: R1VConfig, max_tiles: int = 0):
    """Prompt (text + image tokens) + new tokens must fit the context; checked before any compute."""
    for r in requests:
        problem = context_problem(len(r.ids), r.n_tiles, max_new_tokens, c, max_tiles)
        if problem:
            raise ValueError(f"{r.where}: {problem}")


def read_requests(cfg: SampleConfig, tok: Tokenizer, c: R1VConfig) -> list:
    if cfg.prompts:
        if cfg.prompt or cfg.image:
            raise ValueError("give either --prompts FILE or --prompt/--image, not both")
        # every record checked (fields, images decoded, placeholders, context), all problems of the file at once
        records = read_jsonl(cfg.prompts)
        prompts = check_prompts(records, tok, c, cfg.max_tiles, cfg.max_new_tokens, cfg.system or None, cfg.think)
        return [Request(r["question"], ids, r["images"], n_tiles, r.where, r.source)
                for r, (ids, n_tiles) in zip(records, prompts)]
    if cfg.prompt:
        return [make_request(cfg.prompt, cfg.image, tok, c, cfg, "--prompt")]
    if cfg.image:
        raise ValueError("--image needs a --prompt (the question about the image)")
    rec = read_jsonl(make_visual_task("out/sample-data", 1, seed=cfg.seed, split="heldout"))[0]
    print(f"no --prompt: asking about the synthetic image {rec['images'][0]} (true answer: {rec['answer']})",
          file=sys.stderr)
    return [make_request(QUESTION, rec["images"], tok, c, cfg, "synthetic prompt")]


# ----------------------------------------------------------------------------------------------------------------
# Generation

class Progress:
    """generate()'s stream callback: it gets the new tokens a few steps at a time (generate.decode reads them from
    the device that often, never per token), times each arrival and, given `out`, prints row 0's text (StreamDecoder
    holds back the bytes of a half-finished character, so the output is never broken UTF-8)."""

    def __init__(self, tok: Tokenizer, out=None):
        self.tok, self.out, self.times, self.steps, self.rows = tok, out, [], [], 0
        self.decoder = StreamDecoder(tok, skip_special=True)

    def __call__(self, new):  # new [B, n]: the tokens of the steps since the last call, of this rank's group's rows
        self.rows = new.shape[0]
        if not self.rows:  # (--no-tp: a rank may have none)
            return
        row = new.reshape(new.shape[0], -1)[0].tolist()  # the one host read of these steps
        self.times.append(time.perf_counter())
        self.steps.append(len(row))
        if self.out is not None:
            self.out.write("".join(self.decoder.push(t) for t in row if t != self.tok.eos_id))
            self.out.flush()

    def finish(self):
        if self.out is not None:
            self.out.write(self.decoder.flush())
            self.out.flush()


@torch.no_grad()
def generate(model: SkyworkR1V, tok: Tokenizer, requests: list, cfg: SampleConfig, stream=None, decoder=None) -> list:
    """Requests -> generated ids of each (up to, not including, <|im_end|>), as one left-padded batch. decoder: the
    tensor-parallel copy under torchrun (each rank brings its own requests, maybe none, and gets their answers)."""
    device, dtype = model.language_model.lm_head.weight.device, model.language_model.lm_head.weight.dtype
    ids, mask = left_pad([r.ids for r in requests] or [[tok.pad_id]], tok.pad_id)
    ids, mask = ids[:len(requests)], mask[:len(requests)]  # no requests: zero rows (still a part in the collectives)
    pixels = [image_tiles(p, model.config, cfg.max_tiles) for r in requests for p in r.images]  # the order embed() fills
    pixels = torch.cat(pixels).to(device, dtype) if pixels else None
    seq = model.generate(ids.to(device), pixels, mask.to(device), max_new_tokens=cfg.max_new_tokens,
                         temperature=0.0 if cfg.greedy else cfg.temperature, top_p=cfg.top_p,
                         repetition_penalty=cfg.repetition_penalty, eos_token_id=tok.eos_id, stream=stream,
                         generator=torch.Generator(device).manual_seed(cfg.seed), decoder=decoder,
                         compile=cfg.compile)
    rows = seq[:, ids.shape[1]:].tolist()
    return [row[:row.index(tok.eos_id)] if tok.eos_id in row else row for row in rows]


def response_text(tok: Tokenizer, ids: list, cfg: SampleConfig) -> str:
    """The whole assistant turn: the <think> the prompt opened it with, then what the model wrote."""
    return (THINK_PREFIX if cfg.think else "") + tok.decode(ids, skip_special=True)


OUTPUT_KEYS = ("response", "thinking", "extracted_answer")


def output_record(r: Request, response: str) -> dict:
    """A --prompts output line: the input record as written (id, images, gold "answer", any other field), then the
    model's whole response, its reasoning and the answer parse_response extracts. An input field that has one of
    those names is kept as input_<name>, so nothing is overwritten and outputs match inputs by id, not line order."""
    thinking, answer = parse_response(response)
    record = {("input_" + k if k in OUTPUT_KEYS else k): v for k, v in (r.record or {"question": r.question}).items()}
    return {**record, **dict(zip(OUTPUT_KEYS, (response, thinking, answer)))}


def report_speed(progress: Progress, t0: float, n_prompt: int):
    t, batch = progress.times, progress.rows
    if len(t) > 1:
        steps = sum(progress.steps[1:])  # the first arrival is the first token, after the prefill
        print(f"first token after {t[0] - t0:.2f} s ({batch} x {n_prompt} prompt tokens) | decode {steps} steps x {batch} rows in "
              f"{t[-1] - t[0]:.2f} s = {steps * batch / (t[-1] - t[0]):.1f} tokens/s", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# main

def parse_args(argv=None) -> SampleConfig:
    return parse_config(SampleConfig, argv, __doc__.split("\n")[0])


def prepare(cfg: SampleConfig):
    """-> (model, tokenizer, requests, tensor-parallel decoder or None, context). Raises ValueError / FileNotFoundError naming the problem; every input is
    checked before the weights are loaded, so a bad prompt costs no model compute."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA GPU is available (use --device cpu)")
    ckpt = cfg.ckpt
    if not ckpt:
        ckpt, what = default_checkpoint()
        print(f"no --ckpt: using {ckpt}, {what}", file=sys.stderr)
    config, tok = R1VConfig.from_dir(ckpt), Tokenizer.from_dir(ckpt)
    requests = read_requests(cfg, tok, config)
    check_context(requests, cfg.max_new_tokens, config, cfg.max_tiles)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        # torchrun: the model sharded over the GPUs with FSDP2 (the 38B does not fit one 80 GB GPU with a KV cache),
        # through the same loading code as training; the decoder's tensor-parallel copy generates (tp.py). The
        # ranks run in step, each on its share of the prompts (main); rank 0 prints.
        if cfg.tp:
            check_divisible(config.llm, resolve(cfg).tp_size)
        ctx = setup(cfg.dtype or None, cfg.seed, cfg)
        cfg.device = str(ctx.device)
        model = load(ckpt, ctx, train="none", dtype=ctx.dtype).eval()
        return model, tok, requests, make_decoder(model, ctx.dtype) if cfg.tp else None, ctx
    dtype = DTYPES[cfg.dtype or ("bf16" if cfg.device.startswith("cuda") else "fp32")]
    model = SkyworkR1V.from_pretrained(ckpt, dtype=dtype, device=cfg.device)
    return model, tok, requests, None, Context(torch.device(cfg.device))


def answer_all(model, tok: Tokenizer, requests: list, cfg: SampleConfig, ctx: Context, progress, decoder) -> list:
    """generate() over the ranks: rank r answers requests r, r + world, ... (under torchrun; all of them on one
    process), then every rank gets every answer, in the order of `requests`."""
    mine = generate(model, tok, requests[ctx.rank::ctx.world], cfg, progress, decoder)
    shares = all_gather_objects(mine)
    return [shares[i % ctx.world][i // ctx.world] for i in range(len(requests))]


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # under torchrun only rank 0 prints; the others step along
    try:
        model, tok, requests, decoder, ctx = prepare(cfg)
    except (FileNotFoundError, ValueError) as e:
        print_error(e, "sample.py")  # one line per problem (a --prompts file's report has one per record)
        return 2
    if not cfg.prompts:  # one prompt: stream it, then show the answer on its own
        progress, t0 = Progress(tok, sys.stdout), time.perf_counter()
        print(THINK_PREFIX if cfg.think else "", end="", flush=True)
        ids = answer_all(model, tok, requests, cfg, ctx, progress, decoder)[0]  # rank 0's: the one streamed
        progress.finish()
        response = response_text(tok, ids, cfg)
        if cfg.think:  # the reasoning can be long: repeat the answer after it
            print(f"\n\n--- answer ---\n{parse_response(response)[1]}" if THINK_END in response else
                  f"\n\n(no answer: the reasoning never reached {THINK_END})")
        print()
        report_speed(progress, t0, len(requests[0].ids))
        return 0
    for b in range(0, len(requests), cfg.batch_size):
        chunk = requests[b:b + cfg.batch_size]
        progress, t0 = Progress(tok), time.perf_counter()
        for r, ids in zip(chunk, answer_all(model, tok, chunk, cfg, ctx, progress, decoder)):
            print(json.dumps(output_record(r, response_text(tok, ids, cfg)), ensure_ascii=False), flush=True)
        report_speed(progress, t0, max(len(r.ids) for r in chunk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
