"""CUDA check of the spine on a GPU machine: the finetune and generate recipes run on ``device=cuda`` in bf16
and fp32 (tiny Llama-3 + tiny ViT, the real Llama 3 tokenizer), generation with the KV cache gives the same
tokens as re-running the full sequence, and the demo model's architecture (SmolLM2-135M + EfficientNet-Lite0,
random weights: the timing does not depend on them) trains at a measured step time and memory in bf16.

    python benchmarks/cuda_check.py --data DIR --tokenizer tokenizer.model --out OUT
"""

import argparse
import json
import time
from pathlib import Path

import torch

from medcap import cli
from medcap.metrics import read_predictions
from medcap.models import decoders, encoders
from medcap.models.builders import SMOLLM2_IMAGE_ID, vision_language_model
from medcap.text.samples import IGNORE_INDEX
from medcap.training import caption_loss


def recipes(data: Path, tokenizer: str, out: Path) -> dict:
    common = ["device=cuda", "model._component_=medcap.models.builders.tiny_llama3_biomedclip",
              "tokenizer._component_=medcap.text.llama3_tokenizer", f"tokenizer.path={tokenizer}"]
    results = {}
    for dtype in ("bf16", "fp32"):
        run = out / f"train_{dtype}"
        cli.main(["run", "finetune_vision", "--config", "tiny/finetune_vision", *common, f"dtype={dtype}",
                  f"dataset.manifest={data / 'train.jsonl'}", f"val_dataset.manifest={data / 'val.jsonl'}",
                  "max_steps=60", "save_every=60", "optimizer.lr=3e-3", f"output_dir={run}"])
        history = json.loads((run / "train_summary.json").read_text())["history"]
        first, last = history[:5], history[-5:]
        results[f"train_{dtype}"] = {
            "loss_first5": sum(h["loss"] for h in first) / 5, "loss_last5": sum(h["loss"] for h in last) / 5,
            "step_time_s": sum(h["step_time_s"] for h in last) / 5}
        predictions = {}
        for cache in ("true", "false"):
            gen = out / f"generate_{dtype}_cache_{cache}"
            start = time.perf_counter()
            cli.main(["run", "generate", "--config", "tiny/generate", *common, f"dtype={dtype}",
                      f"checkpoint={run / 'checkpoints'}", f"dataset.manifest={data / 'test.jsonl'}",
                      f"use_cache={cache}", "max_new_tokens=24", f"output_dir={gen}"])
            results[f"generate_{dtype}_cache_{cache}_s"] = time.perf_counter() - start
            predictions[cache] = read_predictions(gen / "predictions.csv")
        results[f"kv_cache_equals_recompute_{dtype}"] = predictions["true"] == predictions["false"]
    return results


def demo_architecture_step(batch: int = 32, seq: int = 38, steps: int = 20) -> dict:
    decoder = decoders.smollm2_135m(max_seq_len=256)
    encoder = encoders.efficientnet_lite0(pretrained=False, grid=2)
    model = vision_language_model(decoder, encoder, "mlp2", SMOLLM2_IMAGE_ID,
                                  {"encoder": "full", "projector": "full", "decoder": "frozen"})
    model = model.to("cuda", torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(0, 49000, (batch, seq), device="cuda")
    tokens[:, 2:2 + model.tokens_per_image] = SMOLLM2_IMAGE_ID
    labels = tokens.masked_fill(tokens == SMOLLM2_IMAGE_ID, IGNORE_INDEX)
    images = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(tokens, encoder_input={"image": {"images": images}})
        loss = caption_loss(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = sorted(times[5:])[len(times[5:]) // 2]
    return {"batch": batch, "seq": seq, "median_step_s": step, "tokens_per_s": batch * seq / step,
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results.update(recipes(args.data, args.tokenizer, args.out))
    results["demo_architecture_bf16"] = demo_architecture_step()
    print(json.dumps(results, indent=2))
    (args.out / "cuda_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
