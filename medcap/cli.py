"""The ``medcap`` command: ``medcap run RECIPE --config CONFIG [key=value ...]``, ``medcap ls``,
``medcap cp CONFIG DEST``, ``medcap compare RUN [RUN ...]``. RECIPE and CONFIG are names of the project's recipes /
configs (``finetune_vision``, ``demo/finetune_vision``) or paths. Config semantics are torchtune's:
``_component_``, ``key=value`` overrides and ``~key`` to delete a key."""

import argparse
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

import medcap

ROOT = Path(medcap.__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
CONFIGS = ROOT / "configs"


def find_recipe(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".py" and path.is_file():
        return path.resolve()
    candidate = RECIPES / f"{name}.py"
    if candidate.is_file():
        return candidate
    raise SystemExit(f"medcap: no recipe {name!r}; known recipes: {', '.join(recipe_names())} "
                     f"(or pass a path to a .py file)")


def find_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path.resolve()
    candidate = CONFIGS / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    raise SystemExit(f"medcap: no config {name!r} (looked for {path} and {candidate}); `medcap ls` lists them")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.py") if not p.name.startswith("_"))


def config_recipes() -> dict[str, list[str]]:
    """Configs grouped by the recipe named in their first line, ``# medcap run RECIPE --config NAME``."""
    grouped: dict[str, list[str]] = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        match = re.search(r"medcap run (\S+)", path.read_text(encoding="utf-8").split("\n", 1)[0])
        name = str(path.relative_to(CONFIGS).with_suffix(""))
        grouped.setdefault(match.group(1) if match else "(no recipe)", []).append(name)
    return grouped


def _dotted_keys(node, prefix: str = "") -> dict[str, bool]:
    """{dotted key: whether it names a plain mapping (not a ``_component_`` node)} for every key of a config."""
    keys = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        keys[name] = isinstance(value, dict) and "_component_" not in value
        if isinstance(value, dict):
            keys.update(_dotted_keys(value, name + "."))
    return keys


def check_override_keys(config_path: Path, overrides: list[str]) -> None:
    """A ``key=value`` override must name a key of the config, except new arguments inside a ``_component_``
    node (they are passed to the component, which rejects what it does not take). A typo would otherwise be
    ignored silently by ``cfg.get``; the error suggests the nearest keys."""
    import difflib

    from omegaconf import OmegaConf

    keys = _dotted_keys(OmegaConf.to_container(OmegaConf.load(config_path)))
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("~")
        if key in keys:
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else None
        if parent in keys and not keys[parent]:
            continue  # a new argument of a component
        nearest = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(nearest)}?" if nearest else ""
        raise SystemExit(f"medcap: {config_path.name} has no key {key!r}{hint}")


def run_recipe(recipe: str, config: str, overrides: list[str], nproc_per_node: int | None = None) -> None:
    recipe_path, config_path = find_recipe(recipe), find_config(config)
    check_override_keys(config_path, overrides)
    args = [str(recipe_path), "--config", str(config_path), *overrides]
    if nproc_per_node:
        from torch.distributed.run import main as torchrun

        torchrun([f"--nproc_per_node={nproc_per_node}", *args])
        return
    # The repo root goes first on the path so that `recipes` is this project's package, not torchtune's.
    sys.path.insert(0, str(ROOT))
    saved_argv, sys.argv = sys.argv, args
    try:
        runpy.run_path(str(recipe_path), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    finally:
        sys.argv = saved_argv
        sys.path.remove(str(ROOT))


def write_with_data(config: Path, data: Path, dest: Path) -> None:
    """``config`` (a training or generation config) with ``data``'s ``data_dir``, ``dataset`` and ``val_dataset``."""
    from omegaconf import OmegaConf

    cfg, data_cfg = (OmegaConf.to_container(OmegaConf.load(p)) for p in (config, data))
    if "dataset" not in cfg:
        raise SystemExit(f"medcap: {config} has no dataset node to replace")
    for key in ("data_dir", "dataset", "val_dataset"):
        if key in data_cfg:
            cfg[key] = data_cfg[key]
    if "val_dataset" not in data_cfg and "val_dataset" in cfg:
        cfg["val_dataset"] = None
    cfg = OmegaConf.create(cfg)
    header = f"# {config.relative_to(CONFIGS) if config.is_relative_to(CONFIGS) else config} with the data set of " \
             f"{data.relative_to(CONFIGS) if data.is_relative_to(CONFIGS) else data}\n"
    first = config.read_text(encoding="utf-8").split("\n", 1)[0]
    dest.write_text((first + "\n" if first.startswith("# medcap run") else "") + header + OmegaConf.to_yaml(cfg),
                    encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medcap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe with a config and key=value overrides")
    run.add_argument("recipe")
    run.add_argument("--config", required=True)
    run.add_argument("--nproc_per_node", type=int, default=None, help="launch N processes with torchrun")
    run.add_argument("--debug", action="store_true", help="show the traceback of an error (MEDCAP_DEBUG=1)")
    sub.add_parser("ls", help="list recipes and their configs")
    cp = sub.add_parser("cp", help="copy a config to edit it")
    cp.add_argument("config")
    cp.add_argument("dest")
    cp.add_argument("--data", help="a data config (data/imageclef...) whose data_dir, dataset and val_dataset nodes "
                                   "replace the copied config's")
    compare = sub.add_parser("compare", help="side-by-side table and PNG of several runs' metrics.json")
    compare.add_argument("runs", nargs="+", help="run directories holding metrics.json, or metrics.json files")
    compare.add_argument("--plot", default="compare.png", help="where to write the bar chart (PNG)")
    args, rest = parser.parse_known_args(argv)

    if args.command == "run":
        bad = [a for a in rest if "=" not in a and not a.startswith("~")]
        if bad:
            parser.error(f"overrides must be key=value or ~key, got {bad}")
        if args.debug:
            os.environ["MEDCAP_DEBUG"] = "1"  # torchrun's workers inherit it
        run_recipe(args.recipe, args.config, rest, args.nproc_per_node)
    elif rest:
        parser.error(f"unexpected arguments {rest}")
    elif args.command == "compare":
        from medcap.metrics import format_table
        from medcap.metrics.compare import load_runs, plot_runs, sample_warning

        runs = load_runs(args.runs)
        print(format_table(runs))
        warning = sample_warning(args.runs)
        if warning:
            print(warning)
        print(f"plot -> {plot_runs(runs, args.plot)}")
    elif args.command == "ls":
        grouped = config_recipes()
        width = max(len(r) for r in recipe_names() + ["RECIPE"]) + 2
        print(f"{'RECIPE':<{width}}CONFIGS")
        for recipe in recipe_names():
            print(f"{recipe:<{width}}{', '.join(grouped.get(recipe, [])) or '-'}")
    else:
        dest = Path(args.dest)
        if args.dest.endswith(("/", os.sep)) and not dest.is_dir():
            raise SystemExit(f"medcap: {dest} is not a folder")
        if dest.suffix not in (".yaml", ".yml"):  # `exp_0.5` -> `exp_0.5.yaml`, not `exp_0.yaml`
            dest = dest / find_config(args.config).name if dest.is_dir() else dest.with_name(f"{dest.name}.yaml")
        if dest.exists():
            raise SystemExit(f"medcap: {dest} exists; not overwriting it")
        if not dest.parent.is_dir():
            raise SystemExit(f"medcap: {dest.parent} is not a folder; create it first")
        if args.data:
            write_with_data(find_config(args.config), find_config(args.data), dest)
            print(f"copied {find_config(args.config)} to {dest} with the data set of {find_config(args.data)}")
        else:
            shutil.copyfile(find_config(args.config), dest)
            print(f"copied {find_config(args.config)} to {dest}")


if __name__ == "__main__":
    main()
