"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo) and as a single process: trains a tiny
R2GenGPT-shaped model (Swin encoder in full, mapper, decoder LoRA) on the same global batches and saves what each
rank ends up holding."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from medcap import distributed
from medcap.models import builders
from medcap.text import IGNORE_INDEX
from medcap.training import TrainSettings, train

GLOBAL_BATCH, STEPS = 4, 4


def global_batches(model):
    g = torch.Generator().manual_seed(0)
    size = model.vision.encoder.image_size
    while True:
        tokens = torch.cat([torch.full((GLOBAL_BATCH, model.tokens_per_image), model.image_token_id),
                            torch.randint(2, 500, (GLOBAL_BATCH, 6), generator=g)], dim=1)
        labels = tokens.masked_fill(tokens == model.image_token_id, IGNORE_INDEX)
        yield {"tokens": tokens, "labels": labels, "images": torch.randn(GLOBAL_BATCH, 3, size, size, generator=g)}


def main(out: Path) -> None:
    device = distributed.init_from_env("cpu") or torch.device("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(0)
    model = builders.tiny_llama2_swin(trainable={"encoder": "full", "projector": "full", "decoder": "lora"})
    for module in model.modules():  # timm's Swin drops residual paths at random: draws differ with the batch shape
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if world > 1:
        distributed.shard(model, device)
    share = GLOBAL_BATCH // world
    local = ({k: v[rank * share:(rank + 1) * share] for k, v in b.items()} for b in global_batches(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    summary = train(model, optimizer, scheduler, local, TrainSettings(max_steps=STEPS, clip_grad_norm=1.0),
                    output_dir=out / f"run_{world}", device=device, dtype=torch.float32)
    final = {k: distributed.full_tensor(v).detach().clone() for k, v in model.state_dict().items()}
    save_file(final, out / f"world{world}_rank{rank}.safetensors")
    save_file(initial, out / f"world{world}_initial.safetensors")
    (out / f"world{world}_rank{rank}.json").write_text(json.dumps([h["loss"] for h in summary["history"]]))
    distributed.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
