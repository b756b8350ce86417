"""The demo's training step (configs/demo/finetune_vision.yaml: frozen SmolLM2-135M, EfficientNet-Lite0 and the
mlp2 projector trained, batch 4 of datasets/demo/train.jsonl, AdamW) with the loss as it is now (the output
projection applied chunk-wise by the loss, ``medcap.fused_loss``) and as it was (the model projects the labelled
positions, then ``F.cross_entropy``), alternating in one process: median seconds per step of each and the ratio.

    PYTHONPATH=. python benchmarks/demo_step.py [--reps 3]     # after python -m medcap.data.demo_builder
"""

import argparse
import statistics
import time

import torch

from medcap.data.dataset import CaptionDataset, collate_captions, image_transform
from medcap.models.builders import demo
from medcap.text import smollm2_tokenizer
from medcap.training import caption_loss, model_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--manifest", default="datasets/demo/train.jsonl")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU seconds (with --threads 1, on a machine shared with other work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    model = demo(projector="mlp2", max_seq_len=256, image_grid=4,
                 trainable={"encoder": "full", "projector": "full", "decoder": "frozen"}).train()
    tokenizer = smollm2_tokenizer()
    dataset = CaptionDataset(manifest=args.manifest, tokenizer=tokenizer, tokens_per_image=model.tokens_per_image,
                             transform=image_transform(model.vision.encoder), prompt="Write the report for this image.",
                             max_seq_len=128)
    batches = [collate_captions([dataset[i] for i in range(start, start + 4)], pad_id=tokenizer.pad_id)
               for start in range(0, 4 * (args.reps + 1), 4)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    chunked = model.output_weight

    def step(batch, fused: bool) -> float:
        model.output_weight = chunked if fused else (lambda: None)  # None: the model projects, F.cross_entropy
        start = clock()
        loss = caption_loss(model, model_inputs(batch, torch.device("cpu"), torch.float32), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return clock() - start

    times = {True: [], False: []}
    for i, batch in enumerate(batches):
        for fused in (True, False):
            seconds = step(batch, fused)
            if i:  # the first of each is a warm-up
                times[fused].append(seconds)
    now, before = statistics.median(times[True]), statistics.median(times[False])
    print(f"demo step, batch 4 x {batches[0]['tokens'].shape[1]} tokens (padded), {args.threads} threads, median of "
          f"{args.reps} ({args.clock} seconds): chunked loss {now:.3f} s, projected logits + cross_entropy {before:.3f} s, "
          f"{before / now:.2f}x")


if __name__ == "__main__":
    main()
