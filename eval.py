"""Benchmarks: answer MMMU (or a JSONL benchmark) with a checkpoint, and score the answers as MMMU's authors do.

    python eval.py --ckpt CKPT --data MMMU/ [--split validation] [--limit N]    # generate, then score, into --out
    torchrun --nproc_per_node 8 eval.py --ckpt Skywork-R1V3-38B --data MMMU/   # FSDP2 + tensor-parallel decoding
    python eval.py --score out/eval/responses.jsonl [--out DIR]                 # score a responses file only
    python eval.py --benchmark jsonl --ckpt CKPT --data heldout.jsonl           # the project's own JSONL format

Generation follows the release's evaluation (VLMEvalKit in github.com/SkyworkAI/Skywork-R1V, eval/vlmevalkit):
VLMEvalKit's multiple-choice prompt, each `<image k>` replaced by image k itself, no system prompt, thinking mode,
greedy, up to 16,384 new tokens; every image tiled as in training (up to 12 tiles + thumbnail). Answers go to
DIR/responses.jsonl as they are made, one line per item in MMMU's own output format (plus a few fields), and a
rerun resumes from it. Scoring (docs/eval.md): the answer part after the last </think>; its last \\boxed{} decides
when it names an option (or, for open questions, is there); otherwise MMMU's official rules
(github.com/MMMU-Benchmark/MMMU, eval_utils.py), including its random letter, Python `random` seeded 42 at import,
when nothing can be parsed. The LLM judge the release adds for unparsed answers is not reproduced (no network).
"""
import ast
import io
import json
import os
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from cli import at_least, check_choices, choice, parse_config
from data import IMAGE_PLACEHOLDER, THINK_END, THINK_PREFIX, Tokenizer, build_prompt, encode_prompt, image_tiles, \
    parquet_files, read_jsonl, read_parquet, to_rgb
from model import R1VConfig, SkyworkR1V
from parallel import Context, LayoutFlags, load, resolve, setup
from rewards import answers_match, extract_boxed
from rollout import Engine, generate_responses
from tp import check_divisible, make_decoder

random.seed(42)  # MMMU's eval_utils.py seeds at import: its fallback letters are one stream over all items, in order

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class EvalConfig(LayoutFlags):  # + --replicate, --tp-size (parallel.py)
    ckpt: str = ""                # release-format checkpoint dir (needed to generate)
    benchmark: str = choice("mmmu", "jsonl")  # MMMU's parquet layout, or JSONL {question, images, answer, [choices]}
    data: str = ""                # MMMU: a folder of subject folders (or one parquet file); jsonl: the file
    split: str = "validation"     # MMMU files read from a folder: {split}-*.parquet
    limit: int = 0                # only the first N items (0 = all)
    score: str = ""               # score this responses file (ours, or MMMU's output.json / JSONL); no generation
    out: str = "out/eval"         # responses.jsonl, scores.jsonl, results.md, results.json
    # generation: the release's evaluation settings (VLMEvalKit config "R1V3-alpha" served by vLLM)
    max_new_tokens: int = 16384
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0            # nucleus sampling (only with --temperature > 0)
    repetition_penalty: float = 1.0  # > 1 lowers the logits of tokens already seen (CTRL)
    think: bool = True            # open the assistant turn with <think> (the release's thinking mode)
    max_tiles: int = 0            # 448px tiles per image (+ thumbnail); 0 = the checkpoint's max_dynamic_patch (12)
    batch_size: int = 8           # items per generate call (all ranks together under torchrun)
    seed: int = 0                 # the sampling generator's seed (only with --temperature > 0)
    dtype: str = choice("", "fp32", "bf16")  # "" = bf16 on GPU, fp32 on CPU
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # one process: where the model runs
    tp: bool = True               # under torchrun: decode with tp.py's tensor-parallel decoder (--no-tp: FSDP shards)
    compile: bool = False         # torch.compile the fixed-shape decode step

    def __post_init__(self):
        super().__post_init__()  # the layout
        check_choices(self)
        at_least(self, 1, "max_new_tokens", "batch_size")
        at_least(self, 0, "limit", "temperature", "max_tiles", "repetition_penalty")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.score and not (self.ckpt and self.data):
            raise ValueError("give --ckpt and --data to generate, or --score FILE to score a responses file")

    def generation_settings(self) -> dict:  # what the responses depend on: a resumed run must not change it
        keep = ("ckpt", "benchmark", "data", "split", "max_new_tokens", "temperature", "top_p", "repetition_penalty",
                "think", "max_tiles", "seed")
        return {k: v for k, v in asdict(self).items() if k in keep}


# ----------------------------------------------------------------------------------------------------------------
# 1. Items: MMMU's parquet rows or the project's JSONL, as prompts the release's evaluation would build

# MMMU's 6 disciplines and 30 subjects (DOMAIN_CAT2SUB_CAT in MMMU's data_utils.py)
DISCIPLINES = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
SUBJECTS = {s: d for d, subjects in DISCIPLINES.items() for s in subjects}
MMMU_COLUMNS = ("id", "question", "options", "answer", "question_type")
IMAGE_REF = re.compile(r"<image (\d+)>")


@dataclass
class Item:
    id: str
    subject: str
    question_type: str            # "multiple-choice" or "open", as MMMU names them
    answer: object                # a letter (multiple choice) or the reference text; MMMU allows a list of them
    options: list                 # option texts, A, B, ... in order ([] for open questions)
    text: str                     # the user turn, <image> where each image goes
    images: list                  # encoded image bytes or file paths, in <image> order
    where: str                    # "file, item ID": what error messages point at

    def mmmu_fields(self) -> dict:  # the fields of MMMU's output.json format (get_multi_choice_info's choices)
        letters = [chr(ord("A") + i) for i in range(len(self.options))]
        return {"id": self.id, "subject": self.subject, "question_type": self.question_type, "answer": self.answer,
                "all_choices": letters, "index2ans": dict(zip(letters, self.options))}


def mmmu_subject(item_id: str) -> str | None:
    """'validation_Art_Theory_12' -> 'Art_Theory'; None if the id names none of MMMU's 30 subjects."""
    m = re.fullmatch(r"(?:dev|validation|test)_(\w+?)_\d+", str(item_id))
    return m.group(1) if m and m.group(1) in SUBJECTS else None


def vlmevalkit_prompt(question: str, options: list) -> str:
    """VLMEvalKit's multiple-choice prompt (ImageMCQDataset.build_prompt), which its MMMU dataset uses; an open
    question (no options) is the first line alone."""
    prompt = f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{chr(ord('A') + i)}. {o}\n" for i, o in enumerate(options))
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


def place_images(text: str, images: list, where: str) -> tuple[str, list]:
    """VLMEvalKit's split_MMMU: each `<image k>` becomes image k at that place (an image named twice comes twice).
    With no reference every image is kept and build_chat puts them before the text, as VLMEvalKit does."""
    refs = [int(k) for k in IMAGE_REF.findall(text)]
    if not refs:
        return text, [im for im in images if im is not None]
    for k in refs:
        if not 1 <= k <= len(images) or images[k - 1] is None:
            raise ValueError(f"{where}: the question or an option refers to <image {k}> but there is no image_{k}")
    return IMAGE_REF.sub(IMAGE_PLACEHOLDER, text), [images[k - 1] for k in refs]


def mmmu_item(row: dict, file: str) -> Item:
    where = f"{file}, item {row.get('id', '?')}"
    missing = [c for c in MMMU_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"{where}: no column {missing[0]!r} (MMMU's parquet has {', '.join(MMMU_COLUMNS)}, "
                         f"image_1 .. image_7)")
    try:  # a Python list literal, e.g. "['1.5 m', '<image 2>']"; literal_eval parses it without running anything
        options = ast.literal_eval(row["options"])
        if not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
            raise ValueError("not a list of strings")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"{where}: 'options' is not a Python list of strings ({str(e)[:80]}): "
                         f"{str(row['options'])[:80]!r}") from None
    subject = mmmu_subject(row["id"])
    if subject is None:
        raise ValueError(f"{where}: unknown id (MMMU ids are split_Subject_N with one of its 30 subjects)")
    images = [image_bytes_of(row.get(f"image_{k}"), f"{where}, image_{k}") for k in range(1, 8)]
    text, images = place_images(vlmevalkit_prompt(row["question"], options), images, where)
    return Item(row["id"], subject, row["question_type"], row["answer"], options, text, images, where)


def image_bytes_of(cell, where: str):
    """An MMMU image cell ({"bytes", "path"} struct, raw bytes or null) -> bytes or None."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if data is not None and not isinstance(data, bytes):
        raise ValueError(f"{where}: not image bytes ({type(data).__name__})")
    return data


def read_mmmu(path: str, split: str) -> list:
    items = []
    for file in parquet_files(path, f"{split}-*.parquet"):
        items += [mmmu_item(row, file) for row in read_parquet(file)]
    return items


def jsonl_item(rec: dict, n: int, path: str) -> Item:
    """The project's JSONL: {"question", "answer", "images": [...], "choices": [...] (multiple choice), "id",
    "subject"}; a multiple-choice answer is a letter or one choice's text."""
    where = f"{path}, item {rec.get('id', n)}"
    choices = rec.get("choices") or []
    if not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: 'choices' must be a list of strings")
    answer = str(rec["answer"])
    if choices and answer in choices:
        answer = chr(ord("A") + choices.index(answer))
    text, images = place_images(vlmevalkit_prompt(rec["question"], choices), rec["images"], where)
    return Item(str(rec.get("id", n)), str(rec.get("subject", "all")), "multiple-choice" if choices else "open",
                answer, choices, text, images, where)


def read_items(cfg: EvalConfig) -> list:
    if cfg.benchmark == "mmmu":
        items = read_mmmu(cfg.data, cfg.split)
    else:
        items = [jsonl_item(r, n, cfg.data) for n, r in enumerate(read_jsonl(cfg.data, ("question", "answer")), 1)]
    seen = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"{it.where}: the id appears twice")
        seen.add(it.id)
    return items


def open_image(src, where: str) -> Image.Image:
    """Encoded bytes (parquet) or a file path -> a decoded RGB image; a broken one is an error naming the item."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: an image is not readable ({str(e)[:80]})") from None


# ----------------------------------------------------------------------------------------------------------------
# 2. Generation: batches of items, greedy, written to responses.jsonl as they finish

def prompt_length(item: Item, tok: Tokenizer, config, cfg: EvalConfig) -> int:
    """Tokens of the item's prompt (images as their tiles' tokens). Decodes every image: a bad one fails here,
    before any weight is read."""
    tiles = [len(image_tiles(open_image(im, item.where), config, cfg.max_tiles)) for im in item.images]
    try:
        text = build_prompt(item.text, tiles, config.num_image_token, None, cfg.think)
    except ValueError as e:
        raise ValueError(f"{item.where}: {e}") from None
    return len(tok.encode(text))


def read_responses(path: str, items: dict) -> dict:
    """An existing responses.jsonl -> {id: line}; every id must be an item of this benchmark. A last line cut by
    an interruption (no newline, not JSON) is the one thing dropped: it was never a finished answer."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines, done = text.split("\n"), {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the half-written last line of an interrupted run
                if os.environ.get("RANK", "0") == "0":
                    print(f"eval.py: {path}:{n}: dropping the unfinished last line", file=sys.stderr)
                    with open(path, "w", encoding="utf-8") as f:
                        f.writelines(finished + "\n" for finished in lines[:-1])
                return done
            raise ValueError(f"{path}:{n}: not a JSON line; move the file away to start over") from None
        if not isinstance(rec, dict) or rec.get("id") not in items:
            raise ValueError(f"{path}:{n}: unknown id {str(rec.get('id') if isinstance(rec, dict) else rec)[:80]!r}"
                             f": not an item of this --data (another run's file? use another --out)")
        done[rec["id"]] = rec
    if text and not text.endswith("\n") and os.environ.get("RANK", "0") == "0":
        with open(path, "a", encoding="utf-8") as f:  # the next answer starts on a line of its own
            f.write("\n")
    return done


def generate_batch(engine: Engine, batch: list, cfg: EvalConfig, max_new: int) -> list:
    """Items -> [(response text, generated tokens, finished)] in order. Under torchrun each rank encodes its share of
    the batch (at least one item, so every rank joins every collective), the tensor-parallel decoder decodes all
    ranks' rows together, and the answers are gathered back to every rank."""
    model, tok, ctx, decoder = engine
    share = batch[ctx.rank::ctx.world] or batch[-1:]
    prompts = [encode_prompt(tok, model.config, it.text, [open_image(im, it.where) for im in it.images],
                             cfg.max_tiles, thinking=cfg.think) for it in share]
    gen = torch.Generator(ctx.device).manual_seed(cfg.seed)
    rows = generate_responses(model, prompts, ctx, pad_id=tok.pad_id, stop_ids=[tok.eos_id], batch_size=len(share),
                              generator=gen, decoder=decoder, compile=cfg.compile, max_new_tokens=max_new,
                              temperature=cfg.temperature, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty)
    mine = [((THINK_PREFIX if cfg.think else "") + tok.decode(ids, skip_special=True), len(ids),
             bool(ids) and ids[-1] == tok.eos_id) for (ids,) in rows]
    if ctx.world > 1:
        parts = [None] * ctx.world
        dist.all_gather_object(parts, mine)
        # item i of the batch is row i // world of rank i % world
        mine = [parts[i % ctx.world][i // ctx.world] for i in range(len(batch))]
    return mine


def generate(engine: Engine, items: list, lengths: dict, done: dict, cfg: EvalConfig, path: str):
    """Answer every item not in `done`, appending one line per item to `path` (rank 0) as each batch finishes."""
    todo, ctx = [it for it in items if it.id not in done], engine.ctx
    context = engine.model.config.llm.max_position_embeddings
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item", disable=not ctx.is_main,
               file=sys.stderr, dynamic_ncols=True)
    tokens, t0 = 0, time.perf_counter()
    for b in range(0, len(todo), cfg.batch_size):
        batch = todo[b:b + cfg.batch_size]
        max_new = min(cfg.max_new_tokens, context - max(lengths[it.id] for it in batch))  # left-padded batch fits
        answers = generate_batch(engine, batch, cfg, max_new)
        if ctx.is_main:
            with open(path, "a", encoding="utf-8") as f:
                for it, (text, n, finished) in zip(batch, answers):
                    f.write(json.dumps({**it.mmmu_fields(), "response": text, "tokens": n, "finished": finished,
                                        "max_new_tokens": max_new}, ensure_ascii=False) + "\n")
        tokens += sum(n for _, n, _ in answers)
        bar.update(len(batch))
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.1f} tokens/s")
    bar.close()


# ----------------------------------------------------------------------------------------------------------------
# 3. MMMU's official rules (eval_utils.py), rewritten from their documented behaviour

def parse_multi_choice(response: str, all_choices: list, index2ans: dict) -> tuple[str, str]:
    """-> (letter, how). In order: a bracketed letter "(B)"; else a letter standing alone " B "; else, in a
    response of more than 5 words, an option's text (case-insensitive). Several candidates: the one found last in
    the response (ties: the earlier choice). Nothing: a random letter from the seeded stream ("random")."""
    for c in ",.!?;:'":
        response = response.strip(c)
    response = f" {response} "
    found = [c for c in all_choices if f"({c})" in response]
    where, how = (lambda c: response.rfind(f"({c})")), "bracket"
    if not found:
        found = [c for c in all_choices if f" {c} " in response]
        where, how = (lambda c: response.rfind(f" {c} ")), "letter"
    if not found and len(response.split()) > 5:
        lower = response.lower()
        found = [c for c, text in index2ans.items() if str(text).lower() in lower]
        where, how = (lambda c: lower.rfind(str(index2ans[c]).lower())), "option text"
    if not found:
        return random.choice(all_choices), "random"
    last = [where(c) for c in found]
    return found[last.index(max(last))], how


def is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(s: str) -> list:
    """A number -> [its value rounded to 2 decimals]; text -> [lower case], a single character padded by a space
    on either side ([" a", "a "]) so that it only matches as a word."""
    s = s.strip()
    if is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


def extract_numbers(s: str) -> list:
    """Numbers written with thousands commas, in scientific notation, and plain ones, in that order."""
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", s)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", s)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", s)
    return commas + scientific + simple


def key_subresponses(response: str) -> list:
    """The parts of a lower-cased response likely to hold the answer: per line, the shortest tail after one of
    "could be", "so", "is", "thus", "therefore", "final", "answer", "result" (and "=" on the last line); the
    whole response if no line has one. (The official split also names '. ' before a capital letter, which never
    occurs after lower-casing: only newlines split.)"""
    response = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for i, line in enumerate(lines):
        shortest = None
        for ind in indicators + (["="] if i == len(lines) - 1 else []):
            if ind in line:
                tail = line.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list:
    """Open question -> candidate answers: the key parts, the numbers in them, each normalised (normalize_str)."""
    keys = key_subresponses(response)
    candidates = keys + [n for k in keys for n in extract_numbers(k)]
    return list(dict.fromkeys(x for c in candidates for x in normalize_str(c)))


def eval_open(gold, preds: list) -> bool:
    """Right if a normalised reference string is contained in a text candidate, or equals a number candidate."""
    refs = [x for g in (gold if isinstance(gold, list) else [gold]) for x in normalize_str(str(g))]
    for p in preds:
        if isinstance(p, str) and any(isinstance(r, str) and r in p for r in refs):
            return True
        if not isinstance(p, str) and p in refs:
            return True
    return False


def eval_multi_choice(gold, pred: str) -> bool:
    return pred in gold if isinstance(gold, list) else pred == gold


# ----------------------------------------------------------------------------------------------------------------
# 4. The thinking rule: the answer after </think>, its last \boxed{}; then the official rules

def answer_part(response: str) -> str:
    """A thinking response is judged on what follows its last </think>; one without </think> is read whole."""
    return response.rsplit(THINK_END, 1)[-1]


def boxed_choice(boxed: str, all_choices: list, index2ans: dict) -> str | None:
    """\\boxed{} content -> the option it names: its letter ("B", "(B)", "B. text", "\\text{B}", "Option B") or
    one option's text (rewards.answers_match: LaTeX, units and numbers normalised); None if it names none."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", boxed).replace("$", "").strip()
    m = re.fullmatch(r"(?i:(?:option|choice|answer)\s*:?\s*)?\(?([A-Za-z])\)?(?:[.:)]\s*.*)?", s, re.DOTALL)
    if m and m.group(1).upper() in all_choices:
        return m.group(1).upper()
    named = [c for c in all_choices if answers_match(s, str(index2ans.get(c, "")))]
    return named[0] if len(named) == 1 else None


def judge(rec: dict) -> dict:
    """One item of MMMU's output format -> {pred, correct, how}. The official parser runs on every multiple-choice
    item, \\boxed or not, so the seeded random stream advances exactly as the official script's does."""
    answer, response = rec["answer"], answer_part(str(rec["response"]))
    boxed = extract_boxed(response)
    if rec["question_type"] == "multiple-choice":
        pred, how = parse_multi_choice(response, rec["all_choices"], rec["index2ans"])
        letter = boxed_choice(boxed, rec["all_choices"], rec["index2ans"]) if boxed is not None else None
        if letter is not None:
            pred, how = letter, "boxed"
        return {"pred": pred, "correct": eval_multi_choice(answer, pred), "how": how}
    if boxed is not None:  # numbers as numbers (exactly, or to MMMU's 2 decimals), text normalised
        golds = answer if isinstance(answer, list) else [answer]
        right = any(answers_match(boxed, str(g)) for g in golds) or eval_open(answer, parse_open(boxed))
        return {"pred": boxed, "correct": right, "how": "boxed"}
    preds = parse_open(response)
    return {"pred": preds, "correct": eval_open(answer, preds), "how": "open rules"}


# ----------------------------------------------------------------------------------------------------------------
# 5. Scoring a responses file: per item, per subject, per discipline, overall

def read_scored_file(path: str, benchmark: str) -> list:
    """Our responses.jsonl or MMMU's output format (a JSON list, or JSONL, of {id, question_type, answer,
    all_choices, index2ans, response}) -> its records, in file order (the order the random stream follows)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"responses file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else None
        where = [f"{path}, item {k}" for k in range(1, len(records) + 1)] if records is not None else []
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON list ({e.msg} at line {e.lineno})") from None
    if records is None:
        records, where = [], []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                where.append(f"{path}:{n}")
    for rec, w in zip(records, where):
        check_scored(rec, w, benchmark)
    return records


def check_scored(rec, where: str, benchmark: str):
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object")
    missing = [k for k in ("id", "question_type", "answer", "response") if k not in rec]
    if rec.get("question_type") == "multiple-choice":
        missing += [k for k in ("all_choices", "index2ans") if k not in rec]
        if not missing and not rec["all_choices"]:
            raise ValueError(f"{where}: item {rec['id']}: a multiple-choice item with no choices")
    if missing:
        raise ValueError(f"{where}: item {rec.get('id', '?')}: missing field(s) {', '.join(missing)}")
    if benchmark == "mmmu" and mmmu_subject(rec["id"]) is None:
        raise ValueError(f"{where}: unknown id {str(rec['id'])[:80]!r} (MMMU ids are split_Subject_N, e.g. "
                         f"validation_Art_Theory_12)")
    rec.setdefault("subject", mmmu_subject(rec["id"]) if benchmark == "mmmu" else "all")


def score(records: list) -> list:
    """-> one line per item for scores.jsonl."""
    seen, out = set(), []
    for rec in records:
        if rec["id"] in seen:
            raise ValueError(f"item {rec['id']} appears twice in the responses file")
        seen.add(rec["id"])
        out.append({"id": rec["id"], "subject": rec["subject"], "question_type": rec["question_type"],
                    "answer": rec["answer"], **judge(rec)})
        out[-1]["unparsed"] = out[-1]["how"] == "random"
    return out


def tally(lines: list) -> dict:
    n = len(lines)
    right = sum(s["correct"] for s in lines)
    return {"n": n, "correct": right, "accuracy": round(right / n, 4) if n else None}


def results(lines: list, benchmark: str, settings: dict) -> dict:
    """Plain accuracy (micro average) per subject, per discipline (MMMU's six) and over all items."""
    by_subject = defaultdict(list)
    for s in lines:
        by_subject[s["subject"]].append(s)
    out = {"benchmark": benchmark, "overall": tally(lines), "disciplines": {},
           "subjects": {k: tally(v) for k, v in sorted(by_subject.items())}}
    if benchmark == "mmmu":
        for d, subjects in DISCIPLINES.items():
            these = [s for s in lines if SUBJECTS[s["subject"]] == d]
            if these:
                out["disciplines"][d] = {**tally(these), "subjects": [x for x in subjects if x in by_subject]}
    hows = defaultdict(int)
    for s in lines:
        hows[s["how"]] += 1
    mc = sum(s["question_type"] == "multiple-choice" for s in lines)
    out["counts"] = {"items": len(lines), "multiple_choice": mc, "open": len(lines) - mc, "decided_by": dict(hows),
                     "unparsed": hows["random"]}
    # the unparsed items are the ones an LLM judge would decide (not reproduced here): the range it could move to
    lucky = sum(s["correct"] for s in lines if s["unparsed"])
    right = out["overall"]["correct"] - lucky
    out["overall"]["judge_range"] = [round(right / len(lines), 4), round((right + hows["random"]) / len(lines), 4)] \
        if lines else None
    out["settings"] = settings
    return out


def table(res: dict) -> str:
    pct = lambda t: f"{100 * t['accuracy']:.1f}" if t["accuracy"] is not None else "-"  # noqa: E731
    rows = ["| | items | accuracy (%) |", "|---|---:|---:|", f"| **overall** | {res['overall']['n']} | "
            f"**{pct(res['overall'])}** |"]
    groups = res["disciplines"] or {"all subjects": {"subjects": list(res["subjects"])}}
    for d, t in groups.items():
        if "n" in t:
            rows.append(f"| **{d}** | {t['n']} | **{pct(t)}** |")
        rows += [f"| {s} | {res['subjects'][s]['n']} | {pct(res['subjects'][s])} |" for s in t["subjects"]]
    c = res["counts"]
    return "\n".join(rows) + (f"\n\n{c['items']} items ({c['multiple_choice']} multiple choice, {c['open']} open); "
                              f"decided by: {', '.join(f'{k} {v}' for k, v in sorted(c['decided_by'].items()))}; "
                              f"{c['unparsed']} unparsed (a seeded random letter, as MMMU's script draws; a judge "
                              f"deciding them could put the overall anywhere in "
                              f"{' - '.join(f'{100 * x:.1f}' for x in res['overall']['judge_range'])} %).\n")


def write_scores(path: str, out_dir: str, benchmark: str) -> dict:
    lines = score(read_scored_file(path, benchmark))
    settings_path = os.path.join(os.path.dirname(os.path.abspath(path)), "generation.json")
    settings = json.load(open(settings_path)) if os.path.isfile(settings_path) else {}
    res = results(lines, benchmark, {"responses": path, **settings})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "scores.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in lines)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2, ensure_ascii=False)
    md = table(res)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# {benchmark} results: {path}\n\n{md}")
    print(md)
    return res


# ----------------------------------------------------------------------------------------------------------------
# main

def prepare(cfg: EvalConfig):
    """Everything that can be wrong with the input, checked before any weight is read -> (items, prompt lengths,
    finished responses, tokenizer, config)."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA GPU is available (use --device cpu)")
    if not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        raise ValueError(f"--ckpt {cfg.ckpt}: not a checkpoint directory (no config.json)")
    config, tok = R1VConfig.from_dir(cfg.ckpt), Tokenizer.from_dir(cfg.ckpt)
    every = read_items(cfg)
    items = every[:cfg.limit] if cfg.limit else every
    settings_path = os.path.join(cfg.out, "generation.json")
    if os.path.isfile(settings_path) and json.load(open(settings_path)) != cfg.generation_settings():
        raise ValueError(f"{settings_path}: {cfg.out}/responses.jsonl was made with other settings "
                         f"({json.load(open(settings_path))}); use the same flags to resume, or another --out")
    done = read_responses(os.path.join(cfg.out, "responses.jsonl"), {it.id: it for it in every})
    lengths = {it.id: prompt_length(it, tok, config, cfg) for it in items if it.id not in done}
    for it in items:
        if lengths.get(it.id, 0) >= config.llm.max_position_embeddings:
            raise ValueError(f"{it.where}: the prompt has {lengths[it.id]} tokens, the model's context is "
                             f"{config.llm.max_position_embeddings}; lower --max-tiles")
    return items, lengths, done, tok, config


def load_model(cfg: EvalConfig, config):
    """-> (model, context, tensor-parallel decoder or None): one process, or FSDP2 over torchrun's ranks."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if cfg.tp:
            check_divisible(config.llm, resolve(cfg).tp_size)
        ctx = setup(cfg.dtype or None, cfg.seed, cfg)
        model = load(cfg.ckpt, ctx, train="none", dtype=ctx.dtype).eval()
        return model, ctx, make_decoder(model, ctx.dtype) if cfg.tp else None
    dtype = DTYPES[cfg.dtype or ("bf16" if cfg.device.startswith("cuda") else "fp32")]
    ctx = Context(torch.device(cfg.device), dtype=dtype)
    return SkyworkR1V.from_pretrained(cfg.ckpt, dtype=dtype, device=cfg.device).eval(), ctx, None


def main(argv=None) -> int:
    cfg = parse_config(EvalConfig, argv, __doc__.split("\n")[0])
    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # under torchrun only rank 0 prints; the others step along
    try:
        if cfg.score:
            write_scores(cfg.score, cfg.out, cfg.benchmark)
            return 0
        items, lengths, done, tok, config = prepare(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    model, ctx, decoder = load_model(cfg, config)
    path = os.path.join(cfg.out, "responses.jsonl")
    if ctx.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "generation.json"), "w") as f:
            json.dump(cfg.generation_settings(), f, indent=2)
        if done:
            print(f"resuming: {len(done)} of {len(items)} items already in {path}", file=sys.stderr)
    generate(Engine(model, tok, ctx, decoder), items, lengths, done, cfg, path)
    if ctx.is_main:
        write_scores(path, cfg.out, cfg.benchmark)
    return 0


if __name__ == "__main__":
    sys.exit(main())
