"""EfficientNet-Lite0 trained under bf16 autocast on a CPU, as the demo trains it: medcap's encoder (its depthwise
layers backpropagated through oneDNN's fp32 kernel, medcap/models/depthwise.py) against timm's own model holding
the same weights (oneDNN's bf16 depthwise backward), both channels-last, train mode, alternating in one process.
Prints the forward + backward seconds of each (median), their ratio, and whether the image gradients agree.

    python benchmarks/depthwise_backward.py [--batch 4] [--reps 10]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medcap.models.encoders import efficientnet_lite0  # noqa: E402


def step(model, images):
    images = images.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features(images)
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return images.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours = efficientnet_lite0().model.train()
    timm_model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    timm_model.load_state_dict(ours.state_dict())
    timm_model = timm_model.to(memory_format=torch.channels_last).train()
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    engines = {"medcap": ours, "timm (bf16 depthwise backward)": timm_model}
    grads = {name: step(model, images) for name, model in engines.items()}  # warm-up
    times = {name: [] for name in engines}
    for _ in range(args.reps):
        for name, model in engines.items():
            start = time.perf_counter()
            step(model, images)
            times[name].append(time.perf_counter() - start)
    same = torch.equal(*grads.values())
    print(f"EfficientNet-Lite0, batch {args.batch} x 224 px, bf16 autocast, train mode, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, median of {args.reps}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"  {name}: {seconds * 1e3:.1f} ms forward + backward")
    ratio = medians["timm (bf16 depthwise backward)"] / medians["medcap"]
    print(f"  medcap vs timm: {ratio:.2f}x (> 1 = medcap faster); image gradients {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
