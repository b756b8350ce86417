"""Write a vision-language model's LLM as a Hugging Face Llama folder (``config.json`` + ``model.safetensors``),
with its LoRA adapters merged and NF4 weights dequantised, loadable by ``transformers`` and by medcap's own
``hf_llama_decoder``."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import TiedLinear

from medcap.atomic import replaced_atomically
from medcap.models.lora import merged_tensors
from medcap.models.tensor_files import read_json
from medcap.safetensors_stream import write_streaming

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


def check_output_dir(out_dir: str | Path, sources: dict[str, str | Path | None]) -> None:
    """Refuse an ``out_dir`` that is, holds or lies inside one of ``sources`` ({what: path}; None skipped), paths
    resolved: the output folder is replaced as a whole, which would delete it."""
    out = Path(out_dir).resolve()
    for what, source in sources.items():
        if source is None:
            continue
        source = Path(source).resolve()
        if out == source or out in source.parents or source in out.parents:
            where = "is" if out == source else "holds" if out in source.parents else "lies inside"
            raise ValueError(f"output_dir {out} {where} the {what} {source}: the output folder is replaced as a "
                             f"whole, which would delete it; choose another output_dir")


def merged_decoder_tensors(model):
    """(shape per torchtune name, function computing one tensor) of the decoder with its adapters merged (the
    fusion model keeps the token embeddings)."""
    shapes, tensor = merged_tensors(model.decoder)
    embeddings = model.tok_embeddings.weight
    shapes["tok_embeddings.weight"] = tuple(embeddings.shape)
    return shapes, lambda key: embeddings.detach() if key == "tok_embeddings.weight" else tensor(key)


def hf_conversion_args(decoder) -> dict[str, int]:
    """The shapes ``tune_to_hf`` needs to rename and permute a torchtune Llama-architecture decoder's tensors."""
    attn = decoder.layers[0].attn
    return {"num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads, "dim": attn.embed_dim,
            "head_dim": attn.head_dim}


def hf_llama_tensors(model) -> tuple[list[tuple[str, tuple[int, ...]]], Callable[[str], torch.Tensor]]:
    """((Hugging Face Llama name, shape) in file order, function computing one tensor) of the merged decoder
    (a tied output weight left out); nothing is computed until a name is asked for."""
    shapes, tensor = merged_decoder_tensors(model)
    if isinstance(model.decoder.output, TiedLinear):
        shapes.pop("output.weight", None)
    convert = hf_conversion_args(model.decoder)
    # torchtune -> Hugging Face names and shapes, one key at a time (on the meta device: nothing is computed)
    on_meta = {key: tune_to_hf({key: torch.empty(shape, device="meta")}, **convert) for key, shape in shapes.items()}
    source = {name: key for key, converted in on_meta.items() for name in converted}
    entries = [(name, tuple(t.shape)) for converted in on_meta.values() for name, t in converted.items()]

    def produce(name: str) -> torch.Tensor:
        key = source[name]
        return tune_to_hf({key: tensor(key)}, **convert)[name]

    return entries, produce


def hf_llama_state(model) -> dict[str, torch.Tensor]:
    """The whole merged decoder in memory under Hugging Face Llama names, for exports that hold it at once."""
    shapes, tensor = merged_decoder_tensors(model)
    return tune_to_hf({key: tensor(key) for key in shapes}, **hf_conversion_args(model.decoder))


def llama_hf_config(decoder, vocab_size: int) -> dict:
    """config.json for a torchtune Llama-architecture decoder built without one (SmolLM2 from GGUF, random
    models): the shapes, RoPE base and scaling, norm epsilon and embedding tying read off the modules."""
    layer = decoder.layers[0]
    attn = layer.attn
    rope = attn.pos_embeddings
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": attn.embed_dim, "intermediate_size": layer.mlp.w1.weight.shape[0],
        "num_hidden_layers": len(decoder.layers), "num_attention_heads": attn.num_heads,
        "num_key_value_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
        "max_position_embeddings": decoder.max_seq_len, "rms_norm_eps": layer.sa_norm.eps,
        "rope_theta": float(rope.base), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": isinstance(decoder.output, TiedLinear), "torch_dtype": "float32",
    }
    if isinstance(rope, Llama3ScaledRoPE):
        config["rope_scaling"] = {"rope_type": "llama3", "factor": float(rope.scale_factor),
                                  "low_freq_factor": float(rope.low_freq_factor),
                                  "high_freq_factor": float(rope.high_freq_factor),
                                  "original_max_position_embeddings": int(rope.old_context_len)}
    return config


def save_hf_llama(model, out_dir: str | Path, llm_dir: str | Path | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the merged LLM to ``out_dir`` (atomically: a temporary folder renamed into place), one tensor at a
    time: each merged (in fp32), converted and cast to ``dtype`` only when it is written. With ``llm_dir``
    (the HF folder it was loaded from) its config.json and tokenizer files (chat template included) are copied;
    otherwise config.json is derived from the modules. An ``out_dir`` that is, holds or lies inside ``llm_dir`` is
    refused."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, {"llm_dir": llm_dir})
    entries, produce = hf_llama_tensors(model)
    with replaced_atomically(out_dir, folder=True) as tmp:
        write_streaming(tmp / "model.safetensors", entries, dtype, produce, metadata={"format": "pt"})
        if llm_dir is not None:
            config = read_json(Path(llm_dir) / "config.json")
            for name in TOKENIZER_FILES:
                if (Path(llm_dir) / name).is_file():
                    shutil.copy2(Path(llm_dir) / name, tmp / name)
            if (Path(llm_dir) / "original" / "tokenizer.model").is_file():
                (tmp / "original").mkdir()
                shutil.copy2(Path(llm_dir) / "original" / "tokenizer.model", tmp / "original" / "tokenizer.model")
        else:
            config = llama_hf_config(model.decoder, model.tok_embeddings.num_embeddings)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        if "dtype" in config:  # transformers 5 writes and reads "dtype" first
            config["dtype"] = config["torch_dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
