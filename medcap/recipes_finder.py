"""Makes ``recipes`` mean this project's ``recipes/`` folder in medcap's environment.

torchtune's wheel installs a top-level package named ``recipes`` (whose ``__init__`` raises), and ``tune run
recipes/generate.py`` imports the recipe as the module ``recipes.generate`` with the working directory appended
to the end of ``sys.path``, so torchtune's package wins; under torchrun a recipe's own ``from recipes.finetune
import main`` hits it too. ``make install`` writes a ``.pth`` file into the environment's site-packages that
registers :class:`ProjectRecipes` at interpreter start-up, ahead of the path-based finders, so ``recipes``
resolves here in every process (single, torchrun workers, ``tune run`` and ``medcap run``). torchtune's own
recipes are unaffected: ``tune run`` runs them by file path, never by this package name.

    python -m medcap.recipes_finder --install     # what make install runs (writes medcap-recipes.pth)
"""

import importlib.util
import sys
import sysconfig
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PTH_NAME = "medcap-recipes.pth"


class ProjectRecipes:
    """A meta path finder for the package ``recipes`` only; its modules are then found through its __path__."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "recipes" or not (RECIPES / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location("recipes", RECIPES / "__init__.py",
                                                      submodule_search_locations=[str(RECIPES)])


def register() -> None:
    if not any(isinstance(finder, ProjectRecipes) for finder in sys.meta_path):
        sys.meta_path.insert(0, ProjectRecipes())


def install() -> Path:
    """Write the ``.pth`` file that calls :func:`register` at start-up into this interpreter's site-packages."""
    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text("import medcap.recipes_finder; medcap.recipes_finder.register()\n", encoding="utf-8")
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        raise SystemExit("usage: python -m medcap.recipes_finder --install")
    print(f"registered the project's recipes package: {install()}")
