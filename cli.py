"""The command line: every field of a config dataclass is a flag; a bad value is one line on stderr and exit 2."""
import argparse
from dataclasses import MISSING, field, fields


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


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the flag and what it accepts, exit 2 as argparse does, but without argparse's usage block:
        a config has dozens of flags, and the line that matters would scroll away (--help lists them)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(cls, description: str = "") -> Parser:
    """Every field of the config dataclass `cls` is a flag: --max-len or --max_len; --flag / --no-flag for booleans;
    one or more values, repeatable, for list fields; field metadata `choices` (see choice()) and `required` go to
    argparse. Every default is None, so the parsed namespace tells which flags were given."""
    p = Parser(description=description)
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        names = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
        kw = dict(dest=f.name, default=None, choices=f.metadata.get("choices"),
                  required=f.metadata.get("required", False))
        if isinstance(default, bool):
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, (list, tuple)):  # --image a.png --image b.png, or --ckpts a b
            p.add_argument(*names, action="extend", nargs="+", **kw)
        else:
            p.add_argument(*names, type=type(default) if default is not None else str, **kw)
    return p


def parse_config(cls, argv=None, description: str = "", defaults=None):
    """Flags -> cls(**{**defaults, **flags}); `defaults` is a dict, or a function of the given flags returning one
    (grpo.py: the tiny run's settings unless --ckpt is given). A ValueError from the config's validation
    (__post_init__) becomes the same one-line error, exit 2, as a value argparse itself rejects: no traceback."""
    parser = make_parser(cls, description)
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    base = defaults(flags) if callable(defaults) else defaults or {}
    try:
        return cls(**{**base, **flags})
    except ValueError as e:
        parser.error(str(e))
