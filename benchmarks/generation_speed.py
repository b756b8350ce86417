"""Generation speed on the demo model (SmolLM2-135M + EfficientNet-Lite0, 16 image tokens, the real weights and,
if present, the trained demo checkpoint), greedy, the same test images and max_new_tokens in every mode:

    (a) batched, KV cache            all prompts in one batch, the image encoded once, one token per step
    (b) one prompt at a time, cache  batch size 1
    (c) full recompute (the peer)    the whole sequence and the vision tower re-run every step, batched: how the
                                     medcap seed generated (KV cache disabled)
    (d) beam search, 3 beams         batched, KV cache (the beams share each prompt's prefill)

Tokens/s counts the tokens each caption keeps (up to its stop token); (a), (b) and (c) must produce the same
tokens, and the script says whether they did. Every mode runs once as a warm-up (its output is the one compared),
then the modes take turns for ``--reps`` rounds and each mode's median time is reported.

    .venv/bin/python benchmarks/generation_speed.py [--n 16] [--max-new-tokens 24] [--threads 2] [--reps 3]

``--random-weights`` times the same architecture with random weights and synthetic prompts of the demo's shape
(16 image placeholders + 16 text tokens), no stop token, so every caption runs max_new_tokens; it needs neither the
packaged weights nor the demo data (for machines without them). ``--device cuda`` runs on a GPU.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from medcap.checkpoint import load_checkpoint
from medcap.data.dataset import CaptionDataset, collate_captions, image_transform
from medcap.generation import generate
from medcap.models import decoders, encoders
from medcap.models.builders import SMOLLM2_IMAGE_ID, demo, vision_language_model
from medcap.text import smollm2_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def batch_of(model, tokenizer, manifest: Path, n: int) -> dict:
    dataset = CaptionDataset(manifest=str(manifest), tokenizer=tokenizer, tokens_per_image=model.tokens_per_image,
                             transform=image_transform(model.vision.encoder), prompt="Write the report for this image.",
                             max_seq_len=128, with_captions=False)
    return collate_captions([dataset[i] for i in range(min(n, len(dataset)))], pad_id=tokenizer.pad_id,
                            padding_side="left")


def random_demo_inputs(n: int, seed: int = 0):
    """The demo architecture with random weights, and n prompts / images of the demo's shape."""
    torch.manual_seed(seed)
    model = vision_language_model(decoders.smollm2_135m(max_seq_len=256), encoders.efficientnet_lite0(pretrained=False,
                                  grid=4), "mlp2", SMOLLM2_IMAGE_ID)
    g = torch.Generator().manual_seed(seed)
    prompts = [[SMOLLM2_IMAGE_ID] * model.tokens_per_image + torch.randint(100, 49000, (16,), generator=g).tolist()
               for _ in range(n)]
    return model, prompts, torch.randn(n, 3, 224, 224, generator=g)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="test images")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--manifest", default=str(ROOT / "datasets/demo/test.jsonl"))
    parser.add_argument("--checkpoint", default=str(ROOT / "outputs/demo/train/checkpoints"),
                        help="trained demo parts; skipped if the folder is missing")
    parser.add_argument("--random-weights", action="store_true", help="demo architecture, random weights (above)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds, the modes alternating, after a warm-up")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    tokenizer = None
    if args.random_weights:
        model, prompts, images = random_demo_inputs(args.n)
        kw = dict(max_new_tokens=args.max_new_tokens, stop_ids=[-1], pad_id=0)  # -1: no token stops a caption
    else:
        model = demo(projector="mlp2", max_seq_len=256, image_grid=4)
        if Path(args.checkpoint).exists():
            print(f"loaded {load_checkpoint(model, args.checkpoint)}")
        else:
            print(f"no checkpoint at {args.checkpoint}: untrained vision side")
        tokenizer = smollm2_tokenizer()
        batch = batch_of(model, tokenizer, Path(args.manifest), args.n)
        prompts = [row[mask].tolist() for row, mask in zip(batch["tokens"], batch["padding_mask"])]
        images = batch["images"]
        kw = dict(max_new_tokens=args.max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    model = model.to(device).eval()
    images = images.to(device)

    runs = {
        "(a) batched, KV cache": lambda: generate(model, prompts, images, **kw),
        "(b) one at a time, KV cache": lambda: [generate(model, [p], images[i:i + 1], **kw)[0]
                                                for i, p in enumerate(prompts)],
        "(c) full recompute (peer)": lambda: generate(model, prompts, images, use_cache=False, **kw),
        "(d) beam 3, batched, KV cache": lambda: generate(model, prompts, images, num_beams=3, **kw),
    }
    outputs = {name: fn() for name, fn in runs.items()}  # a warm-up of every mode; these outputs are compared
    times = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, fn in runs.items():
            times[name].append(timed(fn, device)[1])
    results = {name: (outputs[name], statistics.median(times[name])) for name in runs}
    peer_outputs, peer_seconds = results["(c) full recompute (peer)"]
    peer_rate = sum(map(len, peer_outputs)) / peer_seconds

    weights = "random weights" if args.random_weights else "real weights"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\n{len(prompts)} images, {model.tokens_per_image} image tokens, prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, max_new_tokens {args.max_new_tokens}, {weights}, {where}; "
          f"median of {args.reps} alternating rounds after a warm-up of each mode\n")
    print("| mode | median s | tokens | tokens/s | vs (c), the peer (>1 = faster) |\n|---|---|---|---|---|")
    for name, (outputs, seconds) in results.items():
        tokens = sum(map(len, outputs))
        rate = tokens / seconds
        print(f"| {name} | {seconds:.1f} | {tokens} | {rate:.1f} | {rate / peer_rate:.2f}x |")
    same = results["(a) batched, KV cache"][0] == results["(b) one at a time, KV cache"][0] == peer_outputs
    print(f"\n(a), (b), (c) produced identical tokens: {'yes' if same else 'NO'}")
    if tokenizer is not None:
        for name in ("(a) batched, KV cache", "(d) beam 3, batched, KV cache"):
            print(f"first caption {name[:3]}: {tokenizer.decode(results[name][0][0]).strip()!r}")


if __name__ == "__main__":
    main()
