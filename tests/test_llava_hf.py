"""LLaVA 1.5 in the llava-hf layout: a tiny random ``LlavaForConditionalGeneration`` written by transformers is read
by ``builders.llava_hf`` and gives transformers' logits and greedy tokens; a trained model written back by
``save_llava_hf`` is read by transformers with medcap's logits. The Vicuna template is checked against
transformers' own tokenizer on the same text."""

import json
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.multiprocessing.reductions import StorageWeakRef

from medcap import cli
from medcap.checkpoint import save_checkpoint
from medcap.generation import generate
from medcap.models import builders, lora
from medcap.models.llava_hf import llava_decoder, llava_hf_vision_encoder, read_llava_config, save_llava_hf
from medcap.text import llava_hf_tokenizer
from medcap.text.vicuna import VicunaTokenizer
from tests.test_tokenizers import SENTENCEPIECE_MODEL

transformers = pytest.importorskip("transformers")

# config.json of llava-hf/llava-1.5-7b-hf as published (its text_config leaves the Llama shape to the defaults)
LLAVA_1_5_7B_HF = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}
# the same shapes, tiny: a 28 px image is 2 x 2 patches = 4 image tokens
TINY = {"text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "vocab_size": 32064, "max_position_embeddings": 256,
                        "rms_norm_eps": 1e-05, "model_type": "llama"},
        "vision_config": {"hidden_size": 32, "image_size": 28, "intermediate_size": 64, "num_attention_heads": 4,
                          "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 16, "hidden_act": "quick_gelu",
                          "model_type": "clip_vision_model"}}
PREPROCESSOR = {"crop_size": {"height": 28, "width": 28}, "do_center_crop": True, "do_normalize": True,
                "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": {"shortest_edge": 28}}


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def write_llava_folder(folder, select_strategy="default", feature_layer=-2):
    """A random tiny LLaVA 1.5 as transformers saves it (sharded), with the llava-hf tokenizer files."""
    config = transformers.LlavaConfig(**TINY, image_token_index=32000, pad_token_id=32001,
                                      projector_hidden_act="gelu", vision_feature_layer=feature_layer,
                                      vision_feature_select_strategy=select_strategy)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    perturb(model)
    model.save_pretrained(folder, max_shard_size="1MB")
    shutil.copy(SENTENCEPIECE_MODEL, folder / "tokenizer.model")
    (folder / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<pad>": 32001}))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return model


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-1.5-7b-hf")
    return folder, write_llava_folder(folder)


def relayout(src, dst, rename) -> None:
    """Copy a llava-hf folder with every tensor renamed (another key layout transformers has written)."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        save_file({rename(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


def hub_layout(name: str) -> str:  # the llava-hf hub files: vision_tower.vision_model.*
    return "vision_tower.vision_model." + name[len("vision_tower."):] if name.startswith("vision_tower.") else name


def transformers_4_5x_layout(name: str) -> str:  # model.language_model.*, lm_head.weight, model.vision_tower.*
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    return "model." + name


def inputs(tokenizer, batch=2):
    prompts = [tokenizer.prompt_ids("Describe the image.", 4), tokenizer.prompt_ids("What organ is shown here?", 4)]
    length = max(map(len, prompts))
    tokens = torch.full((batch, length), tokenizer.pad_id)
    for row, p in enumerate(prompts[:batch]):
        tokens[row, :len(p)] = torch.tensor(p)
    return prompts[:batch], tokens[:batch], torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["as_saved", "hub", "transformers_4_5x"])
def test_logits_match_transformers_in_every_key_layout(llava_dir, layout, tmp_path):
    folder, reference = llava_dir
    if layout != "as_saved":
        folder = tmp_path / layout
        relayout(llava_dir[0], folder, hub_layout if layout == "hub" else transformers_4_5x_layout)
    model = builders.llava_hf(str(folder)).eval()
    tokenizer = llava_hf_tokenizer(str(folder))
    assert model.image_token_id == tokenizer.image_token_id == 32000 and model.tokens_per_image == 4
    _, tokens, pixels = inputs(tokenizer)
    with torch.no_grad():
        expected = reference(input_ids=tokens, pixel_values=pixels).logits
        ours = model(tokens, encoder_input={"image": {"images": pixels}})
    diff = (ours - expected).abs().max().item()
    print(f"llava-hf -> medcap ({layout}): logits max abs diff {diff:.3g} (logits up to {expected.abs().max():.2f})")
    assert diff < 1e-4


@pytest.mark.parametrize("strategy, layer", [("full", -1), ("default", [-3, -1])])
def test_feature_layer_and_select_strategy_follow_the_config(strategy, layer, tmp_path):
    reference = write_llava_folder(tmp_path, strategy, layer)
    model = builders.llava_hf(str(tmp_path)).eval()
    tokens_per_image = 5 if strategy == "full" else 4  # the class token kept with "full"
    assert model.tokens_per_image == tokens_per_image
    tokenizer = llava_hf_tokenizer(str(tmp_path))
    tokens = torch.tensor([tokenizer.prompt_ids("Describe the image.", tokens_per_image)])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=tokens, pixel_values=pixels).logits
        ours = model(tokens, encoder_input={"image": {"images": pixels}})
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_gives_transformers_tokens(llava_dir, use_cache):
    folder, reference = llava_dir
    model = builders.llava_hf(str(folder)).eval()
    tokenizer = llava_hf_tokenizer(str(folder))
    prompts, _, pixels = inputs(tokenizer)
    ours = generate(model, prompts, pixels, max_new_tokens=12, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                    use_cache=use_cache)
    for prompt, image, got in zip(prompts, pixels, ours):
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor([prompt]), pixel_values=image[None], max_new_tokens=12,
                                     do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_id,
                                     pad_token_id=tokenizer.pad_id)
        new = out[0, len(prompt):].tolist()
        expected = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
        assert got == expected and len(expected) > 3


def test_generated_image_id_is_embedded_as_transformers_embeds_it(llava_dir):
    """In a decoding step without images, the <image> id (a row of the embedding table here) is embedded."""
    folder, reference = llava_dir
    model = builders.llava_hf(str(folder)).eval()
    tokens = torch.tensor([[1, 3000, 32000, 32001, 5000]])
    with torch.no_grad():
        assert torch.allclose(model(tokens), reference(input_ids=tokens).logits, atol=1e-4)


def test_published_config_builds_transformers_shapes():
    """llava-1.5-7b-hf's sparse config.json: the LLM takes LlamaConfig's defaults as transformers does."""
    config = read_llava_config_from(LLAVA_1_5_7B_HF)
    with torch.device("meta"):
        reference = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**LLAVA_1_5_7B_HF))
        decoder = llava_decoder(config["text"])
    hf_llm = sum(p.numel() for n, p in reference.named_parameters() if "language_model" in n or "lm_head" in n)
    assert sum(p.numel() for p in decoder.parameters()) == hf_llm == 6_738_939_904
    assert decoder.tok_embeddings.num_embeddings == 32064 and len(decoder.layers) == 32
    assert decoder.layers[0].mlp.w1.out_features == 11008 and decoder.max_seq_len == 4096
    assert config["text"]["rms_norm_eps"] == 1e-5 and config["text"]["rope_theta"] == 10000.0


def read_llava_config_from(config: dict, tmp=None) -> dict:
    import tempfile
    from pathlib import Path

    folder = Path(tmp or tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(config))
    return read_llava_config(folder)


def test_vision_encoder_alone_reads_only_the_tower(llava_dir):
    folder, reference = llava_dir
    encoder = llava_hf_vision_encoder(str(folder), output="pooled").eval()
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference.model.vision_tower(pixel_values=pixels).pooler_output
        assert torch.allclose(encoder(pixels)[:, 0], expected, atol=1e-5)
    assert encoder.resize_mode == "crop" and encoder.image_size == 28


def test_vicuna_template_tokenises_as_transformers_does(llava_dir):
    """The thesis' training text and a few-shot conversation, as strings and as ids, against transformers'
    LlamaTokenizer on the same text and against LLaVA's own way (each piece around an image encoded on its own).
    llava-hf's published ids put a lone word-start piece on both sides of the image token
    (``[1, 3148, 1001, 29901, 29871, 32000, 29871, 13, ...]``): the legacy tokenisation, not legacy=False's."""
    folder, _ = llava_dir
    hf_dir = folder.parent / "hf_tokenizer"
    hf_dir.mkdir(exist_ok=True)
    shutil.copy(SENTENCEPIECE_MODEL, hf_dir / "tokenizer.model")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf.add_tokens([transformers.AddedToken(t, special=True, normalized=False) for t in ("<image>", "<pad>")],
                  special_tokens=True)

    thesis = llava_hf_tokenizer(str(folder), separator="\n", answer_eos=False, loss_on_prompt=True)
    prompt = "As a medical expert, describe it?"
    text = thesis.render_prompt(prompt, 1) + thesis.render_answer("CT of the chest.")
    assert text == "USER: <image>\nAs a medical expert, describe it?\nASSISTANT: CT of the chest."
    ids = thesis.prompt_ids(prompt, 1) + thesis.answer_ids("CT of the chest.")
    assert ids == hf(text).input_ids

    vicuna = llava_hf_tokenizer(str(folder))
    ask = "Provide a medical caption based on similar examples."
    text = (vicuna.render_prompt(ask, 1) + vicuna.render_answer("Chest X-ray.") + vicuna.render_prompt(ask, 1))
    assert text == (f"USER: <image>\n{ask} ASSISTANT: Chest X-ray.</s>USER: <image>\n{ask} ASSISTANT:")
    ids = vicuna.prompt_ids(ask, 1) + vicuna.answer_ids("Chest X-ray.") + vicuna.followup_ids(ask, 1)
    assert ids == hf(text).input_ids
    spm = vicuna._spm  # LLaVA 1.5's tokenizer_image_token: the text around each image block encoded on its own
    pieces = text.replace("</s>", "<image>").split("<image>")
    by_piece = [vicuna.bos_id] + spm.encode(pieces[0]) + [32000] + spm.encode(pieces[1]) + [vicuna.eos_id] + \
        spm.encode(pieces[2]) + [32000] + spm.encode(pieces[3])
    assert ids == by_piece and ids[4:7] == [spm.piece_to_id("▁"), 32000, spm.piece_to_id("▁")]
    assert vicuna.decode(ids, skip_special_tokens=False) == "<s>" + text

    # without </s> after the answer (the thesis' answers) the next turn goes straight on from the answer's text
    text = thesis.render_prompt(ask, 1) + thesis.render_answer("Chest X-ray.") + thesis.render_prompt(ask, 1)
    ids = thesis.prompt_ids(ask, 1) + thesis.answer_ids("Chest X-ray.") + thesis.followup_ids(ask, 1)
    assert ids == hf(text).input_ids
    assert vicuna.decode(ids) == text.replace("<image>", "").replace("</s>", "")


def test_loss_on_prompt_labels_the_prompt_text_but_not_the_image(llava_dir):
    from medcap.text import IGNORE_INDEX, build_sample

    folder, _ = llava_dir
    thesis = llava_hf_tokenizer(str(folder), separator="\n", answer_eos=False, loss_on_prompt=True)
    prompt = thesis.prompt_ids("Describe it?", 4)
    limit = len(prompt) + 5
    sample = build_sample(thesis, "Describe it?", "a long caption of many words here", 4, limit)
    assert sample["labels"][:len(prompt)] == [IGNORE_INDEX if t == 32000 else t for t in prompt]
    assert sample["truncated"] and len(sample["tokens"]) == limit
    assert sample["tokens"][-1] != thesis.eos_id  # no </s> to keep: the caption is simply cut
    vicuna = llava_hf_tokenizer(str(folder))
    standard = build_sample(vicuna, "Describe it?", "a long caption of many words here", 4, limit)
    n = len(vicuna.prompt_ids("Describe it?", 4))
    assert set(standard["labels"][:n]) == {IGNORE_INDEX} and standard["tokens"][-1] == vicuna.eos_id


def lora_model(folder, trainable, seed=0):
    torch.manual_seed(seed)
    model = builders.llava_hf(str(folder), trainable=trainable,
                              lora={"decoder": {"rank": 4, "alpha": 8,
                                                "targets": ["q_proj", "v_proj", "output_proj", "w1", "w2", "w3"]},
                                    "encoder": {"rank": 2, "alpha": 4, "targets": ["q", "v"]}}).eval()
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_b." in name or ".lora_b" in name:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    with torch.no_grad():  # a trained projector
        model.vision.projector[0].weight.add_(0.01 * torch.randn(model.vision.projector[0].weight.shape, generator=g))
    return model


@pytest.mark.parametrize("max_shard_bytes", [2**40, 2**20])
def test_trained_model_exports_to_a_folder_transformers_reads(llava_dir, tmp_path, max_shard_bytes):
    folder, _ = llava_dir
    model = lora_model(folder, {"encoder": "lora", "projector": "full", "decoder": "lora"})
    tokenizer = llava_hf_tokenizer(str(folder))
    _, tokens, pixels = inputs(tokenizer)
    out = save_llava_hf(model, tmp_path / "exported", folder, dtype=torch.float32, max_shard_bytes=max_shard_bytes)
    exported, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        ours = model(tokens, encoder_input={"image": {"images": pixels}})
        theirs = exported.eval()(input_ids=tokens, pixel_values=pixels).logits
        again = builders.llava_hf(str(out)).eval()(tokens, encoder_input={"image": {"images": pixels}})
    diff = (theirs - ours).abs().max().item()
    print(f"medcap -> llava-hf export (LoRA merged, shards of {max_shard_bytes} bytes): logits max abs diff {diff:.3g}")
    assert diff < 1e-4 and (again - ours).abs().max().item() < 1e-4
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.model", "added_tokens.json", "preprocessor_config.json"} <= files
    assert ("model.safetensors.index.json" in files) == (max_shard_bytes < 2**30)
    assert any(k.startswith("vision_tower.vision_model.") for p in out.glob("*.safetensors") for k in load_file(p))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_qlora_trains_only_adapters_and_exports_dequantised(llava_dir, tmp_path):
    folder, _ = llava_dir
    model = lora_model(folder, {"encoder": "frozen", "projector": "frozen", "decoder": "qlora"})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_a." in n or ".lora_b." in n for n in trained)
    tokenizer = llava_hf_tokenizer(str(folder))
    _, tokens, pixels = inputs(tokenizer, batch=1)
    out = save_llava_hf(model, tmp_path / "q", folder, dtype=torch.float32)
    with torch.no_grad():
        ours = model(tokens, encoder_input={"image": {"images": pixels}})
        theirs = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()(
            input_ids=tokens, pixel_values=pixels).logits
    assert (theirs - ours).abs().max().item() < 1e-4  # the NF4 weights dequantised once = on the fly


def test_export_refuses_a_model_of_another_folder(llava_dir, tmp_path):
    folder, _ = llava_dir
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 1
    (other / "config.json").write_text(json.dumps(config))
    save_file({"language_model.model.norm.weight": torch.ones(64)}, other / "model.safetensors")
    model = builders.llava_hf(str(folder))
    with pytest.raises(ValueError, match="does not match .*other"):
        save_llava_hf(model, tmp_path / "out", other)
    assert not (tmp_path / "out").exists()


def test_bad_folders_fail_in_one_line(llava_dir, tmp_path):
    folder, _ = llava_dir
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "projector_hidden_act": "relu"}))
    with pytest.raises(ValueError, match=r"config.json: projector_hidden_act is 'relu'") as error:
        builders.llava_hf(str(bad))
    assert "\n" not in str(error.value)
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="expected model_type 'llava'"):
        builders.llava_hf(str(bad))
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "added_tokens.json").write_text(json.dumps({"<image>": 32005}))
    with pytest.raises(ValueError, match="<image> has id 32005, but config.json says 32000"):
        llava_hf_tokenizer(str(bad))
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    save_file({**load_file(shard), "extra.weight": torch.zeros(2)}, shard)
    with pytest.raises(ValueError, match=r"extra.weight.*belong to no part of a LLaVA model"):
        builders.llava_hf(str(bad))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="are missing"):
        builders.llava_hf(str(bad))
    with pytest.raises(ValueError, match="is a SentencePiece piece"):
        VicunaTokenizer(SENTENCEPIECE_MODEL, image_token_id=5)


def test_export_frees_each_merged_tensor_before_computing_the_next(llava_dir, tmp_path, monkeypatch):
    """Each merged or dequantised tensor is computed when it is written and freed before the next one: a whole
    merged model held at once (plus its cast copy) was 2x the exported bytes (~40 GB for a 7B QLoRA)."""
    folder, _ = llava_dir
    model = lora_model(folder, {"encoder": "lora", "projector": "full", "decoder": "qlora"})
    computed, alive_at_each = [], []

    def tracked(function):
        def call(*args):
            alive_at_each.append(sum(not ref.expired() for ref in computed))
            out = function(*args)
            if out is not args[0]:  # a new tensor, not a weight of the model
                computed.append(StorageWeakRef(out.untyped_storage()))
            return out
        return call

    monkeypatch.setattr(lora, "merged_fp32", tracked(lora.merged_fp32))
    monkeypatch.setattr(lora, "dequantize", tracked(lora.dequantize))
    out = save_llava_hf(model, tmp_path / "q", folder, dtype=torch.float32, max_shard_bytes=2**20)
    adapted = sum(isinstance(m, lora.ADAPTERS) for m in model.modules())
    assert len(computed) >= adapted > 10 and max(alive_at_each) == 0
    _, tokens, pixels = inputs(llava_hf_tokenizer(str(folder)), batch=1)
    with torch.no_grad():
        theirs = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()(
            input_ids=tokens, pixel_values=pixels).logits
        assert (theirs - model(tokens, encoder_input={"image": {"images": pixels}})).abs().max().item() < 1e-4


def test_merge_never_replaces_the_model_dir(llava_dir, tmp_path):
    folder, _ = llava_dir
    src = tmp_path / "models" / "llava"
    shutil.copytree(folder, src)
    trainable = {"encoder": "frozen", "projector": "full", "decoder": "lora"}
    model = lora_model(src, trainable)
    node = {"_component_": "medcap.models.builders.llava_hf", "model_dir": str(src), "trainable": trainable,
            "lora": {part: vars(s) for part, s in model.lora_settings.items()}}
    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "step_000001", OmegaConf.create({"model": node}))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in src.rglob("*")}
    for out in (src, src / "merged", src.parent):
        with pytest.raises(ValueError, match="output_dir .* the model.model_dir .*choose another output_dir"):
            cli.run_recipe("merge", "demo/merge", [
                f"checkpoint={tmp_path / 'run' / 'checkpoints'}", f"output_dir={out}", "overwrite=true",
                "dtype=fp32", "format=llava_hf", "model._component_=medcap.models.builders.llava_hf",
                f"model.model_dir={src}", "~model.projector", "~model.max_seq_len", "~model.image_grid"])
        with pytest.raises(ValueError, match="output_dir .* the source folder .*choose another output_dir"):
            save_llava_hf(model, out, src)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in src.rglob("*")} == before


def _edit_tensor(folder, name, edit) -> str:
    """Apply ``edit`` to the shard holding ``name`` (``edit(state)`` changes it in place); the shard's name."""
    for shard in sorted(folder.glob("*.safetensors")):
        state = load_file(shard)
        if name in state:
            edit(state)
            save_file(state, shard, metadata={"format": "pt"})
            return shard.name
    raise AssertionError(f"no shard holds {name}")


@pytest.mark.parametrize("name", ["language_model.model.layers.0.self_attn.q_proj.weight",
                                  "vision_tower.encoder.layers.0.self_attn.k_proj.weight",
                                  "multi_modal_projector.linear_2.bias"])
def test_a_missing_tensor_is_named_as_in_a_llava_hf_folder(llava_dir, tmp_path, name):
    folder, _ = llava_dir
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    _edit_tensor(bad, name, lambda state: state.pop(name))
    hub = hub_layout(name)  # the hub's vision_tower.vision_model.*
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: no weight file holds \\['{re.escape(hub)}'\\]"):
        builders.llava_hf(str(bad))
    if name.startswith("vision_tower."):
        with pytest.raises(ValueError, match=re.escape(hub)):
            llava_hf_vision_encoder(str(bad))


@pytest.mark.parametrize("name", ["language_model.model.layers.1.mlp.up_proj.weight",
                                  "vision_tower.encoder.layers.0.mlp.fc1.weight"])
def test_a_misshapen_tensor_is_named_with_its_shard(llava_dir, tmp_path, name):
    folder, _ = llava_dir
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shard = _edit_tensor(bad, name, lambda state: state.__setitem__(name, state[name][:3].clone()))
    with pytest.raises(ValueError, match=f"{re.escape(str(bad / shard))} does not fit the model of its config.json: "
                                         f"{re.escape(name)}: expected shape"):
        builders.llava_hf(str(bad))


def test_llava_hf_follows_its_image_processor_or_refuses_it(llava_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from medcap.data.dataset import image_transform

    folder, _ = llava_dir
    # oracle: transformers' CLIPImageProcessor of the folder (here resampling bilinear) on the same image
    copy = tmp_path / "bilinear"
    shutil.copytree(folder, copy)
    (copy / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "resample": 2}))
    encoder = llava_hf_vision_encoder(str(copy))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 37, 3), dtype=np.uint8))
    processor = transformers.CLIPImageProcessor(**{**PREPROCESSOR, "resample": 2})
    expected = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
    assert encoder.interpolation == "bilinear"
    assert (image_transform(encoder)(image) - expected).abs().max() < 0.03
    (copy / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "size": {"shortest_edge": 40}}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: size=\{'shortest_edge': 40\} does not match the "
                                         r"model's input of 28 px"):
        llava_hf_vision_encoder(str(copy))
