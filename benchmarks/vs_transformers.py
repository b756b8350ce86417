"""medcap against Hugging Face transformers on the same model, the same inputs, in one process.

The model is by default the demo's: SmolLM2-135M-Instruct (the packaged weights) + EfficientNet-Lite0 + mlp2
projector, 16 image tokens, fp32. The transformers side is ``LlamaForCausalLM`` holding the same weights
(converted in memory as ``save_hf_llama`` converts them), with a copy of the same vision tower whose tokens are
scattered into ``inputs_embeds``; it decodes with ``generate(inputs_embeds=...)`` and trains with
``model(inputs_embeds=..., labels=...)``. Each case runs both engines in turn (medcap, transformers, medcap, ...)
after one warm-up each, and reports the medians: on a shared machine only the ratio (> 1: medcap faster) means
something.

Decoding: random prompts (image placeholders + 16 text tokens), no stop token, so every row runs max_new_tokens;
greedy and beam search must give identical tokens in fp32 (checked), sampling is compared on speed only (the
engines draw differently from the same seed). The "demo prompts" rows decode the demo's test split as ``make demo``
does (its images, its prompt, the tokenizer's stop tokens), so rows stop at their own lengths: medcap drops a
finished row (a decided prompt, in beam search) from the batch, transformers decodes it until the longest is done.
``--checkpoint`` decodes with trained vision weights (``make demo``'s outputs/demo/train/checkpoints). Beam search
uses R2GenGPT's settings (3 beams, repetition penalty 2.0 on the generated tokens, length penalty 2.0).
Training: one optimizer step (forward, backward, AdamW step) per method, on random tokens with every text token
labelled and on the demo's first training batch (prompt and padding unlabelled, as the demo trains), the loss at
the first step checked equal; in bf16 both engines keep what trains in fp32 under autocast, as the finetune recipe
does. QLoRA's transformers side needs bitsandbytes, and LoRA's needs peft: a row without them times medcap only.

    PYTHONPATH=. python benchmarks/vs_transformers.py [--reps 3] [--only greedy beam train_medcap ...]

On a GPU, the medcap seed's shape (Llama-3.1-8B + BiomedCLIP's ViT-B/16 and its pooled projector, random weights:
the timing does not depend on them) in bf16, with transformers' static cache + torch.compile as a second peer:

    PYTHONPATH=. python benchmarks/vs_transformers.py --model llama3_1_8b_biomedclip --device cuda --dtype bf16 \
        --decode-shapes 32x128 --train-shapes 4x512 --compiled-peer --only greedy train_medcap

Decoding rows give medcap's tokens/s, training rows the step's FLOPs (counted by torch's FlopCounterMode on
medcap's step: what the method must compute) per second of each engine and, with a known peak (``--peak-tflops``;
in bf16 by default the data-sheet peak for the exact device name, e.g. 989.4 on an H100 SXM or H200, 756.5 on an
H100 PCIe, and the output says which), the model FLOPs utilisation (MFU). In bf16 the engines' kernels round
differently, so decoded tokens are compared and counted, not required equal. ``--compile`` times both engines'
training steps with their decoder layers compiled one by one, medcap's as the finetune recipe's ``compile=true``
does, transformers' the same way. ``--model tiny_llama3_biomedclip`` runs the same code on a tiny random model
(seconds, on a CPU).
"""

import argparse
import copy
import gc
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchtune import training
from torchtune.modules import TiedLinear

from medcap.generation import generate
from medcap.models import builders
from medcap.models.hf_export import hf_llama_state, llama_hf_config
from medcap.models.linear import unpack_products
from medcap.precision import keep_trained_parts_in
from medcap.text import IGNORE_INDEX
from medcap.training import caption_loss, pack_frozen_products

LORA = {"rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "output_proj"]}
METHODS = {  # name: (medcap trainable, medcap lora settings)
    "medcap": ({"encoder": "full", "projector": "full", "decoder": "frozen"}, None),
    "llava_stage1": ({"encoder": "frozen", "projector": "full", "decoder": "frozen"}, None),
    "lora": ({"encoder": "frozen", "projector": "full", "decoder": "lora"}, {"decoder": LORA}),
    "qlora": ({"encoder": "frozen", "projector": "full", "decoder": "qlora"}, {"decoder": LORA}),
    "full": ({"encoder": "frozen", "projector": "full", "decoder": "full"}, None),
}
R2GENGPT_BEAM = dict(num_beams=3, repetition_penalty=2.0, length_penalty=2.0)
DECODING = {  # name: (medcap settings, transformers settings, tokens must agree), at each of DECODE_SHAPES
    "greedy": ({}, dict(do_sample=False), True),
    "beam 3 (R2GenGPT)": (dict(**R2GENGPT_BEAM, penalize_prompt=False),
                          dict(do_sample=False, early_stopping=False, **R2GENGPT_BEAM), True),
    "sampling t=1 k=50 p=0.9": (dict(temperature=1.0, top_k=50, top_p=0.9),
                                dict(do_sample=True, temperature=1.0, top_k=50, top_p=0.9), False),
}
DECODE_SHAPES = [(16, 24), (32, 48)]  # prompts x new tokens (random prompts: image tokens + 16 text tokens)
DEMO_DECODING = {  # name: (prompts, max new tokens, medcap settings, transformers settings)
    "greedy, demo prompts, stop token 32x<=48": (32, 48, {}, dict(do_sample=False)),
    "beam 3 (R2GenGPT), demo prompts, stop token 16x<=48": (
        16, 48, dict(**R2GENGPT_BEAM, penalize_prompt=False), dict(do_sample=False, early_stopping=False,
                                                                   **R2GENGPT_BEAM)),
}
TRAIN_SHAPES = [(4, 56), (8, 128)]  # batch x tokens (image tokens + text), every text token labelled
DEMO_TRAIN_BATCH = 4  # and the demo's own first batch of this many samples (--train-shapes leaves it out)
MODELS = {  # --model: the builder's keyword arguments (random weights except the demo's packaged ones)
    "demo": dict(projector="mlp2", max_seq_len=256, image_grid=4),
    "llama3_1_8b_biomedclip": {},
    "tiny_llama3_biomedclip": {},
}
# dense bf16 tensor-core peak, TFLOP/s (NVIDIA's data sheets, half the figures given with sparsity), by the exact
# name torch.cuda.get_device_name gives: the SXM parts, then the PCIe / NVL ones, slower at lower power
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H200": 989.4,
               "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5, "NVIDIA H200 NVL": 835.5}
DEVICE, DTYPE = torch.device("cpu"), torch.float32


def build(name: str, trainable=None, lora=None):
    """The model ``--model`` names, built on DEVICE in DTYPE (the demo: its packaged weights; the others: random)."""
    with training.set_default_dtype(DTYPE), DEVICE:
        return getattr(builders, name)(trainable=trainable, lora=lora, **MODELS[name])


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


class HFVisionLanguage(torch.nn.Module):
    """transformers' Llama with a vision tower: image tokens scattered into inputs_embeds at the placeholders."""

    def __init__(self, llm, vision, image_token_id: int):
        super().__init__()
        self.llm, self.vision, self.image_token_id = llm, vision, image_token_id

    def embeds(self, tokens, images):
        at_image = tokens == self.image_token_id
        text = self.llm.get_input_embeddings()(tokens.masked_fill(at_image, 0))
        vision = self.vision(images).reshape(-1, text.shape[-1]).to(text.dtype)
        return text.masked_scatter(at_image[..., None], vision)


def hf_llm(model):
    """transformers' ``LlamaForCausalLM`` (SDPA attention) holding ``model``'s decoder weights, converted in memory
    the way ``save_hf_llama`` converts them for its folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    decoder = model.decoder
    config = LlamaConfig.from_dict(llama_hf_config(decoder, model.tok_embeddings.num_embeddings))
    config._attn_implementation = "sdpa"
    with training.set_default_dtype(DTYPE), DEVICE:
        llm = LlamaForCausalLM(config)
    state = hf_llama_state(model)
    tied = isinstance(decoder.output, TiedLinear)
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = llm.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise RuntimeError(f"transformers' Llama does not take the converted weights: missing {missing}, "
                           f"unexpected {unexpected}")
    llm.generation_config.eos_token_id = None  # no stop token: every row runs max_new_tokens, as on our side
    llm.generation_config.bos_token_id = None
    llm.generation_config.pad_token_id = 0
    return llm.eval()


ROOT = Path(__file__).resolve().parents[1]
CLOCK = time.perf_counter  # or time.process_time (--clock cpu)


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds per engine, the engines alternating; the first call of each is a warm-up."""
    results = {name: fn() for name, fn in fns.items()}  # warm-up, and the outputs compared
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = CLOCK()
            fn()
            sync()
            times[name].append(CLOCK() - start)
    return {name: (statistics.median(t), results[name]) for name, t in times.items()}


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ours, theirs))
    return "tokens identical" if same == len(ours) else f"TOKENS DIFFER in {len(ours) - same} of {len(ours)} rows"


def decoding_rows(model, hf, reps, only, compiled_peer=False):
    rows = []
    g = torch.Generator().manual_seed(0)
    vocab, size = model.tok_embeddings.num_embeddings, model.vision.encoder.image_size
    for mode, (ours_kw, hf_kw, deterministic) in DECODING.items():
        for n, new in DECODE_SHAPES:
            name = f"{mode} {n}x{new}"
            if only and not any(o in name for o in only):
                continue
            prompts = [[model.image_token_id] * model.tokens_per_image
                       + torch.randint(100, min(vocab, 49000), (16,), generator=g).tolist() for _ in range(n)]
            images = torch.randn(n, 3, size, size, generator=g).to(DEVICE, DTYPE)
            tokens = torch.tensor(prompts, device=DEVICE)

            def ours():
                return generate(model, prompts, images, max_new_tokens=new, stop_ids=[-1], pad_id=0,
                                generator=torch.Generator(DEVICE).manual_seed(0), **ours_kw)

            def theirs(**extra):
                @torch.inference_mode()
                def run():
                    torch.manual_seed(0)
                    embeds = hf.embeds(tokens, images)
                    out = hf.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(tokens),
                                          max_new_tokens=new, min_new_tokens=new, **hf_kw, **extra)
                    return out.tolist()
                return run

            engines = {"medcap": ours, "transformers": theirs()}
            if compiled_peer and mode == "greedy":
                engines["transformers static+compiled"] = theirs(cache_implementation="static")
            timed = interleaved(engines, reps)
            check = agreement(timed["medcap"][1], timed["transformers"][1]) if deterministic else ""
            extra = f"medcap {n * new / timed['medcap'][0]:.0f} new tokens/s"
            if "transformers static+compiled" in timed:  # generate compiles it on GPUs, not on a CPU
                seconds, peer = timed["transformers static+compiled"][0], "static cache" + (
                    " + compile" if DEVICE.type == "cuda" else "")
                extra += (f"; transformers {peer} {seconds:.2f} s (medcap vs it {seconds / timed['medcap'][0]:.2f}x, "
                          f"{agreement(timed['medcap'][1], timed['transformers static+compiled'][1])})")
            rows.append((name, timed["medcap"][0], timed["transformers"][0], check, extra))
            print(rows[-1], flush=True)
    return rows


def demo_batch(model, config: str, n: int, with_captions: bool):
    """The first ``n`` samples of the data set of configs/demo/``config``.yaml, collated as that recipe does
    (captions right-padded for training, prompts left-padded for generation), and the tokenizer."""
    from omegaconf import OmegaConf

    from medcap.data.dataset import collate_captions
    from medcap.runtime import caption_dataset
    from medcap.text import smollm2_tokenizer

    node = OmegaConf.load(ROOT / "configs" / "demo" / f"{config}.yaml").dataset
    node.manifest = str(ROOT / node.manifest)
    if not Path(node.manifest).exists():
        raise SystemExit(f"{node.manifest} is missing: build it with python -m medcap.data.demo_builder")
    tokenizer = smollm2_tokenizer()
    dataset = caption_dataset(node, tokenizer, model, with_captions=with_captions)
    batch = collate_captions([dataset[i] for i in range(n)], pad_id=tokenizer.pad_id,
                             padding_side="right" if with_captions else "left")
    return batch, tokenizer


def demo_prompts(model, n: int):
    """The first ``n`` prompts and images of the demo's test split, as the demo's generate config feeds them."""
    batch, tokenizer = demo_batch(model, "generate", n, with_captions=False)
    prompts = [row[mask].tolist() for row, mask in zip(batch["tokens"], batch["padding_mask"])]
    return prompts, batch["tokens"], batch["padding_mask"], batch["images"], tokenizer


def demo_train_batch(model, n: int):
    """Tokens, labels and images of the demo's first ``n`` training samples, collated as its training does."""
    batch, _ = demo_batch(model, "finetune_vision", n, with_captions=True)
    return batch["tokens"], batch["labels"], batch["images"]


def until_stop(rows: list[list[int]], stop_ids: list[int]) -> list[list[int]]:
    return [next((row[:i] for i, t in enumerate(row) if t in stop_ids), row) for row in rows]


def demo_decoding_rows(model, hf, reps, only):
    rows = []
    for name, (n, new, ours_kw, hf_kw) in DEMO_DECODING.items():
        if only and not any(o in name for o in only):
            continue
        prompts, tokens, mask, images, tokenizer = demo_prompts(model, n)
        tokens, mask, images, stops = tokens.to(DEVICE), mask.to(DEVICE), images.to(DEVICE, DTYPE), tokenizer.stop_ids

        def ours():
            return generate(model, prompts, images, max_new_tokens=new, stop_ids=stops, pad_id=tokenizer.pad_id,
                            **ours_kw)

        @torch.inference_mode()
        def theirs():
            out = hf.llm.generate(inputs_embeds=hf.embeds(tokens, images), attention_mask=mask.long(),
                                  max_new_tokens=new, eos_token_id=stops, pad_token_id=tokenizer.pad_id, **hf_kw)
            return until_stop(out.tolist(), stops)

        timed = interleaved({"medcap": ours, "transformers": theirs}, reps)
        lengths = [len(ids) for ids in timed["medcap"][1]]
        rows.append((name, timed["medcap"][0], timed["transformers"][0],
                     f"{agreement(timed['medcap'][1], timed['transformers'][1])}; lengths {min(lengths)}-"
                     f"{max(lengths)}, mean {sum(lengths) / len(lengths):.1f}",
                     f"medcap {sum(lengths) / timed['medcap'][0]:.0f} new tokens/s"))
        print(rows[-1], flush=True)
    return rows


def training_rows(model_name, reps, only, peak_tflops, compile=False):
    rows = []
    for method in METHODS:
        if only and f"train_{method}" not in only and "train" not in only:
            continue
        # in a function of its own, so that both engines' models, optimizers and step closures are freed before
        # the next method builds its pair (an 8B model twice over)
        rows += method_rows(model_name, method, reps, peak_tflops, compile)
        free_memory()
    return rows


def method_rows(model_name, method, reps, peak_tflops, compile):
    rows = []
    trainable, lora = METHODS[method]
    torch.manual_seed(0)
    try:
        model = build(model_name, trainable, lora).train()
    except Exception as e:  # noqa: BLE001 - a method this machine cannot build is reported, not fatal
        return [(f"train {method}", None, None, f"medcap cannot build it here: {e}", "")]
    hf = hf_side(method, model)
    keep_trained_parts_in(model, torch.float32, DTYPE)  # as the finetune recipe does (master_dtype fp32)
    if compile:  # as the finetune recipe does with compile=true, and transformers' decoder layers the same way
        training.compile_model(model, verbose=False)
        if hf is not None:
            compile_hf_layers(hf[0].llm)
    ours_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    first_shape = True  # the only shape that starts from the same weights in both engines
    demo_batch_too = model_name == "demo" and DEMO_TRAIN_BATCH
    for batch, length in TRAIN_SHAPES + ([("demo", DEMO_TRAIN_BATCH)] if demo_batch_too else []):
        if batch == "demo":  # the demo's first training batch: prompt and padding unlabelled, as it trains
            tokens, labels, images = demo_train_batch(model, length)
            batch, length = tokens.shape
            shape = f"demo batch {batch}x{length} ({int((labels != IGNORE_INDEX).sum())} labels)"
        else:
            g = torch.Generator().manual_seed(1)
            n_img, size = model.tokens_per_image, model.vision.encoder.image_size
            tokens = torch.cat([torch.full((batch, n_img), model.image_token_id),
                                torch.randint(2, 10_000, (batch, length - n_img), generator=g)], 1)
            labels = tokens.masked_fill(tokens == model.image_token_id, IGNORE_INDEX)
            images = torch.randn(batch, 3, size, size, generator=g)
            shape = f"{batch}x{length}"
        tokens, labels, images = tokens.to(DEVICE), labels.to(DEVICE), images.to(DEVICE, DTYPE)

        def ours():
            loss = caption_loss(model, {"tokens": tokens, "encoder_input": {"image": {"images": images}}},
                                labels)
            loss.backward()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)
            return loss.item()

        fns = {"medcap": ours}
        if hf is not None:
            hf_model, hf_opt = hf

            def theirs():
                # use_cache=False: no KV cache is filled in training (by default transformers fills one, and each
                # layer's cache state then makes its compiled layer recompile)
                with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=model.compute_dtype is not None):
                    loss = hf_model.llm(inputs_embeds=hf_model.embeds(tokens, images), labels=labels,
                                        use_cache=False).loss
                loss.backward()
                hf_opt.step()
                hf_opt.zero_grad(set_to_none=True)
                return loss.item()

            fns["transformers"] = theirs
        unpack_products(model.decoder)  # the counter does not see oneDNN's packed products: it counts the same ones
        with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
            # medcap's step: forward and backward (counted eagerly; compiling adds no FLOPs)
            caption_loss(model, {"tokens": tokens, "encoder_input": {"image": {"images": images}}},
                         labels).backward()
        ours_opt.zero_grad(set_to_none=True)
        pack_frozen_products(model, DEVICE)  # as medcap.training.train has them
        timed = interleaved(fns, reps)
        flops = counter.get_total_flops()
        extra = f"{flops / 1e12:.3g} TFLOP per step; medcap {flops / timed['medcap'][0] / 1e12:.3g} TFLOP/s"
        if peak_tflops:
            extra += f" (MFU {flops / timed['medcap'][0] / 1e12 / peak_tflops:.1%})"
        if "transformers" in timed:
            extra += f", transformers {flops / timed['transformers'][0] / 1e12:.3g} TFLOP/s"
        if hf is None:
            note = ("no transformers side (bitsandbytes NF4 needs CUDA)" if method == "qlora"
                    else "no transformers side (peft missing or unusable here)")
            rows.append((f"train {method} {shape}", timed["medcap"][0], None, note, extra))
        else:
            first = (timed["medcap"][1], timed["transformers"][1])
            # the first losses (before any step: same weights) must agree; later ones drift with the updates
            rows.append((f"train {method} {shape}", timed["medcap"][0], timed["transformers"][0],
                         f"first loss {first[0]:.4f} vs {first[1]:.4f}" if first_shape else "", extra))
            first_shape = False
        print(rows[-1], flush=True)
    return rows


def compile_hf_layers(llm) -> None:
    """transformers' decoder layers compiled one by one, as torchtune's ``compile_model`` compiles ours (the same
    backend: TORCH_COMPILE_BACKEND, default inductor)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    backend = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    for module in llm.modules():
        if isinstance(module, LlamaDecoderLayer):
            module.compile(backend=backend)


def hf_side(method, model):
    """The transformers model trained the way ``method`` trains ours, with a copy of our vision tower."""
    if method == "qlora":
        return None
    llm = hf_llm(model)
    vision = copy.deepcopy(model.vision)
    hf = HFVisionLanguage(llm, vision, model.image_token_id)
    trainable = METHODS[method][0]
    llm.requires_grad_(trainable["decoder"] == "full")
    vision.encoder.requires_grad_(trainable["encoder"] == "full")
    vision.projector.requires_grad_(True)
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model

            hf.llm = get_peft_model(llm, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        except ImportError as e:  # peft missing, or refusing this environment (e.g. its torchao version)
            print(f"no transformers side for lora: {e}")
            return None
    if DTYPE != torch.float32:  # what trains in fp32 (as keep_trained_parts_in keeps ours), under autocast
        for module in [vision.encoder] * (trainable["encoder"] == "full") + [vision.projector] + [llm] * (
                trainable["decoder"] == "full"):
            module.to(torch.float32)
    hf.train()
    if trainable["encoder"] != "full":
        vision.encoder.eval()
    if trainable["decoder"] == "frozen":
        llm.eval()
    return hf, torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per engine (after a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU seconds instead of wall-clock ones, for a machine shared with "
                             "other work (only with --device cpu --threads 1: GPU work and spinning threads would "
                             "distort it)")
    parser.add_argument("--checkpoint", default=None,
                        help="decode the demo prompts with these trained parts (a checkpoint folder of the demo "
                             "training, e.g. outputs/demo/train/checkpoints); default: the untrained vision side")
    parser.add_argument("--decode-shapes", nargs="*", default=None,
                        help="the decoding shapes PROMPTSxNEW_TOKENS (default: 16x24 32x48)")
    parser.add_argument("--train-shapes", nargs="*", default=None,
                        help="the training shapes BxL (default: 4x56 8x128)")
    parser.add_argument("--compiled-peer", action="store_true",
                        help="greedy rows: also transformers with a static cache (generate compiles its forward "
                             "on a GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for the training rows' MFU (default in bf16: PEAK_TFLOPS for the "
                             "exact device name, e.g. 989.4 on an H100 SXM, 756.5 on an H100 PCIe; none otherwise)")
    parser.add_argument("--compile", action="store_true",
                        help="training rows: both engines' decoder layers compiled one by one, medcap's as the "
                             "finetune recipe's compile=true does, transformers' the same way (the warm-up call of "
                             "each shape compiles)")
    parser.add_argument("--only", nargs="*", default=[],
                        help="cases whose name contains one of these (greedy, beam, sampling, 32x48, demo, "
                             "train, train_medcap, train_lora, ...)")
    args = parser.parse_args()
    if args.clock == "cpu" and (torch.device(args.device).type != "cpu" or args.threads != 1):
        parser.error("--clock cpu counts this process's CPU seconds: GPU work is not in them, and with several "
                     "threads it adds up their spinning; use it only with --device cpu --threads 1")
    torch.set_num_threads(args.threads)
    global CLOCK, DEMO_TRAIN_BATCH, DEVICE, DTYPE
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    DEVICE = torch.device(args.device)
    DTYPE = training.get_dtype(args.dtype, device=DEVICE)
    peak, peak_note = args.peak_tflops, f"; MFU against {args.peak_tflops} TFLOP/s (--peak-tflops)"
    if peak is None:
        peak_note = ""
        if DEVICE.type == "cuda" and DTYPE == torch.bfloat16:
            name = torch.cuda.get_device_name(DEVICE)
            peak = PEAK_TFLOPS.get(name)
            peak_note = (f"; MFU against {peak} TFLOP/s, the dense bf16 peak of {name}" if peak else
                         f"; no MFU: no peak known for {name!r} (give --peak-tflops)")
    if args.decode_shapes:
        DECODE_SHAPES[:] = [tuple(int(x) for x in shape.split("x")) for shape in args.decode_shapes]
    if args.train_shapes:
        DEMO_TRAIN_BATCH = 0
        TRAIN_SHAPES[:] = [tuple(int(x) for x in shape.split("x")) for shape in args.train_shapes]
    torch.manual_seed(0)
    rows = []
    decode_only = [o for o in args.only if not o.startswith("train")]
    if decode_only or not args.only:
        model = build(args.model).eval()
        if args.checkpoint:
            from medcap.checkpoint import load_checkpoint

            load_checkpoint(model, args.checkpoint)
        hf = HFVisionLanguage(hf_llm(model), model.vision, model.image_token_id).eval()
        rows += decoding_rows(model, hf, args.reps, decode_only, args.compiled_peer)
        if args.model == "demo":
            rows += demo_decoding_rows(model, hf, args.reps, decode_only)
        model = hf = None
        free_memory()
    if not args.only or any(o.startswith("train") for o in args.only):
        rows += training_rows(args.model, args.reps, [o for o in args.only if o.startswith("train")], peak,
                              args.compile)
    import transformers

    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {args.threads} threads"
    compiled = " (training steps compiled in both engines: their decoder layers)" if args.compile else ""
    print(f"\n{args.model}{compiled}; {where}, {args.dtype}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, "
          f"median of {args.reps} interleaved repetitions, {args.clock} seconds{peak_note}\n")
    print("| work | medcap s | transformers s | medcap vs transformers (>1 = medcap faster) | check | throughput |")
    print("|---|---|---|---|---|---|")
    for name, ours, theirs, check, extra in rows:
        ratio = f"{theirs / ours:.2f}x" if ours and theirs else "n/a"
        print(f"| {name} | {ours if ours is None else f'{ours:.2f}'} | "
              f"{theirs if theirs is None else f'{theirs:.2f}'} | {ratio} | {check or ''} | {extra} |")


if __name__ == "__main__":
    main()
