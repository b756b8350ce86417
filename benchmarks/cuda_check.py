"""CUDA check of the spine on a GPU machine: the finetune and generate recipes run on ``device=cuda`` in bf16
and fp32 (tiny Llama-3 + tiny ViT, the real Llama 3 tokenizer), generation with the KV cache gives the same
non-empty captions as re-running the full sequence, and the demo model (SmolLM2-135M + EfficientNet-Lite0, 16 image
tokens, built as configs/demo/finetune_vision.yaml builds it: the frozen LLM in bf16, the trained encoder and
projector kept in fp32 under bf16 autocast) trains at a measured step time and peak memory.

    python benchmarks/cuda_check.py --data DIR --tokenizer tokenizer.model --out OUT

Each result is written to OUT/cuda_check.json as soon as it is measured, so a late failure keeps the earlier ones;
the exit status is 1 if a check failed. ``--device cpu`` runs the same code on a CPU (with a small ``--max-steps``,
``--demo-batch`` and ``--demo-steps``).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchtune import training

from medcap import cli
from medcap.metrics import read_predictions
from medcap.models import builders
from medcap.precision import keep_trained_parts_in
from medcap.text.samples import IGNORE_INDEX
from medcap.training import caption_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.peak_memory import peak_mb, reset_peak  # noqa: E402

TRAINABLE = {"encoder": "full", "projector": "full", "decoder": "frozen"}


def recipes(data: Path, tokenizer: str, out: Path, device: str, max_steps: int, record) -> None:
    common = [f"device={device}", "model._component_=medcap.models.builders.tiny_llama3_biomedclip",
              "tokenizer._component_=medcap.text.llama3_tokenizer", f"tokenizer.path={tokenizer}"]
    for dtype in ("bf16", "fp32"):
        run = out / f"train_{dtype}"
        cli.main(["run", "finetune_vision", "--config", "tiny/finetune_vision", *common, f"dtype={dtype}",
                  f"dataset.manifest={data / 'train.jsonl'}", f"val_dataset.manifest={data / 'val.jsonl'}",
                  f"max_steps={max_steps}", f"save_every={max_steps}", "optimizer.lr=3e-3", f"output_dir={run}"])
        history = [h for h in json.loads((run / "train_summary.json").read_text())["history"] if "loss" in h]
        first, last = history[:5], history[-5:]
        record(**{f"train_{dtype}": {
            "loss_first5": statistics.mean(h["loss"] for h in first),
            "loss_last5": statistics.mean(h["loss"] for h in last),
            "step_time_s": statistics.median(h["step_time_s"] for h in last)}})
        predictions = {}
        for cache in ("true", "false"):
            gen = out / f"generate_{dtype}_cache_{cache}"
            start = time.perf_counter()
            cli.main(["run", "generate", "--config", "tiny/generate", *common, f"dtype={dtype}",
                      f"checkpoint={run / 'checkpoints'}", f"dataset.manifest={data / 'test.jsonl'}",
                      f"use_cache={cache}", "max_new_tokens=24", f"output_dir={gen}"])
            record(**{f"generate_{dtype}_cache_{cache}_s": time.perf_counter() - start})
            predictions[cache] = read_predictions(gen / "predictions.csv")
        # equal empty captions would compare no tokens at all: the check needs every caption to have some
        cached, recomputed = predictions["true"], predictions["false"]
        empty = sum(not caption.strip() for caption in cached.values())
        differ = sum(cached[k] != recomputed.get(k) for k in cached)
        record(**{f"kv_cache_equals_recompute_{dtype}": bool(cached) and empty == 0 and cached == recomputed,
                  f"captions_{dtype}": len(cached), f"empty_captions_{dtype}": empty,
                  f"captions_differing_{dtype}": differ})


def demo_architecture_step(builder: str = "demo", device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                           batch: int = 32, seq: int = 38, steps: int = 20, warmup: int = 5) -> dict:
    """Median seconds of a training step (forward, loss, backward, clipping, AdamW) after ``warmup`` steps, on
    ``builder``'s model built as the demo's training builds it, and the peak memory of the steps."""
    if steps <= warmup:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup})")
    device = torch.device(device)
    kwargs = {"max_seq_len": 256, "image_grid": 4} if builder == "demo" else {}  # as configs/demo/finetune_vision
    torch.manual_seed(0)
    with training.set_default_dtype(dtype):
        model = getattr(builders, builder)(projector="mlp2", trainable=TRAINABLE, **kwargs)
    keep_trained_parts_in(model, torch.float32, dtype)  # the recipe's master_dtype: null (fp32)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    n_img, size = model.tokens_per_image, model.vision.encoder.image_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49000, (batch, seq), generator=g)
    tokens[:, 2:2 + n_img] = model.image_token_id
    labels = tokens.masked_fill(tokens == model.image_token_id, IGNORE_INDEX).to(device)
    inputs = {"tokens": tokens.to(device),
              "encoder_input": {"image": {"images": torch.randn(batch, 3, size, size, generator=g).to(device, dtype)}}}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    reset_peak(device)
    times, losses = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        loss = caption_loss(model, inputs, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step = statistics.median(times[warmup:])
    return {"builder": builder, "image_tokens": n_img, "batch": batch, "seq": seq, "timed_steps": steps - warmup,
            "median_step_s": step, "tokens_per_s": batch * seq / step, "peak_memory_mb": peak_mb(device),
            "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-steps", type=int, default=60, help="training steps of each recipe run")
    parser.add_argument("--demo-batch", type=int, default=32)
    parser.add_argument("--demo-steps", type=int, default=20, help="demo training steps, the first 5 untimed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
               "torch": torch.__version__}

    def record(**values):
        results.update(values)
        (args.out / "cuda_check.json").write_text(json.dumps(results, indent=2))

    record()
    recipes(args.data, args.tokenizer, args.out, args.device, args.max_steps, record)
    record(demo_architecture_bf16=demo_architecture_step(device=args.device, batch=args.demo_batch,
                                                         steps=args.demo_steps, warmup=min(5, args.demo_steps - 1)))
    print(json.dumps(results, indent=2))
    failed = [k for k, v in results.items() if k.startswith("kv_cache_equals_recompute") and not v]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see {args.out / 'cuda_check.json'})")


if __name__ == "__main__":
    main()
