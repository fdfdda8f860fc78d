"""The command line: every field of a config dataclass is a flag, described in --help by the comment beside it; a
user's mistake (a flag, a file, the data, a checkpoint) is one line on stderr and exit 2, a traceback is a bug."""
import argparse
import inspect
import io
import os
import sys
import tokenize
from dataclasses import MISSING, field, fields


class UserError(ValueError):
    """A mistake in what the user gave (flag, file, data, checkpoint), found by a check: main() prints its message,
    one line per problem, and exits 2. A ValueError, so code that calls a script's functions can catch either."""


def main(fn, *args, prog: str = None):
    """Run a script's entry point: its return value is the exit status (None = 0); a UserError, or a ValueError /
    FileNotFoundError escaping it (the checks that run before training raise those), becomes `prog: error: ...`
    on stderr, one line per line of the message (a data report has one per problem), and exit 2. Anything else
    is a bug and keeps its traceback. Under torchrun only rank 0 prints; every rank exits 2."""
    try:
        status = fn(*args)
    except (UserError, ValueError, FileNotFoundError) as e:
        print_error(e, prog)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)


def print_error(e: Exception, prog: str = None):
    """`prog: error: ...` on stderr for each line of the error's message (rank 0 only under torchrun)."""
    prog = prog or os.path.basename(sys.argv[0])
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write("".join(f"{prog}: error: {line}\n" for line in str(e).strip().splitlines() or [""]))


def choice(*values):
    """A config field that takes one of `values`, the first being the default: argparse rejects any other value,
    naming the flag and listing the allowed ones."""
    return field(default=values[0], metadata={"choices": values})


def check_choices(config):
    """Raise ValueError for a field outside its declared choices: the same rule when a config is built in code (call
    it from __post_init__; parse_config turns the error into a one-line usage error)."""
    for f in fields(config):
        allowed = f.metadata.get("choices")
        if allowed and getattr(config, f.name) not in allowed:
            raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(repr, allowed))}, "
                             f"got {getattr(config, f.name)!r}")


def at_least(config, minimum, *names):
    """Raise ValueError naming the first of the fields `names` whose value is below `minimum` (for __post_init__)."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(config, name)}")


def field_comments(cls) -> dict:
    """{field name: its description} read from the dataclass's source: the comment at the end of the field's line,
    with the comment-only lines right below it that continue it (aligned under it); a field without one takes
    the comment block right above it. field(metadata={"help": ...}) wins over both. So the dataclass stays the one
    place a flag is described, and --help shows exactly what a reader of the code sees. Fields a config inherits
    (parallel.LayoutFlags) are read from their own class's source."""
    inherited = {}
    for base in reversed(cls.__mro__[1:]):
        if base is not object and hasattr(base, "__dataclass_fields__"):
            inherited.update(field_comments(base))
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # defined in a REPL: no source to read
        return inherited
    names = {f.name for f in fields(cls)}
    lines = source.splitlines()
    comments = {}  # line index -> (column, text) of every comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0] - 1] = (tok.start[1], tok.string.lstrip("#").strip())
    out = {}
    for i, line in enumerate(lines):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if name not in names or name in out or stripped.startswith("#") or ":" not in stripped:
            continue
        if i in comments:  # trailing comment, then its continuation lines
            col, text = comments[i]
            parts, j = [text], i + 1
            while j in comments and lines[j].strip().startswith("#") and comments[j][0] == col:
                parts.append(comments[j][1])
                j += 1
        else:  # the comment block above the field, at its indentation (not the previous field's continuation)
            parts, j, indent = [], i - 1, len(line) - len(line.lstrip())
            while j >= 0 and lines[j].strip().startswith("#") and comments[j][0] == indent:
                parts.insert(0, comments[j][1])
                j -= 1
        out[name] = " ".join(p for p in parts if p)
    return {**inherited, **out, **{f.name: f.metadata["help"] for f in fields(cls) if "help" in f.metadata}}


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no prefix matching: `--step 1` must not run as `--steps 1` (or silently become another flag tomorrow)
        super().__init__(*args, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        """One line naming the flag and what it accepts, exit 2 as argparse does, but without argparse's usage block:
        a config has dozens of flags, and the line that matters would scroll away (--help lists them)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(cls, description: str = "", preset: dict = None, preset_name: str = "preset") -> Parser:
    """Every field of the config dataclass `cls` is a flag: --max-len or --max_len; --flag / --no-flag for booleans;
    one or more values, repeatable, for list fields; field metadata `choices` (see choice()) and `required` go to
    argparse. Every default is None, so the parsed namespace tells which flags were given. --help shows each
    flag's description (field_comments) and default, and where `preset` (a dict) differs, the preset's value."""
    p = Parser(description=description)
    helps, preset = field_comments(cls), preset or {}
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        names = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
        shown = "required" if f.metadata.get("required") else f"default: {default!r}"
        if f.name in preset and preset[f.name] != default:
            shown += f"; {preset_name}: {preset[f.name]!r}"
        help_text = helps.get(f.name, "")
        kw = dict(dest=f.name, default=None, choices=f.metadata.get("choices"),
                  required=f.metadata.get("required", False),
                  help=(f"{help_text} ({shown})" if help_text else f"({shown})").replace("%", "%%"))
        if isinstance(default, bool):
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, (list, tuple)):  # --image a.png --image b.png, or --ckpts a b
            p.add_argument(*names, action="extend", nargs="+", **kw)
        else:
            p.add_argument(*names, type=type(default) if default is not None else str, **kw)
    return p


def parse_config(cls, argv=None, description: str = "", defaults=None, preset_name: str = "preset"):
    """Flags -> cls(**{**defaults, **flags}); `defaults` is a dict, or a function of the given flags returning one
    (grpo.py: the tiny run's settings unless --ckpt is given; --help then shows them as `preset_name`, computed
    for a command line without flags). A ValueError from the config's validation (__post_init__) becomes the same
    one-line error, exit 2, as a value argparse itself rejects: no traceback."""
    preset = defaults({}) if callable(defaults) else defaults or {}
    parser = make_parser(cls, description, preset, preset_name)
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    base = defaults(flags) if callable(defaults) else defaults or {}
    try:
        return cls(**{**base, **flags})
    except ValueError as e:
        parser.error(str(e))
