import os
import subprocess
import sys
from pathlib import Path

import pytest

from medcap import cli

ROOT = Path(__file__).resolve().parent.parent
MEDCAP = [sys.executable, "-m", "medcap.cli"]


def test_ls_lists_recipes_with_their_configs(capsys):
    cli.main(["ls"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert {"finetune_vision", "generate", "evaluate"} <= set(rows)
    assert "tiny/finetune_vision" in rows["finetune_vision"] and "demo/finetune_vision" in rows["finetune_vision"]
    assert "tiny/generate" in rows["generate"]


def test_cp_copies_and_refuses_to_overwrite(tmp_path, capsys):
    cli.main(["cp", "tiny/generate", str(tmp_path / "mine.yaml")])
    assert (tmp_path / "mine.yaml").read_text() == (ROOT / "configs/tiny/generate.yaml").read_text()
    cli.main(["cp", "tiny/generate", str(tmp_path)])  # into a folder: keeps the file name
    assert (tmp_path / "generate.yaml").is_file()
    with pytest.raises(SystemExit, match="exists; not overwriting"):
        cli.main(["cp", "tiny/generate", str(tmp_path / "mine.yaml")])


def test_names_and_paths_resolve():
    assert cli.find_recipe("generate") == ROOT / "recipes/generate.py"
    assert cli.find_config("tiny/generate") == ROOT / "configs/tiny/generate.yaml"
    assert cli.find_config(str(ROOT / "configs/tiny/generate.yaml")) == ROOT / "configs/tiny/generate.yaml"
    with pytest.raises(SystemExit, match="no recipe 'nope'; known recipes: .*finetune_vision"):
        cli.find_recipe("nope")
    with pytest.raises(SystemExit, match="no config 'tiny/nope'"):
        cli.find_config("tiny/nope")


def test_bad_override_is_rejected():
    proc = subprocess.run(MEDCAP + ["run", "generate", "--config", "tiny/generate", "oops"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "overrides must be key=value or ~key, got ['oops']" in proc.stderr
