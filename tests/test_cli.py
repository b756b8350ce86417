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
    cli.main(["cp", "tiny/generate", str(tmp_path / "lr_0.5")])  # a dot in the name is kept
    assert (tmp_path / "lr_0.5.yaml").is_file() and not (tmp_path / "lr_0.yaml").exists()
    with pytest.raises(SystemExit, match=f"{tmp_path / 'new'} is not a folder"):
        cli.main(["cp", "tiny/generate", f"{tmp_path / 'new'}/"])
    with pytest.raises(SystemExit, match=f"{tmp_path / 'gone'} is not a folder; create it first"):
        cli.main(["cp", "tiny/generate", str(tmp_path / "gone" / "x.yaml")])
    assert not (tmp_path / "new.yaml").exists()


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


def test_unknown_override_keys_are_refused_with_the_nearest(tmp_path):
    with pytest.raises(SystemExit, match="coco.yaml has no key 'bootstrp'; did you mean bootstrap\\?"):
        cli.main(["run", "evaluate", "--config", "eval/coco", "predictions=p.csv", "references=r.csv", "bootstrp=5"])
    with pytest.raises(SystemExit, match="has no key 'bertscore.modle'; did you mean bertscore.model"):
        cli.main(["run", "evaluate", "--config", "eval/imageclef", "bertscore.modle=x"])
    with pytest.raises(SystemExit, match="has no key 'zzz'$"):
        cli.main(["run", "evaluate", "--config", "eval/coco", "zzz=1"])
    # a new argument inside a _component_ node is the component's to accept or refuse
    cli.check_override_keys(cli.find_config("tiny/generate"), ["tokenizer.path=x", "model.image_grid=2"])


def test_bring_your_data_as_the_readme_says(tmp_path, monkeypatch):
    """README, "Bring your data": `medcap cp <training config> mine.yaml --data data/imageclef`, then
    `medcap run finetune_vision --config mine.yaml data_dir=...` (tiny configs; train, then generate on test)."""
    import csv

    from tests.test_formats import write_imageclef

    root = write_imageclef(tmp_path / "rocov2")
    monkeypatch.chdir(tmp_path)
    cli.main(["cp", "tiny/finetune_vision", "mine.yaml", "--data", "data/imageclef"])
    cli.main(["run", "finetune_vision", "--config", "mine.yaml", f"data_dir={root}", "batch_size=1", "max_steps=2",
              "eval_every=2", "save_every=2", "output_dir=train"])
    cli.main(["cp", "tiny/generate", "gen.yaml", "--data", "data/imageclef"])
    cli.main(["run", "generate", "--config", "gen.yaml", f"data_dir={root}", "dataset.split=test",
              "checkpoint=train/checkpoints", "max_new_tokens=2", "output_dir=gen"])
    with open(tmp_path / "gen/predictions.csv", newline="", encoding="utf-8") as f:
        assert [row[0] for row in csv.reader(f)] == ["ID", "ROCOv2_2023_test_000001", "ROCOv2_2023_test_000002"]
    assert (tmp_path / "mine.yaml").read_text().startswith("# medcap run finetune_vision --config tiny/finetune_vision")
