"""Step time, throughput and peak memory of each training method on one model, each method in its own process.
The step time is the median of the steps after the first (a warm-up); the peak memory is that of the training
steps alone (the peak is reset after the model is built: CUDA's allocator peak, or on a CPU the process' resident
high-water mark, so loading the weights is not counted). With ``--rounds`` the method processes take turns that many
times and the rounds' medians are reported. Peer: the medcap method (LLM frozen, encoder + projector trained) on the
same model, batch and sequence length; ratios are printed against it: method / peer (>1 = the peer is faster or
uses less memory).

    python benchmarks/train_methods.py                                   # the demo model on the CPU
    python benchmarks/train_methods.py --model llama3_1_8b_biomedclip --device cuda --dtype bf16 \
        --methods medcap qlora --batch 4 --text 256
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = {
    "medcap": ({"encoder": "full", "projector": "full", "decoder": "frozen"}, None, {}),
    "medcap_optim_in_bwd": ({"encoder": "full", "projector": "full", "decoder": "frozen"}, None, {"in_bwd": True}),
    "llava_stage1": ({"encoder": "frozen", "projector": "full", "decoder": "frozen"}, None, {}),
    "lora": ({"encoder": "frozen", "projector": "full", "decoder": "lora"},
             {"decoder": {"rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "output_proj"]}}, {}),
    "qlora": ({"encoder": "frozen", "projector": "full", "decoder": "qlora"},
              {"decoder": {"rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "output_proj"]}}, {}),
    "full_llm": ({"encoder": "frozen", "projector": "full", "decoder": "full"}, None, {}),
}
BUILDERS = {"demo": {"image_grid": 4, "max_seq_len": 512}, "llama3_1_8b_biomedclip": {}, "tiny_demo": {}}


def measure(args) -> dict:
    import torch
    from torchtune import training

    from benchmarks.peak_memory import peak_mb, reset_peak
    from medcap.models import builders
    from medcap.optim import OptimizerInBackward
    from medcap.precision import keep_trained_parts_in
    from medcap.text import IGNORE_INDEX
    from medcap.training import caption_loss, pack_frozen_products

    trainable, lora, options = METHODS[args.one]
    device, dtype = torch.device(args.device), training.get_dtype(args.dtype)
    torch.manual_seed(0)
    with training.set_default_dtype(dtype), device:
        model = getattr(builders, args.model)(trainable=trainable, lora=lora, **BUILDERS[args.model])
    model.to(device).train()
    keep_trained_parts_in(model, torch.float32, dtype)  # as the finetune recipe does (master_dtype: fp32)
    if args.activation_checkpointing:
        from torchtune.modules import TransformerSelfAttentionLayer
        training.set_activation_checkpointing(model.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
    pack_frozen_products(model, device)  # as medcap.training.train does (a CPU: packed frozen fp32 weights)
    params = [p for p in model.parameters() if p.requires_grad]
    if options.get("in_bwd"):
        optimizer = OptimizerInBackward([{"params": params, "lr": 1e-5}], lambda g: torch.optim.AdamW(g))
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    size, n_img = model.vision.encoder.image_size, model.tokens_per_image
    g = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.full((args.batch, n_img), model.image_token_id),
                        torch.randint(2, 10_000, (args.batch, args.text), generator=g)], 1).to(device)
    labels = tokens.masked_fill(tokens == model.image_token_id, IGNORE_INDEX)
    images = torch.randn(args.batch, 3, size, size, generator=g).to(device, dtype)
    reset_peak(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        caption_loss(model, {"tokens": tokens, "encoder_input": {"image": {"images": images}}}, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"method": args.one, "step_s": statistics.median(times[1:]), "tokens": tokens.numel(),
            "peak_mb": peak_mb(device), "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo", choices=list(BUILDERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=40, help="caption tokens per sample after the image tokens")
    parser.add_argument("--steps", type=int, default=4, help="training steps per method, the first untimed")
    parser.add_argument("--rounds", type=int, default=1, help="times each method's process runs, methods alternating")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be at least 2 (the first is a warm-up) and --rounds at least 1")
    if args.one:
        print(json.dumps(measure(args)))
        return
    runs = {method: [] for method in args.methods}
    for _ in range(args.rounds):
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", method] + [a for a in sys.argv[1:] if a not in args.methods
                                                                  and a != "--methods"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{method}: failed\n{out.stderr[-1500:]}")
                continue
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = [{**r[0], "step_s": statistics.median(x["step_s"] for x in r),
             "peak_mb": statistics.median(x["peak_mb"] for x in r)} for r in runs.values() if r]
    if not rows:
        raise SystemExit("no method ran (see the errors above)")
    peer = next((r for r in rows if r["method"] == "medcap"), rows[0])
    print(f"model {args.model}, {args.device} {args.dtype}, batch {args.batch} x ({args.text} text + image tokens); "
          f"median of {args.steps - 1} timed steps after a warm-up, {args.rounds} round(s); peer: {peer['method']}; "
          f"peak: of the training steps; x = method / peer (>1 = the peer faster / smaller)")
    print(f"{'method':22} {'trainable':>12} {'step s':>8} {'tok/s':>9} {'peak MB':>9} {'time x':>7} {'mem x':>6}")
    for r in rows:
        print(f"{r['method']:22} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['tokens'] / r['step_s']:>9.0f} "
              f"{r['peak_mb']:>9.0f} {r['step_s'] / peer['step_s']:>7.2f} {r['peak_mb'] / peer['peak_mb']:>6.2f}")


if __name__ == "__main__":
    main()
