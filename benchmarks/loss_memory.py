"""Peak memory of one training step's loss, forward + backward, on a Llama-3-vocabulary model (128,256 ids):
the output projection and cross-entropy on every position (torchtune's decoder: [B, L, V] logits, an fp32 copy,
then the loss's own fp32 copy) against medcap's ``caption_loss`` (the projection only at labelled positions).
Each variant runs in its own process; peak resident memory above the process' state after building the model.

    python benchmarks/loss_memory.py                       # CPU, bf16, batch 2 x 512 tokens, half of them labelled
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.tiny_vlm's patch encoder


def measure(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torchtune import training

    from medcap.models import decoders
    from medcap.text import IGNORE_INDEX
    from medcap.training import caption_loss
    from tests.tiny_vlm import PatchEncoder
    from medcap.models.projectors import build_projector
    from medcap.models.vlm import VisionLanguageModel

    dtype = training.get_dtype(args.dtype, device=torch.device("cpu"))
    torch.manual_seed(0)
    with training.set_default_dtype(dtype):
        decoder = decoders.tiny_llama3(embed_dim=args.dim, max_seq_len=args.length + 16)
        model = VisionLanguageModel(decoder, PatchEncoder(), build_projector("mlp2", 16, args.dim), 128256,
                                    {"encoder": "full", "projector": "full", "decoder": "frozen"})
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 128000, (args.batch, args.length), generator=g)
    tokens[:, :4] = 128256  # one image of 4 vision tokens per sample
    labels = tokens.masked_fill(torch.arange(args.length) < args.length - args.labelled, IGNORE_INDEX)
    inputs = {"tokens": tokens, "encoder_input": {"image": {"images": torch.randn(args.batch, 3, 32, 32).to(dtype)}}}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.one == "all_positions":
        logits = model(**inputs).float()  # what TransformerDecoder.forward returns: [B, L, V] in fp32
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    else:
        loss = caption_loss(model, inputs, labels)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.one, "loss": loss.item(), "peak_mb": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--labelled", type=int, default=256, help="labelled tokens at the end of each sample")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    rows = []
    for variant in ("all_positions", "caption_loss"):
        out = subprocess.run([sys.executable, __file__, "--one", variant] + sys.argv[1:], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.dtype}, batch {args.batch} x {args.length} tokens ({args.labelled} labelled), vocabulary 128256")
    for r in rows:
        print(f"{r['variant']:14} loss {r['loss']:.6f}  peak +{r['peak_mb']:.0f} MB  "
              f"({r['peak_mb'] / rows[0]['peak_mb']:.2f}x all_positions)")


if __name__ == "__main__":
    main()
