"""The command line: every field of a config dataclass is a flag."""
import argparse
from dataclasses import MISSING, fields


def parse_flags(cls, argv=None, description: str = "") -> dict:
    """Every field of the config dataclass `cls` is a flag (--max-len or --max_len; --flag / --no-flag for booleans,
    one or more values, repeatable, for list fields). Returns only the flags given, so callers can layer them over
    any defaults."""
    p = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        names = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
        if isinstance(default, bool):
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, (list, tuple)):  # --image a.png --image b.png, or --ckpts a b
            p.add_argument(*names, dest=f.name, action="extend", nargs="+", default=None)
        else:
            p.add_argument(*names, dest=f.name, type=type(default) if default is not None else str, default=None)
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
