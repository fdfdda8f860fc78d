"""Tests for data.py: tokenizer, streaming, tiling, image loading, chat prompts, JSONL, synthetic task."""
import itertools
import json
import os
import shutil
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import (Tokenizer, StreamDecoder, build_chat, build_prompt, encode_chat, load_image,  # noqa: E402
                  make_visual_task, parse_response, read_jsonl, reasoning_trace, tile_grid, train_tokenizer)

MIXED = ("Hello world! It's 2024, we'll check 12345 again.\n\n  <think>\nWait, \\boxed{\\frac{1}{2}} and "
         "$x^2+\\sqrt{3}$.</think> 你好，世界！图中有3个红色形状。😀🎉👍🏽 café naïve\r\n\tEnd<|im_end|>"
         "<img><IMG_CONTEXT><IMG_CONTEXT></img>")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def slow_dir(tok_dir, tmp_path_factory):
    """The same tokenizer without tokenizer.json: vocab.json + merges.txt + added_tokens.json only."""
    d = str(tmp_path_factory.mktemp("slow"))
    for f in os.listdir(tok_dir):
        if f != "tokenizer.json":
            shutil.copy(os.path.join(tok_dir, f), d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


# ---------------------------------------------------------------- tokenizer

def test_train_tokenizer_files_fast_and_deterministic(tok_dir, tmp_path):
    t0 = time.time()
    other = train_tokenizer(str(tmp_path / "again"))
    assert time.time() - t0 < 2.0
    names = sorted(os.listdir(tok_dir))
    assert "tokenizer.json" in names and names == sorted(os.listdir(other))
    for name in names:
        assert open(os.path.join(tok_dir, name), "rb").read() == open(os.path.join(other, name), "rb").read()
    added = json.load(open(os.path.join(tok_dir, "added_tokens.json")))
    assert list(added) == data.ADDED_TOKENS  # the release's order, ids contiguous after the BPE vocabulary
    assert list(added.values()) == list(range(512 - len(added), 512))
    assert len(json.load(open(os.path.join(tok_dir, "vocab.json")))) == 512 - len(added)
    cfg = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert {v["content"] for v in cfg["added_tokens_decoder"].values()} == set(added)


def test_tokenizer_ids_and_roundtrip(tok, tok_dir):
    added = json.load(open(os.path.join(tok_dir, "added_tokens.json")))
    assert tok.eos_id == added["<|im_end|>"] and tok.pad_id == added["<|endoftext|>"]
    assert tok.vocab_size == 512 and tok.token_id("<IMG_CONTEXT>") == added["<IMG_CONTEXT>"]
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert ids.count(added["<IMG_CONTEXT>"]) == 2 and ids.count(added["<think>"]) == 1  # recognised in text
    plain = tok.decode(ids, skip_special=True)
    assert "<|im_end|>" not in plain and "<img>" not in plain and "<think>" in plain  # <think> is not special
    assert tok.encode("2024") == [tok.token_id(c) for c in "2024"]  # Qwen2 splits numbers into single digits


def test_token_id_error_names_token_and_file(tok, tok_dir):
    with pytest.raises(ValueError, match=r"'<nope>'.*tokenizer\.json"):
        tok.token_id("<nope>")


def test_tokenizer_json_and_vocab_merges_agree(tok, slow_dir):
    slow = Tokenizer.from_dir(slow_dir)
    assert slow.encode(MIXED) == tok.encode(MIXED)
    assert slow.decode(tok.encode(MIXED), skip_special=True) == tok.decode(tok.encode(MIXED), skip_special=True)
    assert (slow.eos_id, slow.pad_id, slow.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    with pytest.raises(ValueError, match="vocab.json"):
        slow.token_id("<nope>")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.json"):
        Tokenizer.from_dir(str(tmp_path))


@pytest.mark.parametrize("which", ["tok_dir", "slow_dir"])
def test_matches_transformers_qwen2_tokenizer(which, tok, request):
    transformers = pytest.importorskip("transformers")
    try:
        hf = transformers.Qwen2Tokenizer.from_pretrained(request.getfixturevalue(which))
    except Exception as e:  # noqa: BLE001 (transformers versions differ; this is a reference check only)
        pytest.skip(f"transformers cannot load the directory: {e}")
    assert hf.encode(MIXED, add_special_tokens=False) == tok.encode(MIXED)
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    ids = tok.encode(MIXED)
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special=True)


def test_stream_decoder_never_emits_broken_utf8(tok):
    ids = tok.encode(MIXED)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the text really splits characters
    for skip in (False, True):
        stream, chunks = StreamDecoder(tok, skip_special=skip), []
        for i in ids:
            chunks.append(stream.push(i))
        chunks.append(stream.flush())
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) == tok.decode(ids, skip_special=skip)


def test_stream_decoder_flushes_truncated_character(tok):
    ids = tok.encode("ok 😀")
    ids = ids[:-1] if tok.decode(ids[:-1]).endswith("\ufffd") else ids
    stream = StreamDecoder(tok)
    text = "".join(stream.push(i) for i in ids)
    assert text + stream.flush() == tok.decode(ids)


# ---------------------------------------------------------------- tiling

@pytest.mark.parametrize("w,h,min_t,max_t,expected", [
    (448, 448, 1, 12, (1, 1)),
    (1, 1, 1, 12, (1, 1)),          # tie with (2,2), (3,3) but far too small to be upscaled
    (500, 500, 1, 12, (1, 1)),      # 250000 px < 0.5 * 448^2 * 4
    (896, 896, 1, 12, (2, 2)),      # tie: 802816 > 401408 takes (2,2); (3,3) needs > 903168
    (1344, 1344, 1, 12, (3, 3)),
    (896, 448, 1, 12, (2, 1)),      # (cols, rows): width first
    (448, 896, 1, 12, (1, 2)),
    (1, 4000, 1, 12, (1, 12)),
    (4000, 1, 1, 12, (12, 1)),
    (4000, 1, 1, 6, (6, 1)),
    (1000, 300, 1, 12, (3, 1)),     # 3.33 -> 3
    (1920, 1080, 1, 12, (4, 2)),    # 1.78: ratio 2 is closest; (4,2) ties (2,1), 2073600 px > 802816
    (900, 506, 1, 12, (2, 1)),      # same ratio, 455400 px < 802816: stays (2,1)
    (560, 448, 1, 12, (4, 3)),      # 1.25: ties (1,1),(2,2),(3,2),(3,3) at 0.25; (4,3) is closer
    (1120, 896, 1, 9, (3, 3)),      # 1.25, tie chain: (2,2) then (3,2) then (3,3) all big enough
    (560, 448, 1, 9, (1, 1)),       # same ratio, too small for any later tie
    (560, 448, 2, 2, (2, 1)),       # (1,2), (2,1) tie at 0.75; sorted (1,2) first, (2,1) replaces: area > 200704
    (280, 224, 2, 2, (1, 2)),       # same tie, area 62720 too small: the first in our order stays
    (448, 448, 4, 4, (2, 2)),       # min_tiles forces 4 tiles: (1,4), (2,2), (4,1) -> exact ratio
])
def test_tile_grid_table(w, h, min_t, max_t, expected):
    assert tile_grid(w, h, min_t, max_t) == expected


def test_candidate_grid_order_is_deterministic():
    grids = data.candidate_grids(1, 12)
    assert grids[:5] == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1)] and grids[-1] == (12, 1)
    assert len(grids) == len(set(grids)) == 35


def test_grid_order_only_matters_when_min_tiles_above_one():
    """Exact (rational) check: an equal-product pair of grids can tie for the closest aspect ratio only if
    min_tiles > 1; with min_tiles=1 our (product, cols) order and the release's set order always agree."""
    ties = []
    for min_t in range(1, 13):
        for max_t in range(min_t, 13):
            grids = data.candidate_grids(min_t, max_t)
            for a, b in itertools.combinations(grids, 2):
                r = (Fraction(*a) + Fraction(*b)) / 2  # the aspect ratio equally far from both
                if a[0] * a[1] == b[0] * b[1] and all(abs(r - Fraction(*g)) >= abs(r - Fraction(*a)) for g in grids):
                    ties.append((min_t, max_t, a, b))
    assert ties and all(min_t > 1 for min_t, *_ in ties)
    assert (3, 3, (1, 3), (3, 1)) in ties


def test_tile_grid_errors():
    with pytest.raises(ValueError, match="0x5"):
        tile_grid(0, 5)
    with pytest.raises(ValueError, match="min_tiles=3, max_tiles=2"):
        tile_grid(5, 5, 3, 2)


# ---------------------------------------------------------------- load_image

def _expected(rgb):
    return (np.array(rgb, np.float32) / 255 - data.IMAGENET_MEAN) / data.IMAGENET_STD


def _tile_color(x):  # normalised tile [3, H, W] -> mean RGB in 0..255
    return ((x.mean(dim=(1, 2)).numpy() * data.IMAGENET_STD + data.IMAGENET_MEAN) * 255).round()


def test_load_image_tiles_row_major_and_thumbnail():
    img = Image.new("RGB", (896, 896))
    for (x, y), c in zip([(0, 0), (448, 0), (0, 448), (448, 448)], [(255, 0, 0), (0, 255, 0), (0, 0, 255),
                                                                  (255, 255, 255)]):
        img.paste(c, (x, y, x + 448, y + 448))
    px = load_image(img)
    assert px.shape == (5, 3, 448, 448) and px.dtype.is_floating_point and str(px.dtype) == "torch.float32"
    for t, c in zip(px[:4], [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        assert np.allclose(_tile_color(t), c, atol=1)  # TL, TR, BL, BR
    assert load_image(img, use_thumbnail=False).shape[0] == 4
    assert load_image(img, max_tiles=1).shape[0] == 1   # one tile: no thumbnail
    assert load_image(Image.new("RGB", (1, 4000)), tile=28).shape == (13, 3, 28, 28)


def test_load_image_normalisation_exact():
    px = load_image(Image.new("RGB", (448, 448), (255, 128, 0)))
    assert px.shape == (1, 3, 448, 448)
    assert np.array_equal(px[0, :, 0, 0].numpy(), _expected((255, 128, 0)))


@pytest.mark.parametrize("make,rgb", [
    (lambda: Image.new("RGBA", (64, 64), (0, 0, 0, 0)), (255, 255, 255)),            # transparent -> white
    (lambda: Image.new("RGBA", (64, 64), (200, 10, 10, 255)), (200, 10, 10)),        # opaque: as convert("RGB")
    (lambda: Image.new("LA", (64, 64), (0, 0)), (255, 255, 255)),
    (lambda: Image.new("L", (64, 64), 77), (77, 77, 77)),
    (lambda: Image.new("1", (64, 64), 1), (255, 255, 255)),
    (lambda: Image.new("CMYK", (64, 64), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.new("I;16", (64, 64), 65535), (255, 255, 255)),                   # 16-bit white stays white
    (lambda: Image.new("I;16", (64, 64), 32896), (128, 128, 128)),
    (lambda: Image.new("I", (64, 64), 65535), (255, 255, 255)),
    (lambda: Image.new("I", (64, 64), 100), (100, 100, 100)),
])
def test_load_image_modes(make, rgb):
    px = load_image(make())
    assert px.shape == (1, 3, 448, 448)
    assert np.allclose(px[0, :, 10, 10].numpy(), _expected(rgb), atol=1e-5)


def test_load_image_palette_with_transparency(tmp_path):
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 32, 64))
    img.save(tmp_path / "p.png", transparency=0)  # palette entry 0 (black) is transparent
    px = load_image(tmp_path / "p.png", tile=64)
    assert np.allclose(px[0, :, 5, 5].numpy(), _expected((255, 0, 0)), atol=1e-5)
    assert np.allclose(px[0, :, 5, 60].numpy(), _expected((255, 255, 255)), atol=1e-5)


def test_load_image_exif_orientation(tmp_path):
    img = Image.new("RGB", (448, 896), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 448, 448))  # top half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is 896x448
    img.save(tmp_path / "rot.png", exif=exif)
    px = load_image(str(tmp_path / "rot.png"))
    assert px.shape[0] == 3  # (2, 1) grid + thumbnail, not (1, 2)
    assert np.allclose(_tile_color(px[1]), (255, 0, 0), atol=1)  # red ends up on the right


def test_load_image_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png is not an image"):
        load_image(tmp_path / "text.png")
    Image.effect_noise((256, 256), 64).convert("RGB").save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.png: truncated"):
        load_image(tmp_path / "cut.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    for side in (150, 300):  # 22500 px: PIL only warns; 90000 px: PIL raises. Both must fail, naming the file.
        with pytest.raises(ValueError, match=rf"full.png.*{side * side} pixels"):
            Image.new("RGB", (side, side)).save(tmp_path / "full.png")
            load_image(tmp_path / "full.png")


# ---------------------------------------------------------------- chat template

def test_prompt_golden_one_image():
    p = build_prompt("How many?", [1], num_image_token=2)
    assert p == ("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nHow many?<|im_end|>\n"
                 "<|im_start|>assistant\n<think>\n")
    assert build_prompt("Hi", [], system="Be brief.", thinking=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_golden_two_images():
    p = build_prompt("Compare.", [2, 1], num_image_token=1)
    assert p == ("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n<img><IMG_CONTEXT></img>\nCompare."
                 "<|im_end|>\n<|im_start|>assistant\n<think>\n")
    p = build_prompt("A: <image> B: <image> same?", [1, 2], num_image_token=1)
    assert "A: <img><IMG_CONTEXT></img> B: <img><IMG_CONTEXT><IMG_CONTEXT></img> same?" in p


def test_prompt_placeholder_count_mismatch():
    with pytest.raises(ValueError, match="has 1 <image> placeholders but 2 images"):
        build_prompt("<image> what?", [1, 1])
    with pytest.raises(ValueError, match="has 2 <image> placeholders but 0 images"):
        build_prompt("<image><image>", [])


def test_img_context_count_after_tokenising(tok):
    ids = tok.encode(build_prompt("Count the shapes.", [3, 1], num_image_token=256))
    assert ids.count(tok.token_id("<IMG_CONTEXT>")) == 256 * 4
    assert ids.count(tok.token_id("<img>")) == 2 and ids.count(tok.token_id("</img>")) == 2
    assert ids[-2:] == [tok.token_id("<think>"), tok.encode("\n")[0]]


def test_build_chat_and_loss_mask(tok):
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nA\n</think>\n\n1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "2"}]
    segs = build_chat(messages, [1], num_image_token=1)
    text = "".join(t for t, _ in segs)
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT></img>\nQ1<|im_end|>\n<|im_start|>assistant\n")
    assert text.endswith("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n")
    ids, mask = encode_chat(tok, messages, [1], num_image_token=1)
    assert ids == tok.encode(text)  # segment-wise tokenisation matches the whole string
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert target == "<think>\nA\n</think>\n\n1<|im_end|>2<|im_end|>"
    with pytest.raises(ValueError, match="message 1"):
        build_chat([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])


def test_prompt_plus_response_equals_chat(tok):
    response = reasoning_trace({"shapes": [{"color": "red", "shape": "circle"}], "answer": "1"})
    prompt = build_prompt("Q", [1], num_image_token=1)
    chat = "".join(t for t, _ in build_chat([{"role": "user", "content": "Q"},
                                             {"role": "assistant", "content": response}], [1], 1))
    assert chat == prompt + response[len("<think>\n"):] + "<|im_end|>\n"


@pytest.mark.parametrize("text,expected", [
    ("I think.\n</think>\n\nThe answer is 3.<|im_end|>", ("I think.", "The answer is 3.")),
    ("<think>\nhmm\n</think>\n\n\\boxed{2}", ("hmm", "\\boxed{2}")),
    ("<think>\nstill thinking", ("still thinking", "")),
    ("Just 4.<|endoftext|><|endoftext|>", (None, "Just 4.")),
    ("a</think>b</think>c", ("a", "b</think>c")),
])
def test_parse_response(text, expected):
    assert parse_response(text) == expected


# ---------------------------------------------------------------- JSONL

def test_read_jsonl_resolves_images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    lines = ['{"question": "q1", "images": ["img/a.png"]}', "", '{"question": "q2", "image": "img/a.png"}',
             '{"question": "q3"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    recs = read_jsonl(tmp_path / "d.jsonl")
    assert [r["question"] for r in recs] == ["q1", "q2", "q3"]
    assert recs[0]["images"] == recs[1]["images"] == [str(tmp_path / "img" / "a.png")] and recs[2]["images"] == []


@pytest.mark.parametrize("bad_line,exc,pattern", [
    ('{"question": "q", ', ValueError, r"d.jsonl:2: invalid JSON"),
    ('{"answer": "1"}', ValueError, r"d.jsonl:2: missing field\(s\) question"),
    ('["question"]', ValueError, r"d.jsonl:2: expected a JSON object"),
    ('{"question": "q", "images": ["gone.png"]}', ValueError, r"d.jsonl:2: image file 'gone.png' not found"),
    ('{"question": "q", "images": "a.png"}', ValueError, r"d.jsonl:2: 'images' must be a list"),
])
def test_read_jsonl_errors(tmp_path, bad_line, exc, pattern):
    (tmp_path / "d.jsonl").write_text('{"question": "ok"}\n' + bad_line + "\n")
    with pytest.raises(exc, match=pattern):
        read_jsonl(tmp_path / "d.jsonl")


def test_read_jsonl_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.jsonl"):
        read_jsonl(tmp_path / "x.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="e.jsonl: no records"):
        read_jsonl(tmp_path / "e.jsonl")


# ---------------------------------------------------------------- data checked up front (issue 23)

def _png(path, size=(64, 48)):
    Image.new("RGB", size, "red").save(path)
    return str(path)


def _problems(path, required=("question", "answer")):
    with pytest.raises(data.DataError) as e:
        read_jsonl(path, required)
    return str(e.value).splitlines()


def test_non_utf8_byte_is_reported_with_file_line_and_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    lines = _problems(p)
    assert lines == [f"{p}:2: not UTF-8 text: byte 0xe9 at column 18 (save the file as UTF-8)"]


def test_bom_and_crlf_are_fine(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"question": "a", "answer": "1"}\r\n{"question": "b", "answer": 2}\r\n')
    assert [(r["question"], r.where) for r in read_jsonl(p)] == [("a", f"{p}:1"), ("b", f"{p}:2")]


def test_invalid_json_points_at_the_real_column(tmp_path):
    """A line missing its closing brace: the parser stops at the end of the line, not at 'column 1' of the next."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "a", "answer": "1"\n')
    (line,) = _problems(p)
    assert line.startswith(f"{p}:1: invalid JSON") and "column 32" in line and "end of the line" in line


def test_every_problem_of_a_file_in_one_report_up_to_a_cap(tmp_path):
    good = '{"question": "q", "answer": "1"}'
    bad = ['{"question": "q"}', '{"question": "q", "answer": ""}', '{"question": "", "answer": "1"}',
           '{"question": "q", "answer": [1]}', '[1]']
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([good] + bad + [good]) + "\n")
    lines = _problems(p)
    assert [line.split(": ", 1)[0] for line in lines] == [f"{p}:{n}" for n in range(2, 7)]
    assert "missing field(s) answer" in lines[0] and "empty 'answer'" in lines[1]
    assert "'question' must be a non-empty string" in lines[2] and "string or a number" in lines[3]
    p.write_text("\n".join([bad[0]] * 25) + "\n")
    lines = _problems(p)
    assert len(lines) == data.MAX_PROBLEMS + 1 and lines[-1].endswith("and 5 more problem(s), 25 in all")


def test_corrupt_image_on_line_n_is_one_line_naming_it(tmp_path):
    """What grpo.py reads (data.read_jsonl with question and answer): every image is decoded up front."""
    good = _png(tmp_path / "good.png")
    _png(tmp_path / "big.png", (400, 300))
    blob = open(tmp_path / "big.png", "rb").read()
    (tmp_path / "cut.png").write_bytes(blob[:len(blob) // 2])  # truncated: opens fine, fails when decoded
    rows = [{"question": "q", "answer": "1", "images": ["good.png"]}] * 3
    rows[2] = {"question": "q", "answer": "1", "images": ["cut.png"]}
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (line,) = _problems(p)
    assert line.startswith(f"{p}:3: image 'cut.png': ") and "truncated" in line
    assert read_jsonl(p, check_images=False)[2]["images"] == [str(tmp_path / "cut.png")]  # only when asked not to
    assert good


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    _png(tmp_path / "bomb.png", (100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is now a bomb (PIL only warns up to 2x)
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q", "answer": "1", "images": ["bomb.png"]}\n')
    (line,) = _problems(p)
    assert line.startswith(f"{p}:1: image 'bomb.png'") and "decompression bomb" in line


@pytest.mark.parametrize("size", [(64, 48), (900, 300), (300, 900), (2000, 1000), (448, 448), (1, 5000)])
@pytest.mark.parametrize("max_tiles", [0, 1, 6])
def test_tile_count_equals_image_tiles(tmp_path, tiny_ckpt, size, max_tiles):
    from model import R1VConfig
    config = R1VConfig.from_dir(tiny_ckpt)
    path = _png(tmp_path / "a.png", size)
    assert data.tile_count(path, config, max_tiles) == len(data.image_tiles(path, config, max_tiles))


def test_check_prompts_context_names_tiles_and_max_tiles(tmp_path, tiny_ckpt):
    from model import R1VConfig
    config, tok = R1VConfig.from_dir(tiny_ckpt), Tokenizer.from_dir(tiny_ckpt)
    _png(tmp_path / "wide.png", (900, 300))  # 3 tiles + thumbnail at 448 px
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q", "answer": "1", "images": ["wide.png"]}\n{"question": "q", "answer": "1"}\n'
                 '{"question": "<image> and <image>", "answer": "1", "images": ["wide.png"]}\n')
    recs = read_jsonl(p)
    with pytest.raises(data.DataError) as e:
        data.check_prompts(recs, tok, config, max_tiles=0, max_new_tokens=7500)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{p}:1: the prompt has") and lines[1].startswith(f"{p}:3: ")
    assert "1024 of them for 4 image tiles" in lines[0] and "--max-tiles" in lines[0]
    assert "placeholders" in lines[1]
    ids = data.check_prompts(recs[:2], tok, config, max_tiles=1, max_new_tokens=7500)  # one tile: it fits
    assert [n for _, n in ids] == [1, 0]


# ---------------------------------------------------------------- synthetic task

def _red_blobs(path):  # count red shapes from pixels: red pixels per 3x3 cell
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (a[..., 0] > 150) & (a[..., 1] < 80) & (a[..., 2] < 80)
    cell = 448 // 3
    return sum(red[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].sum() > 200 for r in range(3) for c in range(3))


def test_visual_task_deterministic_and_correct(tmp_path):
    a = read_jsonl(make_visual_task(str(tmp_path / "a"), 12, seed=1), required=("question", "answer", "images"))
    b = read_jsonl(make_visual_task(str(tmp_path / "b"), 12, seed=1))
    for ra, rb in zip(a, b):
        assert open(ra["images"][0], "rb").read() == open(rb["images"][0], "rb").read()
        assert ra["answer"] == rb["answer"] and ra["shapes"] == rb["shapes"]
    for r in a:
        assert r["answer"] == str(_red_blobs(r["images"][0])) and 0 <= int(r["answer"]) <= 5
    assert len({r["answer"] for r in a}) > 1
    held = read_jsonl(make_visual_task(str(tmp_path / "a"), 12, seed=1, split="heldout"))
    assert not {open(r["images"][0], "rb").read() for r in held} & {open(r["images"][0], "rb").read() for r in a}
    assert load_image(a[0]["images"][0]).shape == (1, 3, 448, 448)
    with pytest.raises(ValueError, match="split must be one of"):
        make_visual_task(str(tmp_path), 1, split="test")


def test_reasoning_trace_format(tmp_path, tok):
    rec = read_jsonl(make_visual_task(str(tmp_path), 3, seed=0))[0]
    trace = reasoning_trace(rec)
    assert trace.startswith("<think>\n") and "Wait, let me check" in trace
    thinking, answer = parse_response(trace)
    assert thinking and answer == f"The answer is \\boxed{{{rec['answer']}}}."
    assert tok.decode(tok.encode(trace)) == trace
