"""A recipe run as a command (``medcap run`` or ``tune run``): overrides whose value has the wrong type for
their key stop with one line before anything is built, and an error stops with one line naming what is wrong,
without a traceback; ``MEDCAP_DEBUG=1`` (or ``medcap run --debug``) shows the traceback instead."""

import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

TYPES = {bool: "true or false", int: "an integer", float: "a number"}


def debugging() -> bool:
    return os.environ.get("MEDCAP_DEBUG", "") not in ("", "0")


def _lookup(node, dotted: str):
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_override_types(argv: list[str]) -> None:
    """Each ``key=value`` override whose key holds a boolean or a number in the config file must parse as one
    (``null`` and interpolations are left to the config)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return
    path = Path(argv[argv.index("--config") + 1])
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return  # torchtune's own parser reports an unreadable config
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, raw = arg.split("=", 1)
        expected = _lookup(config, key)
        kind = type(expected)
        if kind not in TYPES or raw.startswith("${"):
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)) \
                or kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        raise SystemExit(f"medcap: {arg}: {key} must be {TYPES[kind]} (the config {path.name} has {expected!r})")


def run_command(main: Callable[[], object]) -> int:
    """Run a recipe's ``main`` as a command; the exit status."""
    check_override_types(sys.argv[1:])
    try:
        main()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001 - a command reports any error in one line
        if debugging():
            raise
        print(f"medcap: error: {type(error).__name__}: {error}", file=sys.stderr)
        print("(MEDCAP_DEBUG=1, or medcap run --debug, shows the traceback)", file=sys.stderr)
        return 1
    return 0
