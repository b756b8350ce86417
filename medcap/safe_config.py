"""Configs read from files the user did not write (an index's meta.json, a shared checkpoint's config.yaml) are
data: before anything in them is instantiated, every ``_component_`` must name a model or encoder builder
defined in medcap itself, so a shared file cannot make medcap call ``subprocess.call`` or anything else (not even
medcap's own file writers)."""

import importlib
import inspect
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

BUILDER_MODULES = ("medcap.models.builders", "medcap.models.encoders", "medcap.models.llava_hf")


def check_components(node: Any, source: str, trusted: list[str] | tuple = ()) -> None:
    """Raise ValueError naming ``source`` and the key when ``node`` names a component that is not one of the
    functions or classes defined in ``BUILDER_MODULES``, nor one the user ``trusted`` by its full name. Only the
    nodes are checked: a caller must not parse a string of the file as YAML (``OmegaConf.create``) afterwards."""
    for key, value in _components(node, ""):
        if value in trusted:
            continue
        module_name, _, name = value.rpartition(".") if isinstance(value, str) else ("", "", "")
        target = None
        if module_name in BUILDER_MODULES:
            target = getattr(importlib.import_module(module_name), name, None)
        if target is None or not is_builder(target, module_name):
            raise ValueError(f"{source}: {key} = {value!r} is not allowed: a config read from this file may only "
                             f"build models with the builders of {', '.join(BUILDER_MODULES)} (or components named in "
                             f"trusted_components)")


def is_builder(target: Any, module_name: str) -> bool:
    """A public module class, or a public function annotated to return one, defined in ``module_name``."""
    if getattr(target, "__module__", None) != module_name or getattr(target, "__name__", "_").startswith("_"):
        return False
    if inspect.isclass(target):
        return issubclass(target, nn.Module)
    if not inspect.isfunction(target):
        return False
    returns = typing.get_type_hints(target).get("return")
    return inspect.isclass(returns) and issubclass(returns, nn.Module)


def _components(node: Any, prefix: str):
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "_component_":
                yield path, value
            else:
                yield from _components(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _components(value, f"{prefix}[{i}]")
