"""Overrides are type-checked as torchtune will read them, for both spellings of --config; recipes that work in
one process refuse several."""

import sys

import pytest
from omegaconf import OmegaConf

from medcap.command import check_override_types, run_command
from tests.test_runs import ROOT

CONFIG = ROOT / "configs" / "tiny" / "finetune.yaml"


@pytest.mark.parametrize("flag", [["--config", str(CONFIG)], [f"--config={CONFIG}"]], ids=["space", "equals"])
def test_overrides_torchtune_reads_as_numbers_or_null_pass(flag):
    good = ["optimizer.weight_decay=1e-2", "optimizer.lr=1e-4", "clip_grad_norm=1e3", "save_every=None",
            "clip_grad_norm=2", "batch_size=8", "max_steps=null"]
    check_override_types([*flag, *good])
    # what torchtune's own merge makes of them: the same types
    merged = OmegaConf.from_dotlist([g.replace("=None", "=!!null") for g in good])
    assert merged.optimizer.weight_decay == 0.01 and merged.clip_grad_norm == 2 and merged.save_every is None
    with pytest.raises(SystemExit, match=r"optimizer.lr=fast: optimizer.lr must be a number \(the config "
                                         r"finetune.yaml has 0.003\)"):
        check_override_types([*flag, "optimizer.lr=fast"])
    with pytest.raises(SystemExit, match="batch_size=1e3: batch_size must be an integer"):
        check_override_types([*flag, "batch_size=1e3"])


def test_a_value_holding_an_equals_sign_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match=r"output_dir=/tmp/lr=1e-3: an override's value may not contain '=' "
                                         r"\(torchtune splits overrides at every '='\)"):
        check_override_types(["--config", str(CONFIG), "output_dir=/tmp/lr=1e-3"])


def test_a_recipe_that_works_in_one_process_refuses_several(monkeypatch, capsys):
    from medcap import cli

    ran = []
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each process
    monkeypatch.delenv("MEDCAP_DEBUG", raising=False)  # the one-line error, as users see it
    monkeypatch.setattr(sys, "argv", ["recipes/fuse.py"])
    assert run_command(lambda: ran.append(1)) == 1 and not ran
    assert "fuse runs in one process (2 processes would each do the whole job" in capsys.readouterr().err
    assert run_command(lambda: ran.append(1), distributed=True) == 0 and ran == [1]
    with pytest.raises(SystemExit) as stop:  # a real recipe, as torchrun would start it
        cli.run_recipe("evaluate", "tiny/evaluate", [])
    assert stop.value.code == 1 and "evaluate runs in one process" in capsys.readouterr().err
