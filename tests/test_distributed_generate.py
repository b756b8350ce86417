"""`medcap run generate --nproc_per_node 2` on CPU (gloo): two processes, one merged predictions.csv that equals
the single-process file byte for byte, rows in the data set's order."""

import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medcap.data.demo_builder import build_demo

ROOT = Path(__file__).resolve().parent.parent
MEDCAP = Path(sys.executable).parent / "medcap"


@pytest.fixture(scope="module")
def test_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, seed=0, n_train=8, n_val=8, n_test=10)
    return out / "test.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def medcap_generate(out: Path, manifest: Path, *args: str) -> str:
    command = [str(MEDCAP), "run", "generate", *args, "--config", "tiny/generate", "checkpoint=null",
               f"dataset.manifest={manifest}", f"output_dir={out}", "batch_size=4", "max_new_tokens=6"]
    # torchrun reads --master_port from PET_MASTER_PORT: a free port, so that parallel runs do not collide
    env = {**os.environ, "PET_MASTER_PORT": str(free_port())}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (out / "predictions.csv").read_text(encoding="utf-8")


@pytest.mark.slow
def test_two_processes_write_the_single_process_csv(test_manifest, tmp_path):
    # sampling (seeded per batch) with a rule: the random tiny model then writes varied, non-empty captions
    decoding = ["temperature=50.0", "no_repeat_ngram_size=1"]
    single = medcap_generate(tmp_path / "single", test_manifest, *decoding)
    # 10 samples in batches of 4: rank 0 generates batches 0 and 2, rank 1 batch 1
    double = medcap_generate(tmp_path / "double", test_manifest, "--nproc_per_node", "2", *decoding)
    assert double == single
    ids = [json.loads(line)["id"] for line in test_manifest.read_text().splitlines()]
    rows = list(csv.reader(io.StringIO(single)))
    assert rows[0] == ["ID", "caption"] and [r[0] for r in rows[1:]] == ids
    assert len({r[1] for r in rows[1:]}) == len(ids) and all(r[1] for r in rows[1:])
