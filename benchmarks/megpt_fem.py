"""Parameter and FLOP overhead of MeGPT's FEM per image at R2GenGPT's shapes (Swin-B: 7 x 7 = 49 tokens of 1024),
next to the Swin-B encoder's own and the mapper's (Linear 1024 -> 4096 + LayerNorm). Random weights; FLOPs are
counted by torch's FlopCounterMode on one 224 px image (2 FLOPs per multiply-accumulate), FEM in eval mode with
its DO-Conv kernels folded (what inference runs), and checked against the closed form ``fem_macs``. CPU times are
the median of ``--repeats`` forward passes of a batch of 1.

    python benchmarks/megpt_fem.py [--reduction 4] [--json out.json]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medcap.models.encoders import swin_base  # noqa: E402
from medcap.models.fem import FeatureEnhancement, fem_macs, inference_parameters  # noqa: E402
from medcap.models.projectors import build_projector  # noqa: E402


def flops(module, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def cpu_ms(module, x, repeats: int) -> float:
    times = []
    with torch.no_grad():
        module(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduction", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    swin = swin_base().eval()
    fem = FeatureEnhancement(1024, reduction=args.reduction).eval()
    mapper = build_projector("linear_ln", 1024, 4096).eval()
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = swin(image)
    assert tokens.shape == (1, 49, 1024), tokens.shape
    with torch.no_grad():
        fem(tokens)  # the first eval pass folds each DO-Conv kernel once; later passes reuse it
    fem_flops = flops(fem, tokens)
    assert fem_flops == 2 * fem_macs(fem, 49), (fem_flops, fem_macs(fem, 49))
    rows = {
        "Swin-B encoder": {"params": sum(p.numel() for p in swin.parameters()), "flops": flops(swin, image),
                           "cpu_ms": cpu_ms(swin, image, args.repeats)},
        "FEM (inference, folded)": {"params": inference_parameters(fem), "flops": fem_flops,
                                    "cpu_ms": cpu_ms(fem, tokens, args.repeats)},
        "FEM (training, W + D)": {"params": sum(p.numel() for p in fem.parameters()), "flops": None, "cpu_ms": None},
        "mapper (Linear + LN)": {"params": sum(p.numel() for p in mapper.parameters()), "flops": flops(mapper, tokens),
                                 "cpu_ms": cpu_ms(mapper, tokens, args.repeats)},
    }
    swin_row = rows["Swin-B encoder"]
    print(f"per image, 224 px, 49 tokens x 1024; FEM branches 1x1, 3x3, 3x3 dilated 2, width 1024/{args.reduction}")
    print(f"{'':26} {'params':>12} {'% of Swin':>9} {'GFLOPs':>8} {'% of Swin':>9} {'CPU ms':>8}")
    for name, r in rows.items():
        gflops = f"{r['flops'] / 1e9:8.3f}" if r["flops"] is not None else f"{'-':>8}"
        share = f"{100 * r['flops'] / swin_row['flops']:8.1f}%" if r["flops"] is not None else f"{'-':>9}"
        ms = f"{r['cpu_ms']:8.1f}" if r["cpu_ms"] is not None else f"{'-':>8}"
        print(f"{name:26} {r['params']:12,d} {100 * r['params'] / swin_row['params']:8.1f}% {gflops} {share} {ms}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
