"""The full `make demo` run (about 10 minutes on 2 CPU cores): slow, not in CI. `pytest -m slow`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_trained_model_beats_untrained_and_image_blind(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "medcap.demo", "--out", str(out)], check=True, cwd=ROOT)
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"trained", "untrained", "image_blind"}
    for metric in ("CIDEr", "BLEU-4", "finding_acc"):
        assert report["trained"][metric] > report["untrained"][metric], metric
        assert report["trained"][metric] > report["image_blind"][metric], metric
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_demo_steps_and_seed_reach_the_training_config(tmp_path):
    from omegaconf import OmegaConf

    from medcap.cli import find_config
    from medcap.demo import training_overrides

    defaults = OmegaConf.load(find_config("demo/finetune_vision"))

    def resolved(steps, seed):  # the config as the recipe sees it (overrides merged as torchtune merges them)
        return OmegaConf.merge(defaults, OmegaConf.from_dotlist(training_overrides(tmp_path, steps, seed)))

    cfg = resolved(7, 3)
    assert (cfg.max_steps, cfg.seed, cfg.overwrite, cfg.output_dir) == (7, 3, True, str(tmp_path / "train"))
    cfg = resolved(None, None)
    assert (cfg.max_steps, cfg.seed) == (480, 0) == (defaults.max_steps, defaults.seed)
    assert defaults.dtype == "bf16"
    cfg = OmegaConf.merge(defaults, OmegaConf.from_dotlist(training_overrides(tmp_path, None, None, "fp32")))
    assert cfg.dtype == "fp32"
    assert not any(o.startswith("compile=") for o in training_overrides(tmp_path, None, None))  # the config's
    for flag in (True, False):
        overrides = training_overrides(tmp_path, None, None, None, flag)
        assert OmegaConf.merge(defaults, OmegaConf.from_dotlist(overrides)).compile is flag


def test_demo_picks_bf16_only_where_the_cpu_multiplies_bf16_in_hardware():
    from medcap.demo import native_bf16

    zen4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire_rapids = "flags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
    zen3 = "flags\t\t: fpu sse2 avx2 fma\n"
    skylake = "flags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
    assert native_bf16(zen4) and native_bf16(sapphire_rapids)
    assert not native_bf16(zen3) and not native_bf16(skylake)
