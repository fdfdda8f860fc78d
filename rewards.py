"""Verifiable rewards for GRPO: format (think, then a boxed answer) and accuracy (the boxed answer is right).

Skywork-R1V3 (arXiv 2507.06167) rewards a response with the sum of a format reward and an accuracy reward; here
reward = accuracy + format_weight * format. Model text is hostile input: it is never eval'ed, and the work is
bounded so scoring takes milliseconds whatever the length: on the whole string only linear str methods run (find,
rfind, count, split; C speed); everything else looks at a window of at most _MAX_BOXED characters, with simple
regexes and a bounded, non-recursive brace walk.
"""
import re
from fractions import Fraction

_MAX_BOXED = 200      # longest \boxed{} content we score; longer -> no answer
_MAX_DIGITS = 50      # longer digit strings are compared as strings, never converted to numbers


def format_reward(response: str) -> float:
    """1.0 iff the response is `[<think>] thinking </think> answer` with a non-empty \\boxed{} in the answer.

    The prompt already opens the assistant turn with `<think>\\n` (thinking mode), so the generated text normally
    starts inside the thinking; a leading `<think>` (e.g. when the caller scores prompt tail + response) is accepted
    too. Anything else before the thinking, a second `<think>`, or more than one `</think>` is malformed."""
    s = response.lstrip()
    if s.startswith("<think>"):
        s = s[len("<think>"):]
    if "<think>" in s or s.count("</think>") != 1:
        return 0.0
    thinking, answer = s.split("</think>")
    return 1.0 if thinking.strip() and extract_boxed(answer) else 0.0


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (brace-depth walk, escaped \\{ \\} skipped) or of `\\boxed 5`; None if absent,
    unclosed or longer than _MAX_BOXED characters."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    rest = text[i + len("\\boxed"): i + len("\\boxed") + _MAX_BOXED + 2]   # bounded window
    if rest.startswith(" "):                                               # `\boxed 5`: up to whitespace or `$`
        m = re.match(r" +([^\s$]+)", rest)
        return m.group(1) if m else None
    if not rest.startswith("{"):
        return None
    depth, k = 0, 0
    while k < len(rest):
        c = rest[k]
        if c == "\\":
            k += 1                      # `\{` / `\}` are literal braces
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return rest[1:k]
        k += 1
    return None


_UNITS = ("cm|mm|km|m|in|inch|inches|ft|feet|foot|yd|yards?|miles?|mi|kg|mg|g|grams?|lbs?|pounds?|ml|mL|l|L|liters?|"
          "litres?|s|sec|seconds?|min|minutes?|h|hr|hours?|days?|weeks?|months?|years?|degrees?|deg|rad|radians?|"
          "units?|dollars?|cents?|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|km/h|m/s|"
          "people|students|apples|shapes|items|pieces|times|ways|cubes|circles|squares|triangles")
_UNIT_RE = re.compile(rf"\s*(?:(?:square|sq\.?|cubic)\s*)?(?:{_UNITS})(?:\^\{{?[23]\}}?|[²³])?\.?$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_MIXED_RE = re.compile(r"([+-]?)(\d{1,50})\\frac\{(\d{1,50})\}\{(\d{1,50})\}")   # 1\frac{1}{2} = 3/2
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(rf"([+-]?)(?:\(([+-]?{_NUM})\)|({_NUM}))(?:/(?:\(([+-]?{_NUM})\)|({_NUM})))?")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_MC_RE = re.compile(r"(?i:(?:option|choice|answer)\s*:?\s*)?(?:\(([A-J])\)|([A-J])(?:[.:)]|$))(?:\s.*)?", re.DOTALL)
_MC_ANY_CASE_RE = re.compile(_MC_RE.pattern.replace("[A-J]", "[A-Ja-j]"), re.DOTALL)


def _normalize(s: str) -> str:
    """Strip the LaTeX and wording that do not change the value: $, \\left/\\right, spacing, \\text{}, degrees,
    %, `x =`, trailing units; \\dfrac -> \\frac -> a/b. Input is capped, every regex is linear-ish on it."""
    s = s[:_MAX_BOXED].strip().replace("\u2212", "-").replace("\\$", "").replace("$", "")  # \$5: currency
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])|\\displaystyle|\\[!,;:]", "", s)
    s = re.sub(r"\\ |~", " ", s).replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|\\?%", "", s)
    for _ in range(5):                                       # nested \text{\textbf{..}}: innermost first
        s = _TEXT_RE.sub(r"\1", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)       # \frac12
    m = _MIXED_RE.fullmatch(s.strip())
    if m:
        sign, whole, num, den = m.groups()
        s = f"{sign}{int(whole) * int(den) + int(num)}/{den}" if int(den) else s
    for _ in range(5):
        s = _FRAC_RE.sub(lambda m: "/".join(x if re.fullmatch(r"[\w.]+", x) else f"({x})" for x in m.groups()), s)
    s = s.strip()
    m = re.fullmatch(r"[a-zA-Z]\w{0,2}\s*=\s*(.+)", s, re.DOTALL)   # `x = 5` -> `5`
    if m:
        s = m.group(1)
    s = s.strip().rstrip(".").strip()
    m = _UNIT_RE.search(s)
    if m and m.start() > 0 and _parse_number(s[:m.start()]) is not None:
        s = s[:m.start()]
    return s.strip()


def _parse_number(s: str) -> Fraction | None:
    """Exact value of an int / decimal / a/b / thousands-separated number, else None. Regex only: no exponents,
    no more than _MAX_DIGITS digits, so nothing here can be slow."""
    s = re.sub(r"\s+", "", s)
    if sum(c.isdigit() for c in s) > _MAX_DIGITS:
        return None
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    m = _NUMBER_RE.fullmatch(s)
    if not m:
        return None
    sign, num_p, num, den_p, den = m.groups()
    value = Fraction(num_p or num)
    if den_p or den:
        d = Fraction(den_p or den)
        if d == 0:
            return None
        value /= d
    return -value if sign == "-" else value


def _mc_letter(s: str, lowercase: bool = False) -> str | None:
    """Multiple-choice letter: `B`, `(B)`, `B.`, `B:`, `B) text`, `(B) text`, `Option B` -> 'B'; `B text` -> None.
    lowercase=True also reads `b`, `(b)` ... as 'B' (for predictions: a model may answer a choice in lower case;
    a reference answer `b` stays a word, e.g. a variable name)."""
    m = (_MC_ANY_CASE_RE if lowercase else _MC_RE).fullmatch(s)
    return (m.group(1) or m.group(2)).upper() if m else None


def _canon(s: str) -> str:
    s = re.sub(r"\s+", "", s)
    return s.lower() if s.isalpha() and len(s) > 1 else s    # words are case-insensitive, single letters are not


def answers_match(pred: str, answer: str) -> bool:
    """Letters if the answer is a choice letter; exact rational comparison if both sides are numbers
    (0.5 == 1/2 == \\frac{1}{2}); otherwise the normalised strings."""
    p, a = _normalize(pred), _normalize(answer)
    if not p or not a:
        return False
    letter = _mc_letter(a)
    if letter:
        return _mc_letter(p, lowercase=True) == letter
    x, y = _parse_number(p), _parse_number(a)
    if x is not None and y is not None:
        return x == y
    return _canon(p) == _canon(a)


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 if the content of the last \\boxed{} matches the reference answer, else 0.0."""
    pred = extract_boxed(response)
    return 1.0 if pred is not None and answers_match(pred, answer) else 0.0


def reward(text: str, answer: str, format_weight: float = 0.5) -> float:
    """GRPO's verifiable reward: accuracy (0/1) + format_weight * format (0/1)."""
    return accuracy_reward(text, answer) + format_weight * format_reward(text)
