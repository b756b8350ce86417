"""The AUEB thesis pipeline as configured in configs/aueb: its prompts rendered from the configs against the
thesis' strings character for character; the Flan-T5 LM-Fuser (a tiny random T5 built by transformers) trained
through the shared core and fusing through ``fuse``; and every aueb/* config run, in the README's order, on tiny
random models in the published layouts (llava-hf, Llama-3.1-8B-Instruct, Flan-T5) and a tiny ImageCLEF folder."""

import csv
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import medcap.fuser
from medcap import cli
from medcap.data.dataset import collate_captions
from medcap.fuser import fuser_prompt, prompt_settings
from medcap.metrics import read_predictions
from medcap.retrieval import aueb_caption_cleanup
from medcap.seq2seq import BOUNDARY_ID, Seq2SeqLM, hf_seq2seq_lm, hf_seq2seq_tokenizer, seq2seq_sample
from medcap.synthesis import synthesis_prompt, synthesis_prompt_ids
from medcap.text import llama3_tokenizer
from medcap.text.vicuna import VicunaTokenizer
from medcap.training import caption_loss
from medcap.validation import normalized_edit_distance
from tests.test_tokenizers import LLAMA3_MODEL, SENTENCEPIECE_MODEL
from tests.test_fuser import write_run

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def aueb(name: str):
    return OmegaConf.load(ROOT / "configs" / "aueb" / f"{name}.yaml")


# --- the thesis' strings, as its public code builds them ---

THESIS_SFT_PROMPT = (
    "USER: <image>\n"
    "As a medical expert, please provide a detailed caption for the medical image showing "
    "[describe the content of the image, e.g., 'an MRI scan of the brain' or "
    "'a histopathology slide of lung tissue']. "
    "Include relevant observations, diagnoses if applicable, and any significant findings. "
    "Your caption should be clear and concise, aimed at aiding medical professionals in "
    "understanding the image's clinical significance?\n"
    "ASSISTANT: {caption}")
THESIS_INFERENCE_PROMPT = (
    "USER: <image>\n"
    "As an experienced medical professional, describe the content of the image along with the organ depicted and "
    "any important findings?\n"
    "ASSISTANT:")
THESIS_FEWSHOT_INSTRUCTION = "Provide a medical caption based on similar examples."
THESIS_FEWSHOT_FALLBACK = "Provide a detailed caption for this medical image."
THESIS_SYSTEM = "You are an experienced medical professional assistant."
THESIS_SYNTHESIS = (
    "In one concise sentence (up to 50 words), describe the content of the medical image {image}, "
    "specifying the imaging modality (e.g., X-ray, CT, ultrasonography, MRI etc), the organ or body part involved, "
    "and any significant findings or abnormalities. Additionally, incorporate relevant details from the neighboring "
    "caption: {neighbor} to refine and enhance the draft caption: "
    "{draft} "
    "Do not include any additional information that is not present in the image or the neighboring caption.")
THESIS_SYNTHESIS_FALLBACK = (
    "In one concise sentence (up to 50 words), describe the content of the medical image, "
    "specifying the imaging modality (e.g., X-ray, CT, ultrasonography, MRI etc.), the organ or body part involved, "
    "and any significant findings or abnormalities. Do not include any additional information that is not present "
    "in the image.")
THESIS_FUSER_TRAIN = (
    "Using the following three descriptions, generate a single, detailed, and coherent caption that captures the "
    "essence of all three while being more concise: "
    "1. {A} "
    "2. {B} "
    "3. {C}")
THESIS_FUSER_INFERENCE = THESIS_FUSER_TRAIN + (
    " Ensure that the final caption seamlessly integrates key elements from each description and maintains a clear "
    "and unified narrative.")
A, B, C = "CT of the chest with a nodule.", "Chest CT showing a lung nodule.", "Axial CT image of the thorax."


def vicuna(node) -> VicunaTokenizer:
    settings = {k: v for k, v in OmegaConf.to_container(node).items() if k not in ("_component_", "model_dir")}
    return VicunaTokenizer(SENTENCEPIECE_MODEL, 32000, 32001, **settings)


def test_sft_and_generate_prompts_are_the_thesis_strings():
    sft, gen = aueb("sft_qlora"), aueb("generate")
    tokenizer = vicuna(sft.tokenizer)
    caption = "Axial CT of the abdomen showing a 3 cm cyst."
    rendered = tokenizer.render_prompt(sft.dataset.prompt, 1) + tokenizer.render_answer(caption)
    assert rendered == THESIS_SFT_PROMPT.format(caption=caption)
    assert tokenizer.loss_on_prompt and not tokenizer.answer_eos  # the thesis' labels, kept as options
    assert sft.val_dataset.prompt == sft.dataset.prompt  # "${dataset.prompt}"
    assert vicuna(gen.tokenizer).render_prompt(gen.dataset.prompt, 1) == THESIS_INFERENCE_PROMPT
    assert (gen.num_beams, gen.max_new_tokens, gen.temperature) == (4, 300, 0.0)
    assert sft.dataset.max_seq_len == 300 - 1 + 576  # 300 with the image as one token, as the thesis counted
    assert (sft.optimizer.lr, sft.batch_size, sft.gradient_accumulation_steps, sft.clip_grad_norm) == (1e-4, 4, 8, 1.0)
    assert (sft.patience, sft.select_mode, dict(sft.val_generation.weights)) == (3, "min", {"EditDistance": 1.0})
    assert sft.max_steps == 30 * sft.eval_every


def test_fewshot_prompts_are_the_thesis_strings():
    cfg = aueb("knn_fewshot")
    assert (cfg.dataset.prompt, cfg.fallback_prompt) == (THESIS_FEWSHOT_INSTRUCTION, THESIS_FEWSHOT_FALLBACK)
    tokenizer = vicuna(cfg.tokenizer)
    # llava-hf's chat template renders the thesis' user turn [image, instruction] as:
    assert tokenizer.render_prompt(cfg.dataset.prompt, 1) == f"USER: <image>\n{THESIS_FEWSHOT_INSTRUCTION} ASSISTANT:"
    assert (cfg.k, cfg.max_new_tokens, cfg.num_beams, cfg.temperature, cfg.clean_captions) == (1, 100, 1, 0.0, "aueb")


def test_synthesizer_prompts_are_the_thesis_strings():
    cfg = aueb("synthesize")
    assert cfg.system.endswith("\n\n" + THESIS_SYSTEM)
    draft, neighbour = "Chest X-ray with an opacity.", "Frontal chest radiograph showing a right lower lobe opacity."
    text = synthesis_prompt(draft, [neighbour], cfg.num_neighbours, "unused", cfg.template, cfg.neighbour_line,
                            image="ImageCLEFmedical_Caption_2024_test_000001", fallback=cfg.fallback_template,
                            draft_turn=cfg.draft_turn)
    assert text == THESIS_SYNTHESIS.format(image="ImageCLEFmedical_Caption_2024_test_000001", neighbor=neighbour,
                                           draft=draft)
    alone = synthesis_prompt(draft, [], 1, "unused", cfg.template, cfg.neighbour_line, image="x",
                             fallback=cfg.fallback_template, draft_turn=True)
    assert alone == THESIS_SYNTHESIS_FALLBACK
    # the messages: system, the draft as a user turn, the instruction as a second user turn
    tokenizer = llama3_tokenizer(str(LLAMA3_MODEL))
    ids = synthesis_prompt_ids(tokenizer, text, draft, cfg.system, draft_turn=True)
    shown = tokenizer.decode(ids, skip_special_tokens=False)
    assert shown == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                     f"December 2023\nToday Date: 26 Jul 2024\n\n{THESIS_SYSTEM}<|eot_id|>"
                     f"<|start_header_id|>user<|end_header_id|>\n\n{draft}<|eot_id|>"
                     f"<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert (cfg.num_beams, cfg.max_new_tokens, cfg.threshold, cfg.model.quantize_base) == (4, 100, 0.90, True)


def test_fuser_prompts_are_the_thesis_strings():
    trained = prompt_settings(OmegaConf.to_container(aueb("train_fuser").prompt), "train_fuser")
    fused = prompt_settings(OmegaConf.to_container(aueb("fuse").prompt), "fuse")
    layout = lambda p: {k: p[k] for k in ("template", "candidate_line", "separator")}  # noqa: E731
    assert fuser_prompt([A, B, C], **layout(trained)) == THESIS_FUSER_TRAIN.format(A=A, B=B, C=C)
    assert fuser_prompt([A, B, C], **layout(fused)) == THESIS_FUSER_INFERENCE.format(A=A, B=B, C=C)
    cfg = aueb("train_fuser")
    assert (cfg.optimizer.lr, cfg.batch_size, cfg.epochs, cfg.max_seq_len, cfg.seed) == (1e-4, 2, 4, 300, 42)
    assert aueb("fuse").num_beams == 4 and aueb("fuse").early_stopping is True


def test_thesis_caption_cleanup_and_edit_distance():
    nltk = pytest.importorskip("nltk")
    raw = ("USER: ... ASSISTANT: 1. Chest X-ray shows an opacity. The heart is normal. "
           "Chest X-ray shows an opacity. The heart is normal.")
    # markers like "1. " go, and with them (the thesis' regex) each sentence's last word before a space
    assert aueb_caption_cleanup(raw) == "Chest X-ray shows an The heart is Chest X-ray shows an The heart is normal."
    assert aueb_caption_cleanup("A lesion. A lesion. ") == "A A lesion."  # the text is stripped first
    rng = random.Random(0)
    for _ in range(50):
        a = "".join(rng.choices("abc de", k=rng.randint(0, 12)))
        b = "".join(rng.choices("abc de", k=rng.randint(1, 12)))
        assert normalized_edit_distance(a, b) == pytest.approx(nltk.edit_distance(a, b) / max(len(a), len(b)))
    assert normalized_edit_distance("", "") == 0.0


# --- the Flan-T5 LM-Fuser, on a tiny random T5 written by transformers ---

WORDS = ("chest x ray ct scan of the abdomen shows a small nodule in left lung mri brain lesion right kidney normal "
         "study fracture distal radius ultrasound liver cyst with axial image thorax").split()


def write_t5_folder(folder: Path, seed: int = 0) -> None:
    """A tiny Flan-T5 as published: T5 v1.1 blocks (gated GELU, untied head), SentencePiece with pad 0, </s> 1,
    <unk> 2, trained here on caption words and the fuser prompts."""
    import sentencepiece

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
    lines += [THESIS_FUSER_INFERENCE.format(A="a", B="b", C="c")] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=200, model_type="unigram", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>", "model_max_length": 512}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1, dropout_rate=0.0)
    torch.manual_seed(seed)
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flan-t5-large")
    write_t5_folder(folder)
    return folder


def test_packed_rows_give_transformers_encoder_decoder_loss(t5_dir):
    tokenizer, model = hf_seq2seq_tokenizer(str(t5_dir)), hf_seq2seq_lm(str(t5_dir)).eval()
    samples = [seq2seq_sample(tokenizer, THESIS_FUSER_TRAIN.format(A=A, B=B, C=C), "chest ct with a nodule", 300, 300),
               seq2seq_sample(tokenizer, "a short source", "liver cyst on ultrasound of the abdomen", 300, 300)]
    batch = collate_captions([{"id": str(i), **s} for i, s in enumerate(samples)], pad_id=tokenizer.pad_id)
    with torch.no_grad():
        ours = caption_loss(model, {"tokens": batch["tokens"]}, batch["labels"])
        sources = [tokenizer.source_ids(THESIS_FUSER_TRAIN.format(A=A, B=B, C=C)),
                   tokenizer.source_ids("a short source")]
        targets = [tokenizer.target_ids("chest ct with a nodule"),
                   tokenizer.target_ids("liver cyst on ultrasound of the abdomen")]
        ids = torch.zeros(2, max(map(len, sources)), dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full((2, max(map(len, targets))), -100)
        for row, (s, t) in enumerate(zip(sources, targets)):
            ids[row, :len(s)], mask[row, :len(s)], labels[row, :len(t)] = torch.tensor(s), 1, torch.tensor(t)
        expected = model.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    cut = seq2seq_sample(tokenizer, "chest " * 50, "lung " * 50, 20, 8)
    assert cut["truncated"] and cut["tokens"].index(BOUNDARY_ID) == 20 and len(cut["tokens"]) == 29
    assert cut["tokens"][19] == tokenizer.eos_id and cut["tokens"][-1] == tokenizer.eos_id




FINDINGS = ["nodule in the left lung", "fracture of the distal radius", "cyst in the liver", "normal study"]
FUSER_IDS = [f"ImageCLEFmedical_Caption_2024_valid_{i:06d}" for i in range(12)]


@pytest.fixture(scope="module")
def trained_t5(t5_dir, tmp_path_factory):
    """aueb/train_fuser on the tiny T5: three runs over 12 validation IDs, the first right on half of them."""
    root = tmp_path_factory.mktemp("t5_fuser")
    gold = {k: f"ct scan shows a {FINDINGS[i % 4]}" for i, k in enumerate(FUSER_IDS)}
    runs = [write_run(root / "sft.csv", [(k, gold[k] if i % 2 == 0 else "ct scan shows a normal study")
                                         for i, k in enumerate(FUSER_IDS)]),
            write_run(root / "fewshot.csv", [(k, f"x ray of the {FINDINGS[(i + 1) % 4]}")
                                             for i, k in enumerate(FUSER_IDS)]),
            write_run(root / "synth.csv", [(k, "ct scan") for k in FUSER_IDS])]
    write_run(root / "data" / "valid_captions.csv", gold.items())
    prompts = []
    real = medcap.fuser.fuser_prompt
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(medcap.fuser, "fuser_prompt", lambda *a, **k: prompts.append(real(*a, **k)) or prompts[-1])
        cli.run_recipe("train_fuser", "aueb/train_fuser", [
            f"fuser_dir={t5_dir}", f"data_dir={root / 'data'}", f"candidates=[{','.join(map(str, runs))}]",
            f"output_dir={root / 'fuser'}", "device=cpu", "epochs=null", "max_steps=40", "batch_size=4", "holdout=2",
            "eval_every=10", "save_every=null", "metric_logger=null", "optimizer.lr=3e-3"])
    return root, runs, gold, prompts


def test_flan_t5_fuser_loss_falls_and_fuse_writes_captions(trained_t5, t5_dir, monkeypatch):
    root, runs, gold, train_prompts = trained_t5
    history = json.loads((root / "fuser" / "train_summary.json").read_text())["history"]
    losses = [h["loss"] for h in history]
    print("tiny Flan-T5 fuser loss by step:", " ".join(f"{x:.3f}" for x in losses))
    print("validation loss:", [(h["step"], round(h["val_loss"], 3)) for h in history if "val_loss" in h])
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    val = [h["val_loss"] for h in history if "val_loss" in h]
    assert len(val) == 4 and val[-1] < val[0]
    # linear decay; each step logs the rate it trained with
    assert history[0]["lr"] == pytest.approx(3e-3) and history[-1]["lr"] == pytest.approx(3e-3 / 40)
    assert train_prompts[0].startswith("Using the following three descriptions") and " 2. " in train_prompts[0]
    saved = OmegaConf.load(root / "fuser" / "checkpoints" / "step_000040" / "config.yaml")
    assert saved.prompt.template == aueb("train_fuser").prompt.template and saved.max_steps == 40

    seen = []
    real = medcap.fuser.fuser_prompt
    monkeypatch.setattr(medcap.fuser, "fuser_prompt", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    cli.run_recipe("fuse", "aueb/fuse", [f"fuser_dir={t5_dir}", f"checkpoint={root / 'fuser' / 'checkpoints'}",
                                         f"candidates=[{','.join(map(str, runs))}]", f"output_dir={root / 'fused'}",
                                         "device=cpu", "max_new_tokens=12", "batch_size=5"])
    fused = read_predictions(root / "fused" / "predictions.csv")
    assert list(fused) == FUSER_IDS and all(seen_prompt.endswith("unified narrative.") for seen_prompt in seen)
    right = sum(fused[k] == gold[k] for k in FUSER_IDS)
    print(f"fused captions equal to the gold one: {right} of {len(FUSER_IDS)}")
    assert right >= 6  # the fuser learned at least to copy the first run where it is right


def test_fuser_checkpoint_reloads_and_fuse_reads_only_plain_data_from_it(trained_t5, t5_dir, tmp_path):
    root, runs, _, _ = trained_t5
    checkpoint = root / "fuser" / "checkpoints" / "step_000040"
    cfg = OmegaConf.create({"model": {"_component_": "medcap.seq2seq.hf_seq2seq_lm", "model_dir": str(t5_dir),
                                      "trainable": "frozen"},
                            "tokenizer": {"_component_": "medcap.seq2seq.hf_seq2seq_tokenizer",
                                          "model_dir": str(t5_dir)}})
    reloaded, tokenizer = medcap.fuser.text_lm_and_tokenizer(cfg, torch.device("cpu"), torch.float32, checkpoint)
    fresh, _ = medcap.fuser.text_lm_and_tokenizer(cfg, torch.device("cpu"), torch.float32)
    assert isinstance(reloaded, Seq2SeqLM)
    row = torch.tensor([seq2seq_sample(tokenizer, "ct scan", "ct scan shows a cyst", 300, 300)["tokens"]])
    with torch.no_grad():
        assert not torch.allclose(reloaded.eval()(row), fresh.eval()(row))

    # a checkpoint whose config.yaml would run code: refused, nothing executed
    evil = tmp_path / "evil"
    shutil.copytree(checkpoint, evil)
    marker = tmp_path / "executed"
    (evil / "config.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\nprompt: null\n")
    overrides = [f"fuser_dir={t5_dir}", f"checkpoint={evil}", f"candidates=[{','.join(map(str, runs))}]",
                 f"output_dir={tmp_path / 'out'}", "device=cpu", "~prompt"]
    with pytest.raises(ValueError, match=r"evil/config.yaml: not plain YAML data"):
        cli.run_recipe("fuse", "aueb/fuse", overrides)
    assert not marker.exists()
    # the model comes from the command's config, which must be the one trained
    (evil / "config.yaml").write_text("model: {_component_: subprocess.call, args: [touch, x]}\n"
                                      "candidates: [a, b, c]\n")
    with pytest.raises(ValueError, match=r"trained as 'subprocess.call', but this config builds "
                                         r"'medcap.seq2seq.hf_seq2seq_lm'"):
        cli.run_recipe("fuse", "aueb/fuse", overrides)
    (evil / "config.yaml").write_text("model: {_component_: medcap.seq2seq.hf_seq2seq_lm}\nprompt: {template: 7}\n")
    with pytest.raises(ValueError, match=r"config.yaml: prompt.template must be a string, found int 7"):
        cli.run_recipe("fuse", "aueb/fuse", overrides)


# --- every aueb config, in the README's order, on tiny models in the published layouts ---

def write_imageclef(root: Path) -> dict[str, dict[str, str]]:
    """ImageCLEFmedical caption 2024's layout: {split}_captions.csv (ID,Caption) and {split}/<ID>.jpg."""
    rng = np.random.default_rng(0)
    captions = {}
    for split, count in (("train", 6), ("valid", 4), ("test", 3)):
        (root / split).mkdir(parents=True)
        rows = {}
        for i in range(count):
            image_id = f"ImageCLEFmedical_Caption_2024_{split}_{i + 1:06d}"
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"{image_id}.jpg")
            rows[image_id] = f"CT of the chest showing a {FINDINGS[i % 4]}."
        with (root / f"{split}_captions.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "Caption"])
            writer.writerows(rows.items())
        captions[split] = rows
    return captions


@pytest.fixture(scope="module")
def pipeline(t5_dir, tmp_path_factory):
    from tests.test_layouts import LLAMA3_1_8B_INSTRUCT, TINY_LLAMA, llama3_folder
    from tests.test_llava_hf import write_llava_folder

    root = tmp_path_factory.mktemp("aueb_pipeline")
    llava = root / "llava-1.5-7b-hf"
    llava.mkdir()
    write_llava_folder(llava)
    llama, _ = llama3_folder(tmp_path_factory, "Llama-3.1-8B-Instruct", {**LLAMA3_1_8B_INSTRUCT, **TINY_LLAMA})
    data = root / "imageclef"
    captions = write_imageclef(data)
    out = root / "outputs"
    cpu = ["device=cpu", "dtype=fp32"]
    common = [f"model_dir={llava}", f"data_dir={data}", *cpu]

    def run(recipe: str, config: str, *overrides: str) -> None:
        cli.run_recipe(recipe, f"aueb/{config}", list(overrides))

    run("finetune", "sft_qlora", *common, f"output_dir={out / 'sft'}", "batch_size=2", "gradient_accumulation_steps=1",
        "max_steps=4", "eval_every=2", "save_every=2", "eval_max_batches=1", "num_workers=0",
        "val_generation.max_new_tokens=6", "val_generation.batch_size=2")
    for split in ("valid", "test"):  # the valid runs are what the fuser learns from
        run("generate", "generate", *common, f"checkpoint={out / 'sft' / 'checkpoints' / 'best'}",
            f"output_dir={out / 'sft_captions' / split}", f"dataset.split={split}", "max_new_tokens=5",
            "batch_size=2", "num_workers=0")
    run("build_index", "build_index", *common, f"output_dir={out / 'index'}", "batch_size=4", "num_workers=0")
    for split in ("valid", "test"):
        run("knn_fewshot", "knn_fewshot", *common, f"index_dir={out / 'index'}", f"dataset.split={split}",
            f"output_dir={out / 'knn_fewshot' / split}", "threshold=null", "max_new_tokens=5", "batch_size=2",
            "num_workers=0")
        run("synthesize", "synthesize", f"llm_dir={llama}", f"data_dir={data}", *cpu, f"index_dir={out / 'index'}",
            f"drafts={out / 'sft_captions' / split / 'predictions.csv'}", f"dataset.split={split}",
            f"output_dir={out / 'synthesize' / split}", "threshold=null", "max_new_tokens=5", "batch_size=4")
    candidates = lambda split: "candidates=[" + ",".join(  # noqa: E731
        str(out / run / split / "predictions.csv") for run in ("sft_captions", "knn_fewshot", "synthesize")) + "]"
    run("train_fuser", "train_fuser", f"fuser_dir={t5_dir}", f"data_dir={data}", *cpu, candidates("valid"),
        f"output_dir={out / 'fuser'}", "epochs=null", "max_steps=2", "holdout=1", "eval_every=2", "metric_logger=null")
    run("fuse", "fuse", f"fuser_dir={t5_dir}", *cpu, candidates("test"), f"checkpoint={out / 'fuser' / 'checkpoints'}",
        f"output_dir={out / 'fuse'}", "max_new_tokens=6")
    cli.run_recipe("evaluate", "eval/imageclef", [f"predictions={out / 'fuse' / 'predictions.csv'}",
                                                  f"references={data / 'test_captions.csv'}", "bertscore=false",
                                                  "bootstrap=10", f"output_dir={out / 'evaluate'}"])
    return out, captions


def test_every_aueb_config_runs_in_the_readme_order(pipeline):
    out, captions = pipeline
    test_ids = list(captions["test"])
    summary = json.loads((out / "sft" / "train_summary.json").read_text())
    evaluated = [h for h in summary["history"] if "val_score" in h]
    assert len(evaluated) == 2 and all(h["val_score"] == h["val_EditDistance"] for h in evaluated)
    assert all(0.0 <= h["val_EditDistance"] <= 1.0 for h in evaluated)
    assert (out / "sft" / "checkpoints" / "best" / "model.safetensors").is_file()
    for run in ("sft_captions/test", "knn_fewshot/test", "synthesize/test", "fuse"):
        assert list(read_predictions(out / run / "predictions.csv")) == test_ids, run
    assert list(read_predictions(out / "synthesize" / "valid" / "predictions.csv")) == list(captions["valid"])
    meta = json.loads((out / "index" / "meta.json").read_text())
    assert meta["count"] == 10 and "train" in meta["dataset"] and "valid" in meta["dataset"]
    neighbours = (out / "knn_fewshot" / "valid" / "neighbours.csv").read_text().splitlines()[1:]
    assert len(neighbours) == 4 and all(row.split(",")[0] != row.split(",")[2] for row in neighbours)  # never itself
    assert (out / "knn_fewshot" / "test" / "raw_predictions.csv").is_file()  # the thesis' clean-up was applied
    lines = (out / "synthesize" / "test" / "synthesis.jsonl").read_text().splitlines()
    synthesis = [json.loads(line) for line in lines]
    assert all(s["prompt"].startswith("In one concise sentence") and f"image {s['id']}," in s["prompt"]
               for s in synthesis)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert {"ROUGE-1", "ROUGE-L", "BLEU-1"} <= set(metrics)


# --- the options the aueb configs use, one by one ---

def test_fewshot_fallback_prompt_for_images_without_neighbours():
    from recipes.knn_fewshot import FewShotPrompts
    from medcap.retrieval import Neighbour

    tokenizer = VicunaTokenizer(SENTENCEPIECE_MODEL, 32000, 32001)
    samples = [{"id": "q1", "prompt": None, "images": ["q1.jpg"]}, {"id": "q2", "prompt": None, "images": ["q2.jpg"]}]
    found = [[Neighbour("n1", "Chest X-ray.", ["n1.jpg"], 0.95, 0)], []]
    prompts = FewShotPrompts(samples, found, tokenizer, None, lambda paths, what: 4 * len(paths),
                             THESIS_FEWSHOT_INSTRUCTION, "turns", None, "", "", 10_000,
                             fallback_prompt=THESIS_FEWSHOT_FALLBACK)
    assert prompts.prompts[1] == tokenizer.prompt_ids(THESIS_FEWSHOT_FALLBACK, 4)
    assert prompts.prompts[0] == (tokenizer.prompt_ids(THESIS_FEWSHOT_INSTRUCTION, 4) + tokenizer.answer_ids(
        "Chest X-ray.") + tokenizer.followup_ids(THESIS_FEWSHOT_INSTRUCTION, 4))


def test_synthesis_templates_and_the_draft_turn_are_checked():
    from medcap.synthesis import check_template
    from medcap.text import smollm2_tokenizer

    with pytest.raises(ValueError, match=r"template must contain \{neighbours\}"):
        check_template("Rewrite {draft}.")
    check_template("Use {neighbours}.", draft_turn=True)  # the draft comes in its own turn
    with pytest.raises(ValueError, match=r"fallback template must contain \{draft\}"):
        check_template("Describe the image.", fallback=True)
    assert synthesis_prompt("d", ["x", "y"], 2, "I.", "{instruction} {neighbours} {draft}") == "I. 1. x\n2. y d"
    with pytest.raises(ValueError, match="draft_turn=true .* the tokenizer is SmolLM2Tokenizer"):
        synthesis_prompt_ids(smollm2_tokenizer(), "text", "draft", None, draft_turn=True)


def test_nf4_synthesizer_lm_keeps_its_outputs(tmp_path_factory):
    from medcap.fuser import hf_llama_lm
    from medcap.models.lora import NF4Linear
    from tests.test_layouts import LLAMA3_1_8B_INSTRUCT, TINY_LLAMA, llama3_folder

    folder, _ = llama3_folder(tmp_path_factory, "Llama-3.1-8B-nf4", {**LLAMA3_1_8B_INSTRUCT, **TINY_LLAMA})
    full, nf4 = hf_llama_lm(str(folder), trainable="frozen"), hf_llama_lm(str(folder), trainable="frozen",
                                                                          quantize_base=True)
    assert sum(isinstance(m, NF4Linear) for m in nf4.modules()) == 2 * 7  # every linear of both layers
    tokens = torch.tensor([[128000, 791, 4062, 374, 2867]])
    with torch.no_grad():
        before = full(tokens)
        for name, layer in nf4.named_modules():  # the full model with each weight rounded through NF4
            if isinstance(layer, NF4Linear):
                full.get_submodule(name).weight.copy_(layer.weight.get_original_weight())
        assert torch.allclose(nf4(tokens), full(tokens), atol=1e-5) and not torch.allclose(nf4(tokens), before)
    with pytest.raises(ValueError, match="set trainable to frozen"):
        hf_llama_lm(str(folder), trainable="full", quantize_base=True)


def test_caption_sets_join_splits_and_refuse_an_id_twice(tmp_path):
    from medcap.retrieval import CaptionSets

    data = tmp_path / "imageclef"
    captions = write_imageclef(data)
    node = lambda split: {"_component_": "medcap.data.dataset.CaptionDataset", "format": "imageclef",  # noqa: E731
                          "data_dir": str(data), "split": split}
    sets = CaptionSets([node("train"), node("valid")])
    assert [s["id"] for s in sets.samples] == list(captions["train"]) + list(captions["valid"])
    with pytest.raises(ValueError, match=r"ID 'ImageCLEFmedical_Caption_2024_train_000001' is in imageclef:train "
                                         r"and in imageclef:train"):
        CaptionSets([node("train"), node("train")])
