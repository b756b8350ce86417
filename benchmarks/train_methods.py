"""Step time, throughput and peak memory of each training method on one model, each method in its own process
(peak memory is per process). Peer: the medcap method (LLM frozen, encoder + projector trained) on the same
model, batch and sequence length; ratios are printed against it.

    python benchmarks/train_methods.py                                   # the demo model on the CPU
    python benchmarks/train_methods.py --model llama3_1_8b_biomedclip --device cuda --dtype bf16 \
        --methods medcap qlora --batch 4 --text 256
"""

import argparse
import json
import subprocess
import sys
import time

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
BUILDERS = {"demo": {"image_grid": 4, "max_seq_len": 512}, "llama3_1_8b_biomedclip": {}}


def measure(args) -> dict:
    import torch
    from torchtune import training

    from medcap.models import builders
    from medcap.optim import OptimizerInBackward
    from medcap.precision import keep_trained_parts_in
    from medcap.text import IGNORE_INDEX
    from medcap.training import caption_loss, peak_memory_mb

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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        caption_loss(model, {"tokens": tokens, "encoder_input": {"image": {"images": images}}}, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = sum(times[1:]) / (len(times) - 1)
    return {"method": args.one, "step_s": step, "tokens_per_s": tokens.numel() / step,
            "peak_mb": peak_memory_mb(device), "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo", choices=list(BUILDERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=40, help="caption tokens per sample after the image tokens")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--one", method] + [a for a in sys.argv[1:] if a not in args.methods
                                                              and a != "--methods"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{method}: failed\n{out.stderr[-1500:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    peer = next((r for r in rows if r["method"] == "medcap"), rows[0])
    print(f"model {args.model}, {args.device} {args.dtype}, batch {args.batch} x ({args.text} text + image tokens); "
          f"peer: {peer['method']}")
    print(f"{'method':22} {'trainable':>12} {'step s':>8} {'tok/s':>9} {'peak MB':>9} {'time x':>7} {'mem x':>6}")
    for r in rows:
        print(f"{r['method']:22} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['peak_mb']:>9.0f} {r['step_s'] / peer['step_s']:>7.2f} {r['peak_mb'] / peer['peak_mb']:>6.2f}")


if __name__ == "__main__":
    main()
