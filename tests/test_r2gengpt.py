"""R2GenGPT as published (issue 16): its prompt template, report cleaning, schedule, decoding, configs and the import
of its MIMIC delta checkpoints."""

import json

import sentencepiece
import pytest

from medcap.data.reports import clean_report_iu_xray, clean_report_mimic_cxr
from medcap.text import llama2_tokenizer
from tests.test_tokenizers import SENTENCEPIECE_MODEL

PROMPT = "Generate a comprehensive and detailed diagnosis report for this chest xray image."
# REFERENCE.md section 6, R2GenGPT's prompt as its code assembles it (the \n is a newline)
PUBLISHED = ("<s>Human: <Img>{image tokens}</Img> Generate a comprehensive and detailed diagnosis report for this "
             "chest xray image. \nAssistant: {report}</s>")


def test_r2gengpt_template_renders_the_published_prompt_character_for_character():
    tok = llama2_tokenizer(str(SENTENCEPIECE_MODEL), template="r2gengpt")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SENTENCEPIECE_MODEL))
    report = "the heart is normal in size . no effusion ."
    ids = tok.prompt_ids(PROMPT, 3) + tok.answer_ids(report)
    # R2GenGPT split its prompt at <ImageHere> and tokenised each half, and the report + </s>, on their own
    before = sp.encode("Human: <Img>")
    after = sp.encode(f"</Img> {PROMPT} \nAssistant:")
    answer = sp.encode(report)
    assert ids == [sp.bos_id()] + before + [32000] * 3 + after + answer + [sp.eos_id()]
    assert ids[0] == 1 and ids[-1] == 2 and sp.id_to_piece(after[0]).startswith("\u2581")  # a word-start marker
    start, end = ids.index(32000), len(ids) - ids[::-1].index(32000)
    rendered = ("<s>" + sp.decode(ids[1:start]) + "{image tokens}" + sp.decode(ids[end:-1]) + "</s>")
    assert rendered == PUBLISHED.replace("{report}", report)
    # the chat template stays the default
    chat = llama2_tokenizer(str(SENTENCEPIECE_MODEL))
    assert chat.template == "llama2_chat" and "[INST]" in chat.decode(chat.prompt_ids(PROMPT, 1), False)
    with pytest.raises(ValueError, match="no system text"):
        tok.prompt_ids(PROMPT, 3, system="be brief")
    with pytest.raises(ValueError, match="template must be one of"):
        llama2_tokenizer(str(SENTENCEPIECE_MODEL), template="r2gen")


def test_r2gengpt_mimic_cleaning_keeps_colon_and_comparison_signs():
    report = "FINDINGS: The heart <normal>. 1. No effusion @ base = stable.\nIMPRESSION: None."
    assert clean_report_mimic_cxr(report, "r2gengpt") == (
        "findings : the heart <normal> . no effusion @ base = stable . impression : none .")
    assert clean_report_mimic_cxr(report) == "findings the heart normal . no effusion  base  stable . impression none ."
    # the rest is R2Gen's: runs of blanks and dots shrink, brackets and the like go
    assert clean_report_mimic_cxr("Seen on ___ (prior)...  Stable:yes", "r2gengpt") == "seen on  prior . stable :yes ."
    assert clean_report_iu_xray("Heart: normal.", "r2gengpt") == clean_report_iu_xray("Heart: normal.") == \
        "heart normal ."
    with pytest.raises(ValueError, match="variant must be one of"):
        clean_report_mimic_cxr("x", "r2genx")


def test_length_normalization_hf_4_30_counts_one_more_for_a_hypothesis_cut_at_max_new_tokens():
    """transformers 4.30 (R2GenGPT) divided by len(input_ids) without the end token, input_ids = <s> + generated:
    a hypothesis ending with the stop token after n tokens -> n + 1 (as today); one cut at max_new_tokens m -> m + 1
    (today: m). Hand-computed, length_penalty 1, max_new_tokens 2:
      [C]     stop at step 2: log .5 + log .5             = -1.386 / 2 = -0.693 (both conventions)
      [C, C]  cut at 2 tokens: log .5 + log .45            = -1.492 / 2 = -0.746 (with_end_token)
                                                                  / 3 = -0.497 (hf_4_30)
    """
    import math

    from medcap.generation import beam_search
    from tests.test_generation import A, B, C, D, S, MarkovModel
    from tests.tiny_vlm import PAD, STOP

    # D (kept by the first step) only leads to worse hypotheses: D A -1.877, D B and D stop -1.907
    model = MarkovModel({S: {C: 0.5, D: 0.45, STOP: 0.05}, C: {STOP: 0.5, C: 0.45, D: 0.05},
                         D: {A: 0.34, B: 0.33, STOP: 0.33}})
    kw = dict(num_beams=2, max_new_tokens=2, stop_ids=[STOP], pad_id=PAD, use_cache=False, length_penalty=1.0,
              return_scores=True)
    ids, scores = beam_search(model, [[S]], None, **kw)
    assert ids == [[C]] and scores[0] == pytest.approx((math.log(0.5) + math.log(0.5)) / 2)
    ids, scores = beam_search(model, [[S]], None, length_normalization="hf_4_30", **kw)
    assert ids == [[C, C]] and scores[0] == pytest.approx((math.log(0.5) + math.log(0.45)) / 3)
    with pytest.raises(ValueError, match="length_normalization must be one of"):
        beam_search(model, [[S]], None, length_normalization="without_end", **kw)


def test_hf_4_30_decides_a_prompt_by_its_best_candidate_and_checks_the_last_step_too():
    """transformers 4.30's BeamSearchScorer: a prompt is done once its worst finished hypothesis is >= the best
    candidate of the step (a stop token's included) / cur_len ** length_penalty, checked after the last step too,
    and only a prompt not done gets its running beams as hypotheses cut at max_new_tokens. Hand-traced, 2 beams:

    A: S -> 5 (.65) | stop (.35); 5 -> stop (.55) | 5 (.45); length_penalty 1, max_new_tokens 3. Step 1 finishes []
       (-1.050 / 1); step 2 finishes [5] (log .65 + log .55 = -1.029, / 2 = -0.514); step 3's best candidate is the
       stop after 5 5 (-1.828): finished as -0.609, which ties its own -1.828 / 3, so the prompt is done and 5 5 5
       (-2.029 / 4 = -0.507) is never added: [5]. (The running beam's rule adds it and returns 5 5 5.)
    B: S -> 5 (.83) | stop (.17); 4 -> 5 (.83) | 2 (.17); 5 -> stop (.72) | 4 (.28); length_penalty 2, 5 tokens.
       At step 4 (cur_len 4) the best candidate is a stop (-2.007 / 16 = -0.125), better than the worst finished
       hypothesis (-0.145), so the search goes on and ends with 5 4 5 4 5 cut at 5 tokens (-3.105 / 36 = -0.0862);
       the running beam's rule had stopped there and returned 5 4 5 (-0.1234).
    """
    import math

    from medcap.generation import beam_search
    from tests.test_generation import S, MarkovModel
    from tests.tiny_vlm import PAD, STOP

    kw = dict(num_beams=2, stop_ids=[STOP], pad_id=PAD, use_cache=False, return_scores=True,
              length_normalization="hf_4_30")
    model = MarkovModel({S: {5: 0.65, STOP: 0.35}, 5: {STOP: 0.55, 5: 0.45}}, vocab=6)
    ids, scores = beam_search(model, [[S]], None, max_new_tokens=3, length_penalty=1.0, **kw)
    assert ids == [[5]] and scores[0] == pytest.approx((math.log(0.65) + math.log(0.55)) / 2)
    model = MarkovModel({S: {5: 0.83, STOP: 0.17}, 4: {5: 0.83, 2: 0.17}, 5: {STOP: 0.72, 4: 0.28}}, vocab=6)
    ids, scores = beam_search(model, [[S]], None, max_new_tokens=5, length_penalty=2.0, **kw)
    cut = 3 * math.log(0.83) + 2 * math.log(0.28)  # 5 4 5 4 5, cut at 5 tokens: length 5 + 1
    assert ids == [[5, 4, 5, 4, 5]] and scores[0] == pytest.approx(cut / 6 ** 2)


def test_cosine_per_epoch_equals_cosine_annealing_lr_stepped_each_epoch():
    import torch

    from medcap.optim import cosine_per_epoch

    def optimizer():
        a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        return torch.optim.AdamW([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 3e-4}])

    epochs, per_epoch = 5, 7
    ours = optimizer()
    scheduler = cosine_per_epoch(ours, num_training_steps=epochs * per_epoch, epochs=epochs, eta_min=1e-6)
    reference = optimizer()
    torch_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=epochs, eta_min=1e-6)
    for step in range(epochs * per_epoch):
        if step and step % per_epoch == 0:
            torch_scheduler.step()
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([g["lr"] for g in reference.param_groups],
                                                                     rel=1e-9, abs=1e-15), step
        ours.step()
        scheduler.step()
    torch_scheduler.step()  # after the last epoch both reach eta_min
    assert ours.param_groups[1]["lr"] == pytest.approx(reference.param_groups[1]["lr"]) == pytest.approx(1e-6)


TRAIN_CONFIGS = {  # name: (effective batch, report limit, decoding range, epochs), REFERENCE.md section 6
    "iuxray_shallow": (16, 60, (40, 100), 15), "iuxray_delta": (16, 60, (40, 100), 15),
    "iuxray_deep": (16, 60, (40, 100), 15), "mimic_shallow": (32, 100, (80, 120), 5),
    "mimic_delta": (32, 100, (80, 120), 5), "mimic_deep": (24, 100, (80, 120), 5)}


def tiny_overrides(data, out) -> list[str]:
    return ["llm_dir=unused", "vision_checkpoint=unused", f"data_dir={data}", f"output_dir={out}", "device=cpu",
            "dtype=fp32", "num_workers=0", "model._component_=medcap.models.builders.tiny_llama2_swin",
            "~model.llm_dir", "~model.vision_checkpoint", f"tokenizer.path={SENTENCEPIECE_MODEL}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAIN_CONFIGS))
def test_r2gengpt_training_configs_train_two_steps_with_the_published_settings(name, tmp_path, monkeypatch):
    """Each config with the tiny model of the family: two optimizer steps, then a validation decoded as at test."""
    from omegaconf import OmegaConf

    import medcap.validation
    from medcap import cli
    from tests.test_formats import write_r2gen_iuxray

    effective, limit, (min_new, max_new), epochs = TRAIN_CONFIGS[name]
    cfg = OmegaConf.load(f"configs/r2gengpt/{name}.yaml")
    assert cfg.batch_size * cfg.gradient_accumulation_steps == effective
    assert cfg.max_steps % epochs == 0 and cfg.lr_scheduler.epochs == epochs and cfg.lr_scheduler.eta_min == 1e-6
    assert cfg.optimizer.weight_decay == 0.01 and cfg.shuffle is True and cfg.dtype == "bf16"
    assert cfg.tokenizer.template == "r2gengpt" and cfg.dataset.max_answer_tokens == limit
    assert cfg.dataset.clean_report == ("r2gengpt" if name.startswith("mimic") else True)
    seen, real = [], medcap.validation.generate_batch

    def spy(model, tokenizer, batch, dtype, **decoding):
        seen.append((batch["tokens"][0].tolist(), decoding))
        return real(model, tokenizer, batch, dtype, **decoding)

    monkeypatch.setattr(medcap.validation, "generate_batch", spy)
    data = write_r2gen_iuxray(tmp_path / "data")
    annotation = json.loads((data / "annotation.json").read_text())  # 4 val studies: IU validates on all, MIMIC on 2
    annotation["val"] = [{**annotation["val"][0], "id": f"val-{n}"} for n in range(4)]
    (data / "annotation.json").write_text(json.dumps(annotation))
    cli.run_recipe("finetune", f"r2gengpt/{name}", tiny_overrides(data, tmp_path / "out") + [
        "batch_size=1", "max_steps=2", "eval_every=2", "save_every=2", "val_generation.batch_size=1"])
    assert len(seen) == (2 if name.startswith("mimic") else 4)
    tokens, decoding = seen[0]
    assert {k: decoding[k] for k in ("num_beams", "repetition_penalty", "length_penalty", "min_new_tokens",
                                     "max_new_tokens", "length_normalization", "penalize_prompt")} == {
        "num_beams": 3, "repetition_penalty": 2.0, "length_penalty": 2.0, "min_new_tokens": min_new,
        "max_new_tokens": max_new, "length_normalization": "hf_4_30", "penalize_prompt": False}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SENTENCEPIECE_MODEL))
    # without the image placeholders, the word-start marker of "</Img>" shows as a space
    assert sp.decode([t for t in tokens if t < 32000]).startswith("Human: <Img> </Img> Generate a comprehensive")
    assert (tmp_path / "out" / "checkpoints").is_dir()


def delta_model(seed):
    import torch

    from medcap.models import builders

    torch.manual_seed(0)  # the same frozen Swin and LLM (R2GenGPT's file holds neither)
    model = builders.tiny_llama2_swin(trainable={"encoder": "lora", "projector": "full", "decoder": "frozen"},
                                      lora={"encoder": {"rank": 4, "alpha": 4, "dropout": 0.1, "targets": ["q", "v"]}})
    torch.manual_seed(seed)
    with torch.no_grad():  # adapters and mapper of this seed; adapters that change the output (B starts at zero)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model.eval()


def r2gengpt_delta_state(model) -> dict:
    """The model's trainable parameters under R2GenGPT's names, as peft and its save_checkpoint wrote them."""
    state = {}
    for i, stage in enumerate(model.vision.encoder.model.layers):
        for j, block in enumerate(stage.blocks):
            qkv = block.attn.qkv
            for slot, which in zip(range(2), ("query", "value")):  # targets q (third 0) and v (third 2)
                prefix = f"visual_encoder.base_model.model.encoder.layers.{i}.blocks.{j}.attention.self.{which}"
                state[f"{prefix}.lora_A.default.weight"] = qkv.lora_a[slot].weight.detach().clone()
                state[f"{prefix}.lora_B.default.weight"] = qkv.lora_b[slot].weight.detach().clone()
    linear, norm = model.vision.projector
    state.update({"llama_proj.weight": linear.weight, "llama_proj.bias": linear.bias,
                  "layer_norm.weight": norm.weight, "layer_norm.bias": norm.bias})
    return {k: v.detach().clone() for k, v in state.items()}


def lightning_hparams(values: dict):
    """An object pickled as Lightning 2's AttributeDict (R2GenGPT's 'config' entry), without Lightning."""
    import sys
    import types

    names = ["lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"]
    assert not any(name in sys.modules for name in names)
    for name in names:  # pickle checks that it can import the class back
        sys.modules[name] = types.ModuleType(name)

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = names[-1], "AttributeDict"
    sys.modules[names[-1]].AttributeDict = AttributeDict
    return AttributeDict(values), names


def test_r2gengpt_delta_checkpoint_loads_into_the_delta_model_with_identical_outputs(tmp_path):
    import sys

    import torch

    from medcap.checkpoint import load_checkpoint

    source, target = delta_model(0), delta_model(1)
    images = torch.randn(2, 3, 64, 64)
    config, modules = lightning_hparams({"vis_use_lora": True, "vis_r": 4, "vis_alpha": 4, "global_only": False,
                                         "max_length": 100})
    path = tmp_path / "checkpoint_epoch4_step42310_bleu0.130000_cider0.250000.pth"
    try:
        torch.save({"model": r2gengpt_delta_state(source), "config": config, "epoch": 4, "step": 42310}, path)
    finally:
        for name in modules:
            del sys.modules[name]
    with torch.no_grad():
        assert not torch.allclose(source.vision(images), target.vision(images))
        decoder_before = {k: v.clone() for k, v in target.decoder.state_dict().items()}
        load_checkpoint(target, path)
        torch.testing.assert_close(target.vision(images), source.vision(images), rtol=0, atol=0)
        assert all(torch.equal(v, target.decoder.state_dict()[k]) for k, v in decoder_before.items())
        # a file in torch.save's pre-zip format cannot be memory-mapped: read whole, the same tensors
        torch.save({"model": r2gengpt_delta_state(source)}, tmp_path / "legacy.pth",
                   _use_new_zipfile_serialization=False)
        legacy = delta_model(1)
        load_checkpoint(legacy, tmp_path / "legacy.pth")
        torch.testing.assert_close(legacy.vision(images), source.vision(images), rtol=0, atol=0)
    # the options the file records are checked too: a scale the tensors cannot show
    other = delta_model(2)
    for module in other.modules():
        if hasattr(module, "lora_a"):
            module.alpha = 8
    with pytest.raises(ValueError, match="rank 4, alpha 4; the model's have rank 4, alpha 8"):
        load_checkpoint(other, path)


def test_r2gengpt_checkpoint_names_missing_and_surplus_keys_and_refuses_pickled_code(tmp_path):
    import torch

    from medcap.checkpoint import load_checkpoint

    model = delta_model(0)
    state = r2gengpt_delta_state(model)
    key = "visual_encoder.base_model.model.encoder.layers.2.blocks.0.attention.self.value.lora_B.default.weight"
    short = {k: v for k, v in state.items() if k != key}
    torch.save({"model": {**short, "visual_encoder.base_model.model.pooler.lora_A.default.weight": torch.zeros(1)}},
               tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        load_checkpoint(model, tmp_path / "bad.pth")
    message = str(error.value)
    assert "missing encoder.model.layers.2.blocks.0.attn.qkv.lora_b.1.weight" in message
    assert "surplus visual_encoder.base_model.model.pooler.lora_A.default.weight" in message
    # a shallow model trains no adapters: the file's adapters have nowhere to go
    from medcap.models import builders
    shallow = builders.tiny_llama2_swin(trainable={"encoder": "frozen", "projector": "full", "decoder": "frozen"})
    torch.save({"model": state}, tmp_path / "delta.pth")
    with pytest.raises(ValueError, match=r"surplus visual_encoder\.base_model.*no q adapter"):
        load_checkpoint(shallow, tmp_path / "delta.pth")

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    torch.save({"model": state, "config": Payload()}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="refused: the file holds more than tensors"):
        load_checkpoint(model, tmp_path / "code.pth")
    assert not (tmp_path / "ran").exists()


def test_published_delta_file_fits_the_mimic_delta_config(tmp_path):
    """The adapters r2gengpt/mimic_delta builds (rank 16, q and v of every Swin block) take a file written by
    R2GenGPT's delta run, key for key."""
    import torch
    from omegaconf import OmegaConf

    from medcap.checkpoint import load_checkpoint
    from medcap.models import builders

    cfg = OmegaConf.load("configs/r2gengpt/mimic_delta.yaml")

    def build(seed):
        torch.manual_seed(0)
        model = builders.tiny_llama2_swin(trainable=dict(cfg.model.trainable),
                                          lora=OmegaConf.to_container(cfg.model.lora),
                                          views_per_block=cfg.model.views_per_block).eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
        return model

    source, target = build(0), build(1)
    assert source.vision.encoder.model.layers[0].blocks[0].attn.qkv.lora_a[0].weight.shape[0] == 16
    torch.save({"model": r2gengpt_delta_state(source)}, tmp_path / "delta.pth")
    load_checkpoint(target, tmp_path / "delta.pth")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.vision(images), source.vision(images), rtol=0, atol=0)


def test_global_only_gives_swins_pooled_output_as_one_token():
    import torch

    from medcap.models import builders

    torch.manual_seed(0)
    patches = builders.tiny_llama2_swin().eval()
    pooled = builders.tiny_llama2_swin(global_only=True).eval()
    pooled.vision.encoder.load_state_dict(patches.vision.encoder.state_dict())
    assert (patches.tokens_per_image, pooled.tokens_per_image) == (4, 1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # timm's pooled output: the normed final feature map averaged, as transformers' pooler
        torch.testing.assert_close(pooled.vision.encoder(images), patches.vision.encoder(images).mean(1, keepdim=True))


def test_r2gengpt_deep_checkpoint_loads_transformers_swin_weights(tmp_path):
    """A deep-mode file holds every SwinModel parameter under visual_encoder.*: loaded into timm's Swin, the
    encoder gives transformers' last_hidden_state."""
    import torch
    import transformers

    from medcap.checkpoint import load_checkpoint
    from medcap.models import builders

    torch.manual_seed(3)
    swin = transformers.SwinModel(transformers.SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2,
        drop_path_rate=0.0)).eval()
    with torch.no_grad():
        for p in swin.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = builders.tiny_llama2_swin(trainable={"encoder": "full", "projector": "full", "decoder": "frozen"}).eval()
    linear, norm = model.vision.projector
    # the names transformers 4.30 gave SwinModel's parameters (save_pretrained writes them; buffers left out)
    from safetensors.torch import load_file

    swin.save_pretrained(tmp_path / "swin")
    saved = load_file(tmp_path / "swin" / "model.safetensors")
    state = {f"visual_encoder.{k}": v for k, v in saved.items() if not k.endswith("relative_position_index")}
    assert "visual_encoder.encoder.layers.0.blocks.0.attention.self.query.weight" in state
    state.update({"llama_proj.weight": torch.randn_like(linear.weight),
                  "llama_proj.bias": torch.randn_like(linear.bias), "layer_norm.weight": torch.randn_like(norm.weight), "layer_norm.bias": torch.randn_like(norm.bias)})
    torch.save({"model": state, "epoch": 2, "step": 300}, tmp_path / "deep.pth")
    load_checkpoint(model, tmp_path / "deep.pth")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.vision.encoder(images), swin(pixel_values=images).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(linear.weight, state["llama_proj.weight"]) and torch.equal(norm.bias, state["layer_norm.bias"])


def test_generate_takes_the_published_delta_file_as_checkpoint_with_no_overrides(tmp_path, monkeypatch):
    """r2gengpt/generate_mimic as it stands (no trainable / lora keys): the adapters are built from the file (rank
    from its tensors, alpha from its options) and loaded; the model then encodes as the run's did."""
    import sys

    import torch

    import medcap.generation
    from medcap import cli
    from tests.test_formats import write_r2gen_iuxray

    source = delta_model(0)
    config, modules = lightning_hparams({"vis_use_lora": True, "vis_r": 4, "vis_alpha": 4, "lora_dropout": 0.1,
                                         "global_only": False})
    try:
        torch.save({"model": r2gengpt_delta_state(source), "config": config}, tmp_path / "delta.pth")
    finally:
        for name in modules:
            del sys.modules[name]
    models, real = [], medcap.generation.generate

    def spy(model, *args, **kwargs):
        models.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(medcap.generation, "generate", spy)
    data = write_r2gen_iuxray(tmp_path / "data")
    overrides = [o for o in tiny_overrides(data, tmp_path / "out") if not o.startswith("output_dir")]
    cli.run_recipe("generate", "r2gengpt/generate_mimic", overrides + [
        f"checkpoint={tmp_path / 'delta.pth'}", f"output_dir={tmp_path / 'out'}", "max_new_tokens=4",
        "min_new_tokens=2"])
    model, = models
    assert model.trainable["encoder"] == "lora"
    # the frozen Swin comes from vision_checkpoint (here the recipe's own random one): give the source the same
    frozen = {k: v for k, v in model.vision.encoder.state_dict().items() if "lora_" not in k}
    source.vision.encoder.load_state_dict(frozen, strict=False)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.vision.projector(model.vision.encoder(images))
        theirs = source.vision.projector(source.vision.encoder(images))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (tmp_path / "out" / "predictions.csv").is_file()


def test_max_answer_tokens_cuts_the_report_and_keeps_the_end_token():
    from medcap.text import build_sample

    tok = llama2_tokenizer(str(SENTENCEPIECE_MODEL), template="r2gengpt")
    report = " . ".join(["the heart is normal in size"] * 20) + " ."
    full = build_sample(tok, PROMPT, report, 4, max_seq_len=1000)
    cut = build_sample(tok, PROMPT, report, 4, max_seq_len=1000, max_answer_tokens=60)
    prompt = tok.prompt_ids(PROMPT, 4)
    assert not full["truncated"] and len(full["tokens"]) - len(prompt) > 60
    assert cut["truncated"] and cut["tokens"] == prompt + tok.encode(report)[:59] + [tok.eos_id]
    assert cut["labels"][len(prompt):] == cut["tokens"][len(prompt):]


@pytest.mark.parametrize("encoder", ["frozen", "lora"])
def test_frozen_in_train_mode_puts_the_frozen_swin_in_train_mode_as_r2gengpt_did(encoder):
    import torch

    from medcap.models.builders import tiny_llama2_swin

    trainable = {"encoder": encoder, "projector": "full", "decoder": "frozen"}
    default = tiny_llama2_swin(trainable=trainable).train()
    assert not default.vision.encoder.training and not default.decoder.training and default.vision.projector.training
    seed_like = tiny_llama2_swin(trainable=trainable, frozen_in_train_mode=True).train()
    assert all(m.training for m in seed_like.modules())
    assert not any(m.training for m in seed_like.eval().modules())
    # what it changes: stochastic depth in the frozen Swin draws a new path each call in train mode only
    for block in seed_like.vision.encoder.modules():
        if type(block).__name__ == "DropPath":
            block.drop_prob = 0.5
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(seed_like.train().vision(images), seed_like.vision(images))
        assert torch.equal(seed_like.eval().vision(images), seed_like.vision(images))
