"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo) and as a single process: trains a tiny
R2GenGPT-shaped model (Swin encoder in full, mapper, decoder LoRA) on the same global batches and saves what each
rank ends up holding. With ``bn``: a tiny model whose encoder has BatchNorm, trained in full in fp32 and in bf16
(fp32 trained parts under autocast), under torchrun by medcap's loop and in one process by a plain loop that runs
each rank's half of the batch on its own and averages the BatchNorm statistics the halves give."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from medcap import distributed
from medcap.models import builders
from medcap.precision import keep_trained_parts_in
from medcap.text import IGNORE_INDEX
from medcap.training import TrainSettings, caption_loss, model_inputs, train
from tests.tiny_vlm import sample_batch, tiny_vlm

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


def bn_batches():
    for i in range(STEPS):
        tokens, images = sample_batch(batch_size=GLOBAL_BATCH, text_len=6, seed=i)
        labels = tokens.clone()
        labels[:, :5] = IGNORE_INDEX
        labels[1:, -(i + 1):] = IGNORE_INDEX  # unequal label counts per sample and per rank's half
        yield {"tokens": tokens, "labels": labels, "images": images}


def bn_model(dtype: torch.dtype):
    model = tiny_vlm(trainable={"encoder": "full", "projector": "full", "decoder": "frozen"}).to(dtype)
    keep_trained_parts_in(model, torch.float32, dtype)
    return model


def halves_loop(model, dtype: torch.dtype, world: int = 2) -> list[float]:
    """One process: each rank's half of every global batch forward and backward on its own, from the same BatchNorm
    statistics; the statistics are then set to the halves' mean."""
    stats = [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for batch in bn_batches():
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        start, ends, loss = [s.clone() for s in stats], [], 0.0
        for half in range(world):
            for s, value in zip(stats, start):
                s.copy_(value)
            share = {k: v.chunk(world)[half] for k, v in batch.items()}
            token_loss = caption_loss(model, model_inputs(share, torch.device("cpu"), dtype), share["labels"],
                                      reduction="sum") / tokens
            token_loss.backward()
            loss += token_loss.item()
            ends.append([s.clone() for s in stats])
        with torch.no_grad():
            for s, *values in zip(stats, *ends):
                s.copy_(torch.stack(values).float().mean(0))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss)
    return losses


def main_bn(out: Path) -> None:
    device = distributed.init_from_env("cpu") or torch.device("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = bn_model(dtype)
        if world == 1:
            losses = halves_loop(model, dtype)
        else:
            distributed.shard(model, device)
            local = ({k: v.chunk(world)[rank] for k, v in b.items()} for b in bn_batches())
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            summary = train(model, optimizer, scheduler, local, TrainSettings(max_steps=STEPS, clip_grad_norm=None),
                            output_dir=out / f"bn_{name}_{world}", device=device, dtype=dtype)
            losses = [h["loss"] for h in summary["history"]]
        final = {k: distributed.full_tensor(v).detach().clone() for k, v in model.state_dict().items()}
        save_file(final, out / f"bn_{name}_world{world}_rank{rank}.safetensors")
        (out / f"bn_{name}_world{world}_rank{rank}.json").write_text(json.dumps(losses))
    distributed.destroy()


if __name__ == "__main__":
    (main_bn if sys.argv[2:] == ["bn"] else main)(Path(sys.argv[1]))
