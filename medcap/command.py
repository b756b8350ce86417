"""A recipe run as a command (``medcap run`` or ``tune run``): overrides whose value has the wrong type for
their key stop with one line before anything is built, and an error stops with one line naming what is wrong,
without a traceback; ``MEDCAP_DEBUG=1`` (or ``medcap run --debug``) shows the traceback instead."""

import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

TYPES = {bool: "true or false", int: "an integer", float: "a number"}


def debugging() -> bool:
    return os.environ.get("MEDCAP_DEBUG", "") not in ("", "0")


def _lookup(node, dotted: str):
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _config_path(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def _parsed(raw: str):
    """The override's value as torchtune reads it: OmegaConf's grammar (``1e-2`` is a number), ``None`` is null."""
    if raw == "None":
        return None
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]), resolve=False)["value"]


def check_override_types(argv: list[str]) -> None:
    """Each ``key=value`` override whose key holds a boolean or a number in the config file must parse as one
    (``null`` and interpolations are left to the config); a value holding "=" is refused, as torchtune would
    refuse it, with the reason."""
    path = _config_path(argv)
    if path is None:
        return
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, YAMLError, OmegaConfBaseException):
        return  # torchtune's own parser reports an unreadable config
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "~")):
            continue
        key, raw = arg.split("=", 1)
        if "=" in raw:
            raise SystemExit(f"medcap: {arg}: an override's value may not contain '=' (torchtune splits overrides "
                             f"at every '='); rename or link the file, or set the value in a copy of the config")
        expected = _lookup(config, key)
        kind = type(expected)
        if kind not in TYPES or raw.startswith("${"):
            continue
        try:
            value = _parsed(raw)
        except (OmegaConfBaseException, ValueError):
            value = raw
        if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)) \
                or kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        raise SystemExit(f"medcap: {arg}: {key} must be {TYPES[kind]} (the config {path.name} has {expected!r})")


def run_command(main: Callable[[], object], distributed: bool = False) -> int:
    """Run a recipe's ``main`` as a command; the exit status. A recipe that is not ``distributed`` (only
    finetune and generate split their work over processes) refuses to run in several: each would do the whole
    job and write the same files."""
    check_override_types(sys.argv[1:])
    try:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes > 1 and not distributed:
            raise ValueError(f"{Path(sys.argv[0]).stem} runs in one process ({processes} processes would each do the "
                             f"whole job and write the same files): run it without --nproc_per_node / torchrun")
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
