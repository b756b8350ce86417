"""LoRA merged into a Hugging Face Llama folder that transformers loads with the same outputs."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from medcap import cli
from medcap.checkpoint import save_checkpoint
from medcap.models import builders
from medcap.models.hf_export import save_hf_llama
from medcap.models.llm_weights import hf_llama_decoder

transformers = pytest.importorskip("transformers")


def adapted(builder, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = builder(trainable={"encoder": "frozen", "projector": "full", "decoder": "lora"},
                    lora={"decoder": {"rank": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj", "w2"]}},
                    **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_b." in name:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("builder, family", [(builders.tiny_llama3_2_clip336, "llama3"),   # scaled RoPE
                                             (builders.tiny_demo, None),                   # tied, plain RoPE
                                             (builders.tiny_llama2_swin, "llama2")])
def test_transformers_loads_the_merged_llm_with_the_adapted_outputs(builder, family, tmp_path):
    model = adapted(builder)
    out = save_hf_llama(model, tmp_path / "hf", dtype=torch.float32)
    tokens = torch.randint(2, 1000, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)
        hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        assert torch.allclose(hf(tokens).logits, expected, atol=1e-4)
        if family:  # and medcap reads it back as an llm_dir (SmolLM2 loads from its GGUF instead)
            reloaded = hf_llama_decoder(out, family).eval()
            assert torch.allclose(reloaded(tokens), expected, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == (builder is builders.tiny_demo)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_merge_recipe_builds_the_model_of_its_own_config_and_merges_the_run(tmp_path):
    model = adapted(builders.tiny_llama2_swin)
    run_cfg = OmegaConf.create({"seed": 0, "model": {"_component_": "medcap.models.builders.tiny_llama2_swin",
                                          "trainable": dict(model.trainable),
                                          "lora": {"decoder": {"rank": 4, "alpha": 8,
                                                               "targets": ["q_proj", "k_proj", "v_proj", "w2"]}}}})
    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "step_000002", run_cfg)
    cli.run_recipe("merge", "demo/merge", [f"checkpoint={tmp_path / 'run' / 'checkpoints'}",
                                           f"output_dir={tmp_path / 'merged'}", "dtype=fp32",
                                           "model._component_=medcap.models.builders.tiny_llama2_swin",
                                           "~model.projector", "~model.max_seq_len", "~model.image_grid"])
    tokens = torch.randint(2, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_safetensors_read_back_by_the_safetensors_library(tmp_path, dtype):
    from safetensors import safe_open

    from medcap.safetensors_stream import write_streaming

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g),
               "c.scale": torch.randn(2, 1, 3, generator=g)}
    produced = []

    def produce(name):
        produced.append(name)
        return tensors[name]

    write_streaming(tmp_path / "m.safetensors", [(k, tuple(v.shape)) for k, v in tensors.items()], dtype, produce,
                    metadata={"format": "pt"})
    assert produced == list(tensors)  # one at a time, in order
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, value in tensors.items():
            assert torch.equal(f.get_tensor(name), value.to(dtype))
    with pytest.raises(ValueError, match="b: produced shape"):
        write_streaming(tmp_path / "x.safetensors", [("b", (6,))], dtype, produce)


def test_an_fp32_export_of_a_bf16_transformers_5_folder_loads_in_fp32(tmp_path):
    """transformers 5 writes the dtype as "dtype" (and reads it before "torch_dtype"): the exported config must say
    fp32 under both names, or from_pretrained loads the fp32 weights in bf16."""
    model = adapted(builders.tiny_llama3_2_clip336)
    src = save_hf_llama(model, tmp_path / "src", dtype=torch.float32)
    transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()).get("dtype") == "bfloat16"
    out = save_hf_llama(model, tmp_path / "fp32", llm_dir=tmp_path / "bf16", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert next(transformers.LlamaForCausalLM.from_pretrained(out).parameters()).dtype == torch.float32
