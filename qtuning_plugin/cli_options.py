"""The ``qtuning`` flags that come from :data:`~qtuning_plugin.core.config.OPTIONS` (one per
Q-Tuning option, with its help, default and check) and the argument types the commands share.
Pure Python (no torch): ``qtuning --help`` reads it, and so do the commands (:mod:`.cli`,
:mod:`.demo`, :mod:`.static`), none of which imports another for it."""

from __future__ import annotations

import argparse
from typing import Iterable

from .core.config import OPTIONS, PRESETS
from .core.options import Option


def option_type(option: Option):
    """Parse a flag's text into the option's value, checked by the option itself."""
    def parse(text: str):
        if option.optional and text.lower() in ("null", "none"):
            return None
        try:
            value = {"ratio": float, "number": float, "integer": int}.get(option.kind, str)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option.name} must be {option.allowed()}, got {text!r}") from None
        try:
            return option.check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def positive(name: str):
    """Parse a positive integer for the flag ``name``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text}")
        return value
    return parse


def flag(name: str) -> str:
    """The command-line flag of the option ``name``."""
    return f"--{name.replace('_', '-')}"


def add_options(parser: argparse.ArgumentParser, names: Iterable[str] | None = None, *, defaults: bool = True) -> None:
    """One flag per Q-Tuning option (``names``: a subset), with the option's help, default and check.
    ``defaults=False``: an absent flag sets nothing (the preset's value or the config's default
    applies, as its help says), and ``null`` given for an optional option turns it off."""
    names = None if names is None else set(names)
    for option in (o for o in OPTIONS if names is None or o.name in names):
        default = "null" if option.default is None else option.default
        preset = [p for p, fields in PRESETS.items() if option.name in fields]
        said = f"default {default}" if defaults or not preset else \
            f"default {default}, or the preset's ({', '.join(f'{p}: {PRESETS[p][option.name]}' for p in preset)})"
        parser.add_argument(flag(option.name), dest=option.name, type=option_type(option),
                            default=option.default if defaults else argparse.SUPPRESS, metavar=option.kind.upper(),
                            help=f"{option.help} ({option.allowed()}; {said})".replace("%", "%%"))


def add_preset(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--preset`` (:data:`~qtuning_plugin.core.config.PRESETS`); the option flags override it."""
    said = f"default {default}" if default else "default none: the options' own defaults, the paper's"
    parser.add_argument("--preset", choices=list(PRESETS), default=default,
                        help=f"named Q-Tuning settings ({said}; 'paper' is the paper's Algorithm 1, what "
                        "QTuning() runs); the option flags below override it")


def given_options(args: argparse.Namespace) -> dict:
    """The Q-Tuning options given on the command line (flags of :func:`add_options` with
    ``defaults=False``), with ``preset`` where one was given."""
    given = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
    return {**({"preset": args.preset} if getattr(args, "preset", None) else {}), **given}
