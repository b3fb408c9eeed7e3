"""Command-line flags onto configuration, one way for every stage verb (curate, train, serve).

Every stage CLI (`pipelines/<stage>/cli.py`) has
- `--config FILE`: a YAML file of the stage's config dataclass;
- `--set KEY=VALUE` (repeatable, `args.overrides`): one field of it;
- named flags, declared as a table of `Flag`s, each a shorthand for one key (`--workers 8` is
  `--set scaling.workers=8`).

`config_from_args` applies them in one order: defaults (or the chosen preset) <- YAML <- `--set` <-
named flags. A named flag that is not given changes nothing; one that is given wins.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dreamcore.config import load_config, merge

T = TypeVar("T")


@dataclass(frozen=True)
class Flag:
    """`--NAME VALUE` (or the switch `--NAME`, when `const` is set) = `--set KEY=VALUE`."""

    name: str  # "--workers"
    key: str  # dotted config key, "scaling.workers"
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    const: Any = None  # a switch: the flag sets `key` to this value (`--gpu` -> scaling.gpu=true)
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def add_config_arguments(
    parser: argparse.ArgumentParser, flags: Sequence[Flag], config_help: str, set_example: str
) -> None:
    """`--config FILE`, `--set KEY=VALUE` and the table's named flags (all default to "not given")."""
    parser.add_argument("--config", metavar="FILE", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config field, e.g. --set {set_example} (repeatable; "
                             "wins over --config)")
    for f in flags:
        if f.const is not None:
            value = str(f.const).lower() if isinstance(f.const, bool) else f.const
            parser.add_argument(f.name, dest=f.dest, action="store_const", const=f.const, default=None,
                                help=f"{f.help} (= --set {f.key}={value})")
        else:
            metavar = f.metavar or f.dest.upper()
            parser.add_argument(f.name, dest=f.dest, type=f.type, choices=f.choices, default=None,
                                metavar=None if f.choices else metavar,
                                help=f"{f.help} (= --set {f.key}={metavar})")


def flag_values(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """Dotted key -> value of the named flags that were given."""
    return {f.key: getattr(args, f.dest) for f in flags if getattr(args, f.dest, None) is not None}


def apply_flags(cfg: T, flags: Mapping[str, Any] | None) -> T:
    """A copy of `cfg` with the named flags' values (dotted key -> value; None = not given) applied."""
    nested: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return merge(cfg, nested) if nested else cfg


def config_from_args(base: T, args: argparse.Namespace, flags: Sequence[Flag]) -> T:
    """The stage's config from its parsed command line: `base` <- --config <- --set <- named flags."""
    return apply_flags(load_config(base, args.config, args.overrides), flag_values(args, flags))
