"""Peak memory of one training step's loss, forward + backward, on a Llama-3-vocabulary model (128,256 ids).
The peer is torchtune's own recipe loss: its TransformerDecoder's output projection in 8 chunks
(``set_num_output_chunks(8)``) and ``CEWithChunkedOutputLoss``, which upcasts one chunk at a time, as torchtune
0.6.1's finetuning configs use it, on every position (labels shifted as its recipes shift them). Also shown: the
same decoder unchunked ([B, L, V] logits in fp32, then the loss), and medcap's ``caption_loss`` (the projection only
at labelled positions). Each variant runs in its own process; its peak resident memory is measured above the
resident size just before the loss's forward (the high-water mark reset there, so the model's build is not in it).

    python benchmarks/loss_memory.py                       # CPU, bf16, batch 2 x 512 tokens, half of them labelled
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.tiny_vlm's patch encoder, benchmarks

PEER = "torchtune_chunked"
VARIANTS = {PEER: "torchtune, 8 output chunks (peer)", "torchtune_full_logits": "torchtune, [B, L, V] fp32 logits",
            "caption_loss": "medcap caption_loss"}


def measure(args) -> dict:
    import torch
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from benchmarks.peak_memory import peak_mb, reset_peak
    from medcap.models import decoders
    from medcap.models.projectors import build_projector
    from medcap.models.vlm import VisionLanguageModel
    from medcap.text import IGNORE_INDEX
    from medcap.training import caption_loss
    from tests.tiny_vlm import PatchEncoder

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
    encoder_input = {"image": {"images": torch.randn(args.batch, 3, 32, 32).to(dtype)}}
    # torchtune's recipes predict labels[:, i + 1] at position i by shifting the labels, not the logits
    shifted = torch.hstack((labels[:, 1:], torch.full((args.batch, 1), IGNORE_INDEX)))
    reset_peak("cpu")
    base = peak_mb("cpu")
    if args.one == "caption_loss":
        loss = caption_loss(model, {"tokens": tokens, "encoder_input": encoder_input}, labels)
    else:
        # the fused embeddings, then torchtune's decoder as TransformerDecoder.forward runs it (layers, unembed)
        chunks = 8 if args.one == PEER else 0
        decoder.set_num_output_chunks(chunks)
        h = model.embed(tokens, encoder_input)
        for layer in decoder.layers:
            h = layer(h)
        logits = decoder.unembed(h)
        if chunks:
            loss = CEWithChunkedOutputLoss(num_output_chunks=chunks, ignore_index=IGNORE_INDEX)(logits, shifted)
        else:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return {"variant": args.one, "loss": loss.item(), "peak_mb": peak_mb("cpu") - base}


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
    rows = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--one", variant, *sys.argv[1:]], capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    peer = rows[PEER]
    print(f"{args.dtype}, batch {args.batch} x {args.length} tokens ({args.labelled} labelled), vocabulary 128256; "
          f"peer: torchtune's recipe loss (first row)")
    print(f"{'variant':36} {'loss':>10} {'peak above start':>17}  peer's peak / this (>1 = less memory than the peer)")
    for name, r in rows.items():
        print(f"{VARIANTS[name]:36} {r['loss']:>10.6f} {r['peak_mb']:>14.0f} MB  {peer['peak_mb'] / r['peak_mb']:.2f}x")
    worst = max(abs(r["loss"] - peer["loss"]) for r in rows.values())
    print(f"largest loss difference to the peer: {worst:.2e}")


if __name__ == "__main__":
    main()
