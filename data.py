"""Data for nanoR1V: tokenizer, image tiling, chat prompts, JSONL datasets and a synthetic visual task.

Everything here mirrors what the Skywork-R1V3 release feeds its model (InternVL's preprocessing, Qwen2's
byte-level BPE and the ChatML template), written with tokenizers + Pillow + numpy only.
"""
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from cli import UserError

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

# Qwen2's pre-tokenisation split (tokenization_qwen2.py PRETOKENIZE_REGEX): contractions, letter runs with one
# leading non-letter, single digits (numbers are split digit by digit), punctuation runs, newlines, whitespace.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Added tokens in the release's order (ids follow the BPE vocabulary, as 151643.. do in Qwen2). The chat and
# image markers are "special" (dropped by decode(skip_special=True)); <think> / </think> are ordinary added
# tokens, as in Qwen3 / DeepSeek-R1, so a decoded response keeps its reasoning markers for parse_response.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
ADDED_TOKENS = SPECIAL_TOKENS + ["<think>", "</think>"]
DEFAULT_CORPUS = [  # what the tiny models will see: chat markup, reasoning words, digits, LaTeX, Chinese, emoji
    "<|im_start|>user\n<image>\nHow many red shapes are in the image?<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nI see a red circle, a blue square and a red triangle. That makes 2 red shapes. Wait, let me check "
    "the image again. The triangle is red, so the count is 2.\n</think>\n\nThe answer is \\boxed{2}.",
    "Let x = 3. Then x^2 + 2x + 1 = 16, so \\frac{16}{4} = 4 and \\sqrt{16} = 4. Alternatively, (x+1)^2 = 16.",
    "Wait, maybe I made a mistake. Alternatively, we can compute 12 * 7 = 84 and 84 / 2 = 42. Hence \\boxed{42}.",
    "Suppose the area is \\pi r^2 with r = 5; then the area is 25\\pi \\approx 78.54. Thus the answer is 78.54.",
    "The green shape is on the left, the blue one is at the top. However, there are 3 circles in total.",
    "题目：图中有几个红色的形状？答案是3。让我们一步一步地思考。等一下，再检查一遍。",
    "Great job! 🎉 The answer is correct ✅ 😀 Let's try the next problem 🚀. Solve 2y - 7 = 11 \\implies y = 9.",
    "Hmm, \\sin\\theta = \\frac{1}{2}, so \\theta = 30^\\circ. Wait, or 150^\\circ? Options: (A) 1 (B) 2 (C) 3.",
    "<img><IMG_CONTEXT></img> There are 0 red shapes, 1 green shape and 4 blue shapes in the image.",
]


def _byte_level_bpe(model):
    """Wrap a BPE model with Qwen2's normaliser, pre-tokeniser and decoder (same as its tokenizer.json)."""
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.NFC()  # Qwen2Tokenizer NFC-normalises text before splitting
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(out_dir, texts=None, vocab_size=512):
    """Train a small byte-level BPE on `texts` (default: a built-in reasoning corpus) and write the files a Qwen2
    tokenizer checkpoint ships. The BPE gets up to vocab_size - 8 entries (fewer if the corpus runs out of merges:
    the built-in one stops at 634 in total); the 8 added tokens follow it. Read the size back, never assume it."""
    n_bpe = vocab_size - len(ADDED_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: need 256 byte tokens + {len(ADDED_TOKENS)} added")
    tok = _byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else DEFAULT_CORPUS, trainer=trainer)
    # Added after training so their ids come last and they live outside vocab.json (added_tokens.json holds them).
    tok.add_tokens([AddedToken(t, special=t in SPECIAL_TOKENS, normalized=False) for t in ADDED_TOKENS])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tok.model.save(out_dir)  # vocab.json + merges.txt ("#version: 0.2" header, as Qwen2 ships them)
    ids = {t: tok.token_to_id(t) for t in ADDED_TOKENS}
    _write_json(os.path.join(out_dir, "added_tokens.json"), ids)
    entry = {t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": t in SPECIAL_TOKENS} for t in ADDED_TOKENS}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "additional_special_tokens": SPECIAL_TOKENS[1:], "eos_token": entry["<|im_end|>"],
        "pad_token": entry["<|endoftext|>"]})
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {  # the fields Qwen2's tokenizer_config.json has
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): entry[t] for t in ADDED_TOKENS},
        "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    return out_dir


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


class Tokenizer:
    """Thin wrapper over a `tokenizers` byte-level BPE, loaded from a checkpoint directory."""

    def __init__(self, tok, source):
        self.tok, self.source = tok, source
        self.eos_id = self.token_id("<|im_end|>")  # the chat turn terminator is what generation stops at
        self.pad_id = self.token_id("<|endoftext|>")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, ckpt_dir):
        path = os.path.join(ckpt_dir, "tokenizer.json")
        if os.path.exists(path):
            return cls(HFTokenizer.from_file(path), path)
        return cls(_from_vocab_merges(ckpt_dir), os.path.join(ckpt_dir, "vocab.json + merges.txt"))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=False):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)  # accepts tensors too

    def token_id(self, token):
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the tokenizer loaded from {self.source}")
        return i


def _from_vocab_merges(ckpt_dir):
    """Rebuild the tokenizer from the slow-tokenizer files (vocab.json, merges.txt, added_tokens.json)."""
    vocab, merges = (os.path.join(ckpt_dir, f) for f in ("vocab.json", "merges.txt"))
    for p in (vocab, merges):
        if not os.path.exists(p):
            raise FileNotFoundError(f"no tokenizer in {ckpt_dir}: need tokenizer.json or vocab.json + merges.txt "
                                    f"({p} is missing)")
    tok = _byte_level_bpe(models.BPE.from_file(vocab, merges))
    added_path = os.path.join(ckpt_dir, "added_tokens.json")
    config = _read_json(os.path.join(ckpt_dir, "tokenizer_config.json"), {})
    special = {a["content"]: a.get("special", True) for a in config.get("added_tokens_decoder", {}).values()}
    for token, want in sorted(_read_json(added_path, {}).items(), key=lambda kv: kv[1]):  # in id order
        tok.add_tokens([AddedToken(token, special=special.get(token, True), normalized=False)])
        if tok.token_to_id(token) != want:
            raise ValueError(f"{added_path}: {token!r} has id {want} but would get {tok.token_to_id(token)} "
                             f"(added-token ids must follow vocab.json contiguously)")
    return tok


def _read_json(path, default):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class StreamDecoder:
    """Incremental detokenisation for streaming generation. A multi-byte character (Chinese, emoji) can span
    several byte-level tokens; until its last byte arrives the partial text decodes to U+FFFD, so those tokens
    are held back. Cutting only after a complete character makes the concatenated stream equal the full decode."""

    def __init__(self, tokenizer, skip_special=False):
        self.tok, self.skip_special = tokenizer, skip_special
        self.pending = []  # ids not yet emitted; always starts on a character boundary

    def push(self, token_id):
        self.pending.append(int(token_id))
        text = self.tok.decode(self.pending, skip_special=self.skip_special)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self):
        """Emit whatever is held back (a truncated character comes out as U+FFFD, as in the full decode)."""
        text = self.tok.decode(self.pending, skip_special=self.skip_special)
        self.pending = []
        return text


# ----------------------------------------------------------------------------------------------------------------
# Images: InternVL's dynamic tiling (dynamic_preprocess in the release's inference utils)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def candidate_grids(min_tiles, max_tiles):
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, sorted by (cols*rows, cols). The release sorts a
    Python set by cols*rows only, leaving equal products in set-iteration (hash) order; we break the tie by cols.
    The order can only change the result when two equal-product grids tie for closest aspect ratio, which needs
    min_tiles > 1 (e.g. (1, 3) vs (3, 1) for a 5:3 image with min_tiles=3): with min_tiles=1, (1, 1) is always
    strictly closer (checked exhaustively in tests/test_data.py)."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def tile_grid(width, height, min_tiles=1, max_tiles=12, tile=448):
    """(cols, rows) of the grid whose aspect ratio is closest to the image's. On an exact tie a later (larger)
    grid wins only if the image has more than half the pixels that grid would hold, so small images are not
    blown up into many tiles."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def _open_image(path):
    """Open and fully decode an image file, turning PIL's failures into errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; a training run should not decode a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now so truncation is caught here, not deep inside a resize
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: refusing to decode a possible decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image format PIL can read") from None
    except (OSError, SyntaxError, EOFError, ValueError) as e:  # "image file is truncated", broken PNG chunks, ...
        raise ValueError(f"{path}: truncated or corrupt image data ({e})") from None


_SIZES = {}  # (path, mtime, bytes) -> (width, height) after EXIF rotation, or the error: each file decoded once


def image_size(path) -> tuple[int, int]:
    """Decode an image file fully (as _open_image: truncation and bombs are errors) -> (width, height) as the
    model will see it (EXIF-rotated). Remembered per file version, so checking a data set up front and tiling it
    later decode each file once here."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _SIZES:
        try:
            _SIZES[key] = _open_image(path).size
        except (ValueError, FileNotFoundError) as e:
            _SIZES[key] = e
    if isinstance(_SIZES[key], Exception):
        raise _SIZES[key]
    return _SIZES[key]


def to_rgb(img):
    """Any PIL image -> RGB. The release just calls .convert("RGB"); we additionally honour EXIF rotation (phone
    photos), rescale 16-bit data (PIL's convert clips it, leaving mostly white) and composite transparency on
    white (convert drops alpha and exposes whatever colour hides under it, often black, so dark line art and
    text on a transparent background would vanish). Opaque 8-bit images convert exactly as in the release."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # 'I;16*' are 16-bit; 'I' is 32-bit but in practice holds 16-bit PNG data
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def load_image(path_or_pil, max_tiles=12, tile=448, use_thumbnail=True, min_tiles=1):
    """Image file or PIL image -> normalised tiles, float32 [n, 3, tile, tile]: the grid tiles in row-major order,
    then (if there is more than one tile and use_thumbnail) the whole image resized to one tile, which gives the
    model global context that the crops lack."""
    img = to_rgb(path_or_pil) if isinstance(path_or_pil, Image.Image) else _open_image(path_or_pil)
    cols, rows = tile_grid(img.width, img.height, min_tiles, max_tiles, tile)
    resized = img.resize((cols * tile, rows * tile), Image.BICUBIC)
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(img.resize((tile, tile), Image.BICUBIC))
    x = np.stack([np.asarray(t) for t in tiles]).astype(np.float32) / np.float32(255)  # [n, H, W, 3] in [0, 1]
    x = (x - IMAGENET_MEAN) / IMAGENET_STD  # same float32 ops as torchvision ToTensor + Normalize
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def image_tiles(path_or_pil, config, max_tiles=0):
    """load_image with a checkpoint's settings (config: model.R1VConfig): tile side force_image_size, up to
    max_dynamic_patch tiles (1 without dynamic_image_size), at least min_dynamic_patch, thumbnail per use_thumbnail.
    max_tiles > 0 overrides the limit. Every script tiles through here, so prompts and pixels always agree."""
    limit = max_tiles or (config.max_dynamic_patch if config.dynamic_image_size else 1)
    return load_image(path_or_pil, max_tiles=limit, tile=config.force_image_size, use_thumbnail=config.use_thumbnail,
                      min_tiles=min(config.min_dynamic_patch, limit))


def tile_count(path, config, max_tiles=0) -> int:
    """len(image_tiles(path, config, max_tiles)) from the image's size alone: what a prompt's <IMG_CONTEXT> count
    needs, without resizing anything (the data checks count the tiles of every image of a data set)."""
    limit = max_tiles or (config.max_dynamic_patch if config.dynamic_image_size else 1)
    cols, rows = tile_grid(*image_size(path), min(config.min_dynamic_patch, limit), limit, config.force_image_size)
    return cols * rows + (config.use_thumbnail and cols * rows > 1)


# ----------------------------------------------------------------------------------------------------------------
# Chat template: ChatML turns as in InternVL2.5's "internvl2_5" template that the release inherits

IMAGE_PLACEHOLDER, IMG_START, IMG_END, IMG_CONTEXT = "<image>", "<img>", "</img>", "<IMG_CONTEXT>"
THINK_START, THINK_END = "<think>", "</think>"
# R1-style generation prompt: the assistant turn is opened with "<think>\n" so the model starts reasoning at once
# (DeepSeek-R1 / Qwen3 use the same "<think>\n" prefix); the response then ends its reasoning with "</think>".
THINK_PREFIX = THINK_START + "\n"


def image_tokens(n_tiles, num_image_token=256):
    """<img> + one <IMG_CONTEXT> per visual token of every tile (thumbnail included) + </img>."""
    return IMG_START + IMG_CONTEXT * (num_image_token * n_tiles) + IMG_END


def build_chat(messages, tiles_per_image=(), num_image_token=256):
    """[{"role": "system"|"user"|"assistant", "content": str}, ...] -> [(text, trainable)] segments whose
    concatenation is the ChatML conversation; trainable marks assistant content + <|im_end|> (the SFT targets).
    `<image>` placeholders in user turns expand in order to the tiles_per_image[i] tiles of image i; with none
    present, "<image>\\n" * n_images is prepended to the first user turn, as the release's inference does."""
    tiles_per_image = list(tiles_per_image)
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i}: need role system/user/assistant and a string content, got {m!r:.200}")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    n_found = sum(messages[i]["content"].count(IMAGE_PLACEHOLDER) for i in users)
    if n_found == 0 and tiles_per_image and users:
        u, prefix = users[0], (IMAGE_PLACEHOLDER + "\n") * len(tiles_per_image)
        messages = [*messages[:u], {**messages[u], "content": prefix + messages[u]["content"]}, *messages[u + 1:]]
        n_found = len(tiles_per_image)
    if n_found != len(tiles_per_image):
        raise ValueError(f"the prompt has {n_found} {IMAGE_PLACEHOLDER} placeholders but {len(tiles_per_image)} "
                         f"images were given")
    images = iter(tiles_per_image)
    segments = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "assistant":
            segments += [("<|im_start|>assistant\n", False), (content + "<|im_end|>", True), ("\n", False)]
            continue
        if role == "user":  # each placeholder takes the next image's tile count
            parts = content.split(IMAGE_PLACEHOLDER)
            content = parts[0] + "".join(image_tokens(next(images), num_image_token) + p for p in parts[1:])
        segments.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
    return segments


def build_prompt(question, tiles_per_image=(), num_image_token=256, system=None, thinking=True):
    """Generation prompt: [system turn] + user turn + the opened assistant turn (+ "<think>\\n" if thinking).
    No system turn unless one is given: the release's prompt text is "<image>\\n" * n + question in a user turn."""
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": question})
    text = "".join(t for t, _ in build_chat(messages, tiles_per_image, num_image_token))
    return text + "<|im_start|>assistant\n" + (THINK_PREFIX if thinking else "")


def encode_prompt(tok, config, question, images=(), max_tiles=0, system=None, thinking=True):
    """The one prompt encoder of every script: a question about images -> (prompt ids [P] list, pixel values
    [tiles,3,H,W] or None). Each image's tile count sets its number of <IMG_CONTEXT> tokens, so ids and pixels
    always agree; a literal "<IMG_CONTEXT>" typed into the question would break that and is refused."""
    tiles = [image_tiles(p, config, max_tiles) for p in images]
    ids = tok.encode(build_prompt(question, [len(t) for t in tiles], config.num_image_token, system, thinking))
    n_tiles = sum(len(t) for t in tiles)
    if ids.count(config.img_context_token_id) != n_tiles * config.num_image_token:
        raise ValueError(f"the question contains the literal text {IMG_CONTEXT}, which is reserved for image tokens")
    return ids, torch.cat(tiles) if tiles else None


def cut_response(ids: list, stop_ids, keep_stop: bool = True) -> list:
    """A generated row -> the response: up to the first stop token (kept or not); a row that never stopped stays
    whole (it hit max_new_tokens)."""
    stop = next((k for k, i in enumerate(ids) if i in stop_ids), None)
    return ids if stop is None else ids[:stop + keep_stop]


def encode_chat(tok, messages, tiles_per_image=(), num_image_token=256):
    """Tokenise build_chat's segments -> (ids, loss_mask) with loss_mask 1 on assistant tokens. Segments are
    tokenised separately; they meet at special tokens or newlines, where the pre-tokeniser splits anyway."""
    ids, mask = [], []
    for text, trainable in build_chat(messages, tiles_per_image, num_image_token):
        seg = tok.encode(text)
        ids += seg
        mask += [int(trainable)] * len(seg)
    return ids, mask


def parse_response(text):
    """Generated text -> (thinking or None, answer). Handles the reasoning with or without its leading <think>
    (the prompt may already hold it); an unterminated <think> means the answer was never reached."""
    for stop in ("<|im_end|>", "<|endoftext|>"):
        text = text.split(stop)[0]
    if THINK_END in text:
        thinking, answer = text.split(THINK_END, 1)
        thinking = thinking.split(THINK_START, 1)[-1]
        return thinking.strip(), answer.strip()
    if text.lstrip().startswith(THINK_START):
        return text.lstrip()[len(THINK_START):].strip(), ""
    return None, text.strip()


def left_pad(seqs, pad_id: int):
    """Token id sequences [Li] -> ids [B, max L] padded on the left, attention mask [B, max L] (1 = real token).
    Left padding puts every row's last prompt token in the last column, where generation continues; positions
    (model.positions) skip the padding."""
    n = max(len(s) for s in seqs)
    ids, mask = torch.full((len(seqs), n), pad_id), torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], mask[i, n - len(s):] = torch.as_tensor(s), 1
    return ids, mask


def shuffled_indices(start: int, count: int, n: int, seed: int) -> list:
    """Items start .. start+count-1 of an endless stream of seeded shuffles of range(n), one shuffle per epoch.
    Which samples a training step reads is then a pure function of (seed, step): a resumed run reads exactly what
    the interrupted one would have, with no data-loader state to save."""
    perms, out = {}, []
    for k in range(start, start + count):
        epoch, j = divmod(k, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][j]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Datasets: JSONL records {"images": [paths relative to the file], "question": ..., "answer": ...}

MAX_PROBLEMS = 20  # problems of one file listed in its report; the rest are counted


class DataError(UserError):
    """Every problem found in a data file, one `FILE:LINE: what is wrong` line each (up to MAX_PROBLEMS): the
    user fixes them all in one go instead of one per run. cli.main prints it, one line per problem, exit 2."""

    def __init__(self, path, problems: list, cap: int = MAX_PROBLEMS):
        self.path, self.problems = os.fspath(path), list(problems)
        more = len(self.problems) - cap
        super().__init__("\n".join(self.problems[:cap] + ([f"{self.path}: ... and {more} more problem(s), "
                                                           f"{len(self.problems)} in all"] if more > 0 else [])))


class Record(dict):
    """A JSONL record (a dict, "images" made absolute) that knows where it came from: `where` = "FILE:LINE" for
    every later message about it, `source` = the object as written in the file (sample.py echoes it back)."""
    where, source = "", None


def read_lines(path):
    """-> ([(line number, text)] of the non-blank lines, [(line number, problem)]): the file is read as bytes and
    each line decoded on its own, so a non-UTF-8 byte is reported with its line and column (the other lines
    still load)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    lines, problems = [], []
    for n, raw in enumerate(raw_lines, 1):
        raw = raw.removesuffix(b"\r").removeprefix(b"\xef\xbb\xbf" if n == 1 else b"")  # CRLF files, a BOM
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            col = len(raw[:e.start].decode("utf-8", "replace")) + 1
            problems.append((n, f"{path}:{n}: not UTF-8 text: byte 0x{raw[e.start]:02x} at column {col} "
                                f"(save the file as UTF-8)"))
            continue
        if text.strip():
            lines.append((n, text))
    return lines, problems


def read_jsonl(path, required=("question",), check_images=True):
    """Read a JSONL dataset -> [Record]. Image paths ("images": [...] or "image": str) come back absolute in
    "images", relative ones resolved against the file's directory. Everything is checked up front and every problem
    of the file is reported at once (DataError, one `FILE:LINE: ...` each): bytes that are not UTF-8, invalid JSON
    (with its column), a missing required field, a question that is not a non-empty string, an empty "answer" (a
    problem no response can be rewarded for), image paths that do not exist, and (check_images) every image
    opened and fully decoded: a truncated file or a decompression bomb fails now, not hours into a run."""
    lines, problems = read_lines(path)
    base, records = os.path.dirname(os.path.abspath(path)), []
    for n, text in lines:
        rec, errors = _parse_record(text, base, required, check_images)
        problems += [(n, f"{path}:{n}: {e}") for e in errors]
        if rec is not None and not errors:
            rec.where = f"{path}:{n}"
            records.append(rec)
    if problems:
        raise DataError(path, [p for _, p in sorted(problems, key=lambda p: p[0])])
    if not records:
        raise UserError(f"{path}: no records")
    return records


def _parse_record(text, base, required, check_images) -> tuple:
    """One line -> (Record or None, [problems])."""
    try:
        source = json.loads(text)
    except json.JSONDecodeError as e:
        end = ", the end of the line: is a closing brace or quote missing?" if e.pos >= len(text.rstrip()) else ""
        return None, [f"invalid JSON ({e.msg} at column {e.colno}{end})"]
    if not isinstance(source, dict):
        return None, [f"expected a JSON object, got {type(source).__name__}"]
    rec, errors = Record(source), []
    rec.source = source
    missing = [k for k in required if k not in rec]
    if missing:
        errors.append(f"missing field(s) {', '.join(missing)}")
    if "question" in rec and not (isinstance(rec["question"], str) and rec["question"].strip()):
        errors.append(f"'question' must be a non-empty string, got {rec['question']!r:.100}")
    if "answer" in rec:
        a = rec["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            errors.append(f"'answer' must be a string or a number, got {a!r:.100}")
        elif not str(a).strip():
            errors.append("empty 'answer': no response could ever be rewarded for it")
    images = rec.pop("image", None)
    images = rec.get("images", [] if images is None else [images])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return rec, errors + [f"'images' must be a list of file paths, got {images!r:.200}"]
    rec["images"] = [os.path.join(base, p) for p in images]  # join keeps absolute paths as they are
    for p, full in zip(images, rec["images"]):
        if not os.path.isfile(full):
            errors.append(f"image file {p!r} not found (looked for {full})")
        elif check_images:
            try:
                image_size(full)
            except ValueError as e:
                errors.append(f"image {p!r}: {e}")
    return rec, errors


def context_problem(n_ids: int, n_tiles: int, new_tokens: int, config, max_tiles: int = 0,
                    what: str = "--max-new-tokens") -> str | None:
    """Prompt (text + image tokens) + new tokens against the model's context -> what is wrong, or None."""
    limit = config.llm.max_position_embeddings
    if n_ids + new_tokens <= limit:
        return None
    tiles_now = max_tiles or (config.max_dynamic_patch if config.dynamic_image_size else 1)
    return (f"the prompt has {n_ids} tokens ({n_tiles * config.num_image_token} of them for {n_tiles} image tiles "
            f"x {config.num_image_token}) + {what} {new_tokens} = {n_ids + new_tokens}, more than the model's "
            f"context of {limit} tokens (max_position_embeddings); lower {what} or --max-tiles (now {tiles_now} "
            f"tiles per image)")


def check_prompts(records, tok, config, max_tiles: int = 0, max_new_tokens=0, system=None, thinking=True):
    """The prompt of every record, as the scripts will build it -> [(prompt ids, tile count)], after checking them
    all: <image> placeholders against the images, no literal <IMG_CONTEXT> typed in the question, and prompt +
    max_new_tokens within the model's context (max_new_tokens may be a function of the record: entropy.py's
    --mode score counts the record's response). Every problem -> DataError, one `FILE:LINE: ...` each."""
    out, problems = [], []
    for rec in records:
        try:
            tiles = [tile_count(p, config, max_tiles) for p in rec.get("images", ())]
            ids = tok.encode(build_prompt(rec["question"], tiles, config.num_image_token, system, thinking))
            if ids.count(config.img_context_token_id) != sum(tiles) * config.num_image_token:
                raise ValueError(f"the question contains the literal text {IMG_CONTEXT}, which is reserved for "
                                 f"image tokens")
            new = max_new_tokens(rec) if callable(max_new_tokens) else max_new_tokens
            problem = context_problem(len(ids), sum(tiles), new, config, max_tiles)
            if problem:
                raise ValueError(problem)
        except (ValueError, FileNotFoundError) as e:
            problems.append(f"{getattr(rec, 'where', '') or 'record'}: {e}")
            continue
        out.append((ids, sum(tiles)))
    if problems:
        raise DataError(getattr(records[0], "where", "data").rsplit(":", 1)[0], problems)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Synthetic visual task for the default SFT / GRPO runs: count the red shapes in an image

COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")
SPLITS = ("train", "heldout")
GRID = 3  # shapes sit in distinct cells of a 3x3 grid: big, never overlapping, so counting is learnable
QUESTION = "How many red shapes are in the image?"


def _draw_shape(draw, kind, color, box):
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def make_visual_example(rng, size=448):
    """-> (PIL image, shapes) with 1-5 shapes [{"color", "shape", "cell"}] in reading order."""
    n = int(rng.integers(1, 6))
    cells = sorted(rng.choice(GRID * GRID, size=n, replace=False).tolist())
    img, cell = Image.new("RGB", (size, size), "white"), size // GRID
    draw, shapes = ImageDraw.Draw(img), []
    for c in cells:
        color, kind = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        side = int(rng.integers(cell * 6 // 10, cell * 9 // 10))  # 60-90% of the cell
        x0 = (c % GRID) * cell + int(rng.integers(0, cell - side + 1))
        y0 = (c // GRID) * cell + int(rng.integers(0, cell - side + 1))
        _draw_shape(draw, kind, COLORS[color], (x0, y0, x0 + side - 1, y0 + side - 1))
        shapes.append({"color": color, "shape": kind, "cell": c})
    return img, shapes


def make_visual_task(out_dir, n, seed=0, split="train"):
    """Write n examples as PNGs + {split}.jsonl in out_dir; returns the JSONL path. Example i of a split is drawn
    from the seed sequence (seed, split index, i), so splits never share a random stream and reruns are identical."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            img, shapes = make_visual_example(np.random.default_rng([seed, SPLITS.index(split), i]))
            name = f"images/{split}_{seed}_{i:05d}.png"
            img.save(os.path.join(out_dir, name))
            answer = str(sum(s["color"] == "red" for s in shapes))
            rec = {"images": [name], "question": QUESTION, "answer": answer, "shapes": shapes}
            f.write(json.dumps(rec) + "\n")
    return path


def reasoning_trace(problem):
    """Cold-start SFT response for a synthetic problem (needs its "shapes"): walk the image in reading order,
    keep a running count, then reflect once ("Wait, let me check") before the boxed answer."""
    lines, count = ["Let me look at the shapes in the image one by one, left to right and top to bottom."], 0
    for k, s in enumerate(problem["shapes"], 1):
        count += s["color"] == "red"
        lines.append(f"Shape {k} is a {s['color']} {s['shape']}, so the red count is {count}.")
    reds = [s["shape"] for s in problem["shapes"] if s["color"] == "red"]
    lines.append(f"Wait, let me check the red shapes again: {', '.join(reds) or 'none'}. "
                 f"That is {len(reds)}, so the count of {count} is right.")
    return THINK_PREFIX + "\n".join(lines) + f"\n{THINK_END}\n\nThe answer is \\boxed{{{problem['answer']}}}."


# ----------------------------------------------------------------------------------------------------------------
# Parquet: the hub's format for benchmarks (MMMU) and public RL / SFT sets; pyarrow is imported only here

def parquet_files(path, pattern="*.parquet"):
    """A parquet file, or every file matching `pattern` anywhere under a folder (sorted, so the order is fixed)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    import glob
    files = sorted(glob.glob(os.path.join(path, "**", pattern), recursive=True))
    if not files:
        raise FileNotFoundError(f"{path}: no {pattern} file in this folder or below it")
    return files


def read_parquet(path):
    """One parquet file -> its rows as dicts (image columns hold {"bytes", "path"} structs or raw bytes)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors have several types (ArrowInvalid, OSError, ...): all mean "not readable"
        raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def image_bytes(value, where):
    """A parquet image cell -> list of encoded images (bytes): None, bytes, a {"bytes": ...} struct, or a list."""
    if value is None:
        return []
    if isinstance(value, list):
        return [b for v in value for b in image_bytes(v, where)]
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ValueError(f"{where}: an image cell must hold encoded image bytes, got {str(value)[:80]!r}")
    return [bytes(value)]


def save_image_bytes(data: bytes, image_dir: str) -> str:
    """Write an encoded image once under image_dir, named by its content, and return the path. Every script reads
    images from paths (and decodes them per batch), so a parquet dataset's images go to files rather than memory.
    Written to a temporary name then renamed: ranks extracting the same file at once never see half an image."""
    import hashlib
    ext = ".png" if data[:4] == b"\x89PNG" else ".jpg" if data[:2] == b"\xff\xd8" else ".img"
    path = os.path.join(image_dir, hashlib.sha1(data).hexdigest()[:20] + ext)
    if not os.path.isfile(path):
        os.makedirs(image_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def read_parquet_records(path, need=("question",), columns=None, image_dir="out/parquet-images"):
    """Parquet file or folder of question / answer / image-bytes rows -> records shaped like read_jsonl's:
    Records {"question", "answer", "response", "images": [paths], ...the other columns}, `where` = "FILE row N".
    columns renames: {"question": "problem", "answer": "solution", "images": "image"}; by default the images are in
    "images" or "image", whichever exists (none: a text-only set)."""
    columns, records = dict(columns or {}), []
    for file in parquet_files(path):
        rows = read_parquet(file)
        have = set(rows[0]) if rows else set()
        image_col = columns.get("images") or next((c for c in ("images", "image") if c in have), None)
        for field in need:
            if columns.get(field, field) not in have:
                raise ValueError(f"{file}: no column {columns.get(field, field)!r} for {field!r} (columns: "
                                 f"{', '.join(sorted(have))})")
        if image_col and image_col not in have:
            raise ValueError(f"{file}: no image column {image_col!r} (columns: {', '.join(sorted(have))})")
        for i, row in enumerate(rows):
            where = f"{file} row {i}"
            rec = Record({k: v for k, v in row.items() if k != image_col and not isinstance(v, (bytes, dict))})
            for field in ("question", "answer", "response"):
                if columns.get(field, field) in row:
                    rec[field] = row[columns.get(field, field)]
            rec["images"] = [save_image_bytes(b, image_dir) for b in image_bytes(row.get(image_col), where)]
            rec.where = where
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no rows")
    return records


def read_records(path, need=("question",), columns=None, image_dir="out/parquet-images"):
    """A dataset flag's value (--data, --eval-data) -> records: a .parquet file or a folder holds parquet
    (read_parquet_records), anything else is JSONL (read_jsonl). Each record names its source in `where`
    ("FILE:LINE" or "FILE row N"), so every later error can point at it."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(".parquet"):
        return read_parquet_records(path, need, columns, image_dir)
    return read_jsonl(path, need)


def parse_columns(spec: str) -> dict:
    """--columns "question=problem,answer=solution,images=image" -> {"question": "problem", ...}: the parquet
    column that holds each field the scripts read ("" = the defaults: question, answer, images or image)."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        field, sep, column = part.partition("=")
        if not sep or field.strip() not in ("question", "answer", "images", "response") or not column.strip():
            raise ValueError(f"--columns {spec!r}: each entry is FIELD=COLUMN with FIELD one of question, answer, "
                             f"images, response")
        out[field.strip()] = column.strip()
    return out
