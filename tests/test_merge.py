"""LoRA merged into a Hugging Face Llama folder that transformers loads with the same outputs."""

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchtune import training

from medcap import cli
from medcap.checkpoint import CheckpointError, save_checkpoint
from medcap.models import builders
from medcap.models.hf_export import save_hf_llama
from medcap.models.llm_weights import hf_llama_decoder
from medcap.models.lora import dequantize
from medcap.precision import keep_trained_parts_in
from tests.test_tokenizers import SENTENCEPIECE_MODEL

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


def save_run(model, run, **recorded):
    """``model`` saved as a run's checkpoint in ``run/checkpoints``, its config.yaml holding ``recorded``."""
    node = {"_component_": "medcap.models.builders.tiny_llama2_swin", "trainable": dict(model.trainable),
            "lora": {part: vars(s) for part, s in getattr(model, "lora_settings", {}).items()}}
    save_checkpoint(model, run / "checkpoints" / "step_000002", OmegaConf.create({"seed": 0, "model": node,
                                                                                  **recorded}))


def merge(run, output_dir, *overrides):
    cli.run_recipe("merge", "demo/merge", [f"checkpoint={run / 'checkpoints'}", f"output_dir={output_dir}",
                                           "dtype=fp32", "model._component_=medcap.models.builders.tiny_llama2_swin",
                                           "~model.projector", "~model.max_seq_len", "~model.image_grid",
                                           *overrides])


def test_merge_recipe_builds_the_model_of_its_own_config_and_merges_the_run(tmp_path):
    model = adapted(builders.tiny_llama2_swin)
    save_run(model, tmp_path / "run")
    merge(tmp_path / "run", tmp_path / "merged")
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


@pytest.mark.parametrize("output_dir, where", [("run", "holds the checkpoint folder"),
                                               ("run/checkpoints", "is the checkpoint folder"),
                                               ("run/checkpoints/step_000002", "lies inside the checkpoint folder"),
                                               ("run/checkpoints/merged", "lies inside the checkpoint folder")])
def test_merge_never_writes_over_or_into_the_checkpoint(tmp_path, output_dir, where):
    """The output folder is replaced whole: over the run folder it deleted the checkpoints and the logs."""
    save_run(adapted(builders.tiny_llama2_swin), tmp_path / "run")
    (tmp_path / "run" / "logs").mkdir()
    (tmp_path / "run" / "logs" / "log.txt").write_text("training log")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=f"output_dir .* {where}.*choose another output_dir"):
        merge(tmp_path / "run", tmp_path / output_dir, "overwrite=true")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_merge_replaces_a_non_empty_output_dir_only_with_overwrite(tmp_path):
    model = adapted(builders.tiny_llama2_swin)
    save_run(model, tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError, match=r"output_dir .*out is not empty \(it holds notes.txt\).*overwrite=true"):
        merge(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
    merge(tmp_path / "run", tmp_path / "out", "overwrite=true")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    tokens = torch.randint(2, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-4)


def test_an_export_over_or_into_its_llm_dir_is_refused(tmp_path):
    model = adapted(builders.tiny_llama2_swin)
    llm_dir = save_hf_llama(model, tmp_path / "llm", dtype=torch.float32)
    (llm_dir / "notes.txt").write_text("kept")
    before = {p.name: p.read_bytes() for p in llm_dir.iterdir()}
    for out in (llm_dir, llm_dir / "merged", tmp_path):
        with pytest.raises(ValueError, match="output_dir .* the llm_dir .*choose another output_dir"):
            save_hf_llama(model, out, llm_dir=llm_dir, dtype=torch.float32)
    assert {p.name: p.read_bytes() for p in llm_dir.iterdir()} == before


def test_a_qlora_run_is_merged_on_the_nf4_base_it_trained_on(tmp_path):
    """NF4 of bf16 weights differs from NF4 of fp32 ones: a bf16 QLoRA run merged with dtype=fp32 must quantise
    its base in bf16, as it trained, and then merge and write in fp32."""
    trainable = {"encoder": "frozen", "projector": "frozen", "decoder": "qlora"}
    torch.manual_seed(0)  # the merge's seed: the same random base
    with training.set_default_dtype(torch.bfloat16):
        model = builders.tiny_llama2_swin(trainable=trainable, lora={"decoder": {"rank": 4, "alpha": 8,
                                                                                 "targets": ["q_proj", "v_proj"]}})
    keep_trained_parts_in(model, torch.float32, torch.bfloat16)  # as finetune keeps the adapters
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_b." in name:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_run(model, tmp_path / "run", dtype="bf16")
    merge(tmp_path / "run", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for i, layer in enumerate(model.decoder.layers):
        v = layer.attn.v_proj  # not permuted by the Hugging Face conversion
        effective = dequantize(v.weight).float() + 2.0 * v.lora_b.weight @ v.lora_a.weight  # alpha / rank = 2
        assert merged[f"model.layers.{i}.self_attn.v_proj.weight"].dtype == torch.float32
        assert torch.equal(merged[f"model.layers.{i}.self_attn.v_proj.weight"], effective)
        assert torch.equal(merged[f"model.layers.{i}.mlp.gate_proj.weight"], dequantize(layer.mlp.w1.weight).float())
    config = tmp_path / "run" / "checkpoints" / "step_000002" / "config.yaml"
    config.write_text(config.read_text().replace("dtype: bf16", "dtype: fp16"))
    with pytest.raises(CheckpointError, match=r"config.yaml: dtype is 'fp16'; a run trains in bf16 or fp32"):
        merge(tmp_path / "run", tmp_path / "again")


def test_merge_reads_what_the_run_trained_from_the_checkpoint(tmp_path, caplog):
    """A run that trained the whole LLM, merged with a model node that does not repeat its trainable: the merged
    folder holds the trained LLM, and merge says so."""
    torch.manual_seed(0)
    model = builders.tiny_llama2_swin(trainable={"encoder": "frozen", "projector": "full", "decoder": "full"}).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_run(model, tmp_path / "full")
    merge(tmp_path / "full", tmp_path / "merged")
    assert "merged (full decoder)" in caplog.text and "trained no LLM weights" not in caplog.text
    tokens = torch.randint(2, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-4)
    caplog.clear()
    save_run(builders.tiny_llama2_swin(trainable={"projector": "full"}), tmp_path / "projector")
    merge(tmp_path / "projector", tmp_path / "original")
    assert "trained no LLM weights" in caplog.text and "merged (frozen decoder)" in caplog.text


def test_the_llm_dir_chat_template_and_added_tokens_are_copied(tmp_path):
    model = adapted(builders.tiny_llama2_swin)
    llm_dir = save_hf_llama(model, tmp_path / "llm", dtype=torch.float32)
    shutil.copy(SENTENCEPIECE_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                "legacy": False}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(llm_dir)  # transformers 5 writes the template to chat_template.jinja
    (llm_dir / "added_tokens.json").write_text(json.dumps({"<image>": 32000}))
    assert (llm_dir / "chat_template.jinja").is_file()
    out = save_hf_llama(model, tmp_path / "merged", llm_dir=llm_dir, dtype=torch.float32)
    for name in ("chat_template.jinja", "added_tokens.json"):
        assert (out / name).read_bytes() == (llm_dir / name).read_bytes()
    merged = transformers.AutoTokenizer.from_pretrained(out)
    assert merged.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
