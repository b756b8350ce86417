"""LM-Fuser: merging runs by ID, the one prompt of training and fusing, labels on the target only, training with
the shared core, checkpoints that reload exactly, and the text-only LM under medcap's generation."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import medcap.fuser
import medcap.training
from medcap import cli
from medcap.data.dataset import collate_captions
from medcap.fuser import (FuserDataset, TextLM, fuser_prompt, fuser_prompt_ids, fuser_sample, generate_texts,
                          merge_runs, prompt_settings, split_ids, text_lm_and_tokenizer, tiny_smollm2_lm)
from medcap.generation import generate
from medcap.metrics import read_predictions
from medcap.text import IGNORE_INDEX, smollm2_tokenizer
from medcap.training import caption_loss

ROOT = Path(__file__).resolve().parent.parent


def write_run(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "caption"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


# --- merging runs ---

def test_merge_keeps_the_first_runs_order_and_aligns_captions(tmp_path):
    a = write_run(tmp_path / "a.csv", [("x", "a-x"), ("y", "a-y"), ("z", "a-z")])
    b = write_run(tmp_path / "b.csv", [("z", "b-z"), ("x", "b-x"), ("y", "b-y")])
    c = write_run(tmp_path / "c.csv", [("y", "c-y"), ("z", "c-z"), ("x", "")])
    ids, candidates = merge_runs([a, b, c])
    assert ids == ["x", "y", "z"]
    assert candidates == {"x": ["a-x", "b-x", ""], "y": ["a-y", "b-y", "c-y"], "z": ["a-z", "b-z", "c-z"]}


def test_merge_errors_name_the_file_and_the_id(tmp_path):
    a = write_run(tmp_path / "a.csv", [("x", "1"), ("y", "2")])
    missing = write_run(tmp_path / "missing.csv", [("x", "1")])
    with pytest.raises(ValueError, match=r"missing\.csv: ID 'y' \(in .*a\.csv\) is missing"):
        merge_runs([a, missing])
    extra = write_run(tmp_path / "extra.csv", [("x", "1"), ("y", "2"), ("w", "3")])
    with pytest.raises(ValueError, match=r"extra\.csv: ID 'w' is not in .*a\.csv"):
        merge_runs([a, extra])
    duplicate = write_run(tmp_path / "dup.csv", [("x", "1"), ("y", "2"), ("x", "3")])
    with pytest.raises(ValueError, match=r"dup\.csv: line 4: duplicate ID 'x'"):
        merge_runs([a, duplicate])
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        merge_runs([a, tmp_path / "nowhere.csv"])


# --- the prompt and the labels ---

def test_prompt_lists_the_candidates_in_run_order():
    text = fuser_prompt(["first  caption\n", "second"], instruction="Fuse these.")
    assert text == "Fuse these.\n\nCaption 1: first caption\nCaption 2: second"


def test_training_sample_starts_with_exactly_the_inference_prompt(tokenizer):
    candidates = ["Chest radiograph with a nodule.", "Chest radiograph, normal.", "CT of the head."]
    prompt = fuser_prompt_ids(tokenizer, candidates, "Fuse.", system="Be brief.")
    sample = fuser_sample(tokenizer, candidates, "Chest radiograph with a nodule in the right lung.", 256,
                          "Fuse.", system="Be brief.")
    assert sample["tokens"][:len(prompt)] == prompt
    shown = tokenizer.decode(prompt, skip_special_tokens=False)
    assert shown.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFuse.\n\nCaption 1: ")
    assert shown.endswith("Caption 3: CT of the head.<|im_end|>\n<|im_start|>assistant\n")


def test_labels_cover_the_target_and_its_end_of_turn_only(tokenizer):
    target = "Chest radiograph with a nodule."
    sample = fuser_sample(tokenizer, ["a", "b"], target, 256, "Fuse.")
    prompt_len = len(fuser_prompt_ids(tokenizer, ["a", "b"], "Fuse."))
    # the prompt by hand: <|im_start|>user\n, the user text, <|im_end|>\n, <|im_start|>assistant\n
    hand = ([tokenizer.im_start_id] + tokenizer.encode("user\n")
            + tokenizer.encode("Fuse.\n\nCaption 1: a\nCaption 2: b") + [tokenizer.im_end_id] + tokenizer.encode("\n")
            + [tokenizer.im_start_id] + tokenizer.encode("assistant\n"))
    assert prompt_len == len(hand) and sample["tokens"][:prompt_len] == hand
    target_ids = tokenizer.encode(target) + [tokenizer.im_end_id]
    assert sample["labels"] == [IGNORE_INDEX] * prompt_len + target_ids
    assert tokenizer.decode(sample["labels"][prompt_len:], skip_special_tokens=False) == target + "<|im_end|>"

    short = fuser_sample(tokenizer, ["a"], "x", 256, "Fuse.")
    batch = collate_captions([{"id": "1", **sample}, {"id": "2", **short}], pad_id=tokenizer.pad_id)
    assert batch["tokens"].shape == batch["labels"].shape == (2, len(sample["tokens"]))
    assert "images" not in batch
    labelled = (batch["labels"] != IGNORE_INDEX).nonzero().tolist()
    short_start = len(short["tokens"]) - 2  # "x" is one token, then <|im_end|>
    assert labelled == ([[0, i] for i in range(prompt_len, prompt_len + len(target_ids))]
                        + [[1, short_start], [1, short_start + 1]])
    # the loss counts exactly the target tokens (next-token prediction shifts labels by one)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == len(target_ids) + 2
    uniform = lambda tokens, output_at: torch.zeros(int(output_at.sum()), 49152)  # noqa: E731
    assert caption_loss(uniform, {"tokens": batch["tokens"]}, batch["labels"]).item() == pytest.approx(torch.log(torch.tensor(49152.0)).item())


def test_dataset_needs_a_reference_per_id_and_names_prompts_that_do_not_fit(tokenizer):
    candidates = {"x": ["a", "b"], "y": ["c", "d"]}
    data = FuserDataset(tokenizer, candidates, {"x": ["gold x"], "y": ["gold y", "other y"]}, 128)
    assert [s["id"] for s in data.samples] == ["x", "y", "y"]
    with pytest.raises(ValueError, match=r"refs\.jsonl: no reference caption for ID 'y'"):
        FuserDataset(tokenizer, candidates, {"x": ["gold"]}, 128, references_file="refs.jsonl")
    with pytest.raises(ValueError, match=r"ID 'x': the prompt needs \d+ tokens"):
        FuserDataset(tokenizer, {"x": ["word " * 50]}, {"x": ["gold"]}, 32)


def test_split_ids_holds_out_a_seeded_share_in_order():
    ids = [f"id{i}" for i in range(10)]
    train, held = split_ids(ids, 3, seed=0)
    assert len(held) == 3 and sorted(train + held) == sorted(ids)
    assert held == [i for i in ids if i in held] and split_ids(ids, 3, seed=0) == (train, held)
    assert split_ids(ids, 0, seed=0) == (ids, [])
    with pytest.raises(ValueError, match="holdout=10"):
        split_ids(ids, 10, seed=0)


# --- the text-only LM under medcap's generation ---

def test_text_lm_generates_with_and_without_the_kv_cache(tokenizer):
    model = tiny_smollm2_lm(seed=0).eval()
    prompts = [fuser_prompt_ids(tokenizer, ["a chest radiograph"], "Fuse."),
               fuser_prompt_ids(tokenizer, ["a much longer caption of a head CT with a lesion"], "Fuse.")]
    settings = dict(max_new_tokens=6, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    cached = generate(model, prompts, None, **settings)
    assert cached == generate(model, prompts, None, use_cache=False, **settings)
    assert [len(ids) for ids in cached] == [6, 6]  # a random model does not stop early (checked: no stop ids)
    assert not model.caches_are_setup()
    # left padding must not change a prompt's continuation
    assert generate(model, prompts[:1], None, **settings) == cached[:1]
    with pytest.raises(ValueError, match="takes no images"):
        model(torch.tensor([prompts[0]]), encoder_input={"image": {}})


def test_text_lm_freezes_or_trains_the_decoder():
    frozen = tiny_smollm2_lm(trainable="frozen")
    assert frozen.trainable == {"decoder": "frozen"} and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in tiny_smollm2_lm().parameters())
    with pytest.raises(ValueError, match="trainable='lora'"):
        TextLM(frozen.decoder, "lora")


# --- the recipes ---

IDS = [f"img{i}" for i in range(12)]
FINDINGS = ["nodule", "fracture", "effusion", "no abnormality"]


def gold(i: int) -> str:
    return f"Chest radiograph with {FINDINGS[i % 4]}."


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three candidate runs over 12 IDs (the first is right on every other ID) and the gold captions."""
    root = tmp_path_factory.mktemp("runs")
    files = [write_run(root / "good.csv", [(k, gold(i) if i % 2 == 0 else gold(i + 1)) for i, k in enumerate(IDS)]),
             write_run(root / "shuffled.csv", [(k, gold(i + 2)) for i, k in reversed(list(enumerate(IDS)))]),
             write_run(root / "blind.csv", [(k, "Chest radiograph.") for k in IDS])]
    references = root / "refs.jsonl"
    references.write_text("".join(json.dumps({"id": k, "caption": gold(i)}) + "\n" for i, k in enumerate(IDS)))
    return files, references


def tiny_config(tmp_path: Path, name: str, **changes) -> Path:
    """The demo config with the tiny random LM (same tokenizer) and ``changes`` applied, as a file."""
    cfg = OmegaConf.load(ROOT / "configs" / "demo" / f"{name}.yaml")
    cfg.model = {"_component_": "medcap.fuser.tiny_smollm2_lm", "max_seq_len": 256, "seed": 0,
                 "trainable": cfg.model.trainable}
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(cfg, path)
    return path


@pytest.fixture(scope="module")
def trained(runs, tmp_path_factory):
    """train_fuser on the tiny LM: (output dir, the model object the training core trained, prompts seen)."""
    files, references = runs
    out = tmp_path_factory.mktemp("fuser")
    config = tiny_config(out, "train_fuser", output_dir=str(out), candidates=[str(f) for f in files],
                         references=str(references), holdout=2, batch_size=4, max_steps=15, eval_every=5,
                         **{"optimizer.lr": 3e-3, "lr_scheduler.num_warmup_steps": 0,
                            "prompt.instruction": "Fuse the captions.", "metric_logger": None})
    captured, prompts = {}, []
    real_train, real_prompt = medcap.training.train, medcap.fuser.fuser_prompt

    def spy_train(model, *args, **kwargs):
        captured["model"] = model
        return real_train(model, *args, **kwargs)

    def spy_prompt(*args, **kwargs):
        prompts.append(real_prompt(*args, **kwargs))
        return prompts[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(medcap.training, "train", spy_train)
        patch.setattr(medcap.fuser, "fuser_prompt", spy_prompt)
        cli.run_recipe("train_fuser", str(config), [])
    return out, captured["model"], prompts


def test_a_resumed_fuser_run_refuses_other_references(trained, runs, tmp_path):
    from medcap.checkpoint import CheckpointError

    files, references = runs
    out = trained[0]
    other = tmp_path / "refs.jsonl"  # the same IDs, one gold caption changed: other targets
    lines = references.read_text().splitlines()
    other.write_text("\n".join([json.dumps({**json.loads(lines[0]), "caption": "Axial CT."}), *lines[1:]]) + "\n")
    common = dict(output_dir=str(out), candidates=[str(f) for f in files], holdout=2, batch_size=4, max_steps=16,
                  resume_from="auto", **{"prompt.instruction": "Fuse the captions.", "metric_logger": None})
    with pytest.raises(CheckpointError, match=r"its run trained on other samples \(10 samples, sha256 "):
        cli.run_recipe("train_fuser", str(tiny_config(tmp_path, "train_fuser", references=str(other), **common)), [])
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))[-1] == "step_000015"


def test_fuser_training_loss_falls_and_checkpoints_the_whole_lm(trained):
    out, model, _ = trained
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    val = [h["val_loss"] for h in summary["history"] if "val_loss" in h]
    assert len(val) == 3 and val[-1] < val[0]
    checkpoint = out / "checkpoints" / "step_000015"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["trainable"]) == {"decoder": "full"}
    assert keys == {f"decoder.{k}" for k in model.decoder.state_dict()}
    saved = OmegaConf.load(checkpoint / "config.yaml")
    assert saved.prompt.instruction == "Fuse the captions." and len(saved.candidates) == 3
    assert (out / "loss_curve.png").is_file()


def test_fuser_checkpoint_reloads_to_identical_logits(trained):
    out, model, _ = trained
    cfg = OmegaConf.load(out / "checkpoints" / "step_000015" / "config.yaml")
    cfg.model.seed = 1  # a different random start: every weight must come from the checkpoint
    reloaded, tokenizer = text_lm_and_tokenizer(cfg, torch.device("cpu"), torch.float32,
                                                checkpoint=out / "checkpoints")
    tokens = torch.tensor([fuser_prompt_ids(tokenizer, ["a", "b", "c"], "Fuse the captions.")])
    model.eval()
    with torch.no_grad():
        fresh = tiny_smollm2_lm(seed=1)(tokens)
        assert not torch.equal(fresh, model(tokens))
        assert torch.equal(reloaded.eval()(tokens), model(tokens))


def test_fuse_uses_the_training_prompt_and_writes_every_id_once(trained, runs, tmp_path, monkeypatch):
    out, _, train_prompts = trained
    files, _ = runs
    seen = []
    real_prompt = medcap.fuser.fuser_prompt
    monkeypatch.setattr(medcap.fuser, "fuser_prompt", lambda *a, **k: seen.append(real_prompt(*a, **k)) or seen[-1])
    config = tiny_config(tmp_path, "fuse", output_dir=str(tmp_path / "fused"), checkpoint=str(out / "checkpoints"),
                         candidates=[str(f) for f in files], max_new_tokens=4, batch_size=5)
    cli.run_recipe("fuse", str(config), [])
    assert len(seen) == len(IDS)
    # each ID's prompt at inference is exactly its prompt in training (10 IDs trained, 2 held out)
    assert len(train_prompts) == len(IDS) and sorted(seen) == sorted(train_prompts)
    assert all(p.startswith("Fuse the captions.\n\nCaption 1: ") for p in seen)
    fused = read_predictions(tmp_path / "fused" / "predictions.csv")
    assert list(fused) == IDS

    two = tiny_config(tmp_path, "fuse", checkpoint=str(out / "checkpoints"), candidates=[str(f) for f in files[:2]])
    with pytest.raises(ValueError, match="trained on 3 candidate runs but candidates lists 2"):
        cli.run_recipe("fuse", str(two), [])


# --- the real-weight configs, on a tiny random folder in the published Llama 3.2 layout ---

@pytest.mark.slow
def test_aueb_configs_run_on_a_tiny_llama_folder(runs, tmp_path_factory):
    from tests.test_layouts import LLAMA3_2_1B_INSTRUCT, TINY_LLAMA, llama3_folder

    llm_dir, _ = llama3_folder(tmp_path_factory, "Llama-3.2-1B-Instruct",
                               {**LLAMA3_2_1B_INSTRUCT, **TINY_LLAMA, "head_dim": 8})
    files, references = runs
    data_dir = tmp_path_factory.mktemp("imageclef")
    write_run(data_dir / "valid_captions.csv", [(k, gold(i)) for i, k in enumerate(IDS)])
    out = tmp_path_factory.mktemp("aueb")
    common = {"llm_dir": str(llm_dir), "device": "cpu", "dtype": "fp32", "candidates": [str(f) for f in files]}

    def config(name: str, **changes) -> str:
        cfg = OmegaConf.load(ROOT / "configs" / "aueb" / f"{name}.yaml")
        for key, value in {**common, **changes}.items():
            OmegaConf.update(cfg, key, value, merge=False)
        OmegaConf.save(cfg, out / f"{name}.yaml")
        return str(out / f"{name}.yaml")

    cli.run_recipe("train_fuser", config("train_fuser_decoder", data_dir=str(data_dir), output_dir=str(out / "fuser"),
                                         holdout=2, batch_size=2, gradient_accumulation_steps=1, max_steps=3,
                                         eval_every=3, save_every=None, metric_logger=None,
                                         **{"lr_scheduler.num_warmup_steps": 0}), [])
    history = json.loads((out / "fuser" / "train_summary.json").read_text())["history"]
    assert len(history) == 3 and "val_loss" in history[-1]
    cli.run_recipe("fuse", config("fuse_decoder", output_dir=str(out / "fuse"), checkpoint=str(out / "fuser" / "checkpoints"),
                                  batch_size=5, max_new_tokens=3, num_beams=2), [])
    assert list(read_predictions(out / "fuse" / "predictions.csv")) == IDS

    neighbours = out / "neighbours.jsonl"
    neighbours.write_text("".join(json.dumps({"id": k, "neighbours": [gold(i + 1)]}) + "\n" for i, k in enumerate(IDS)))
    cli.run_recipe("synthesize", config("synthesize", data_dir=str(data_dir), drafts=str(files[0]),
                                        neighbours=str(neighbours), index_dir=None, output_dir=str(out / "synth"),
                                        batch_size=6, max_new_tokens=3), [])
    assert list(read_predictions(out / "synth" / "predictions.csv")) == IDS


# --- the encoder-decoder fuser (tiny random T5 and BART folders written by transformers) ---

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tests.test_aueb import write_t5_folder  # imported here: test_aueb imports this module

    folder = tmp_path_factory.mktemp("t5")
    write_t5_folder(folder)
    return folder


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    """A tiny BART: byte-level BPE with <s> 0, <pad> 1, </s> 2; the decoder starts with </s> (2), as
    facebook/bart-* does, and sources and targets end with it."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    folder = tmp_path_factory.mktemp("bart")
    words = "chest x ray ct scan shows a small nodule in the left lung liver cyst caption".split()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", pad_token="<pad>",
                                                     eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = transformers.BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=256, dropout=0.0)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (2, 2, 1)
    torch.manual_seed(0)
    transformers.BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def seq2seq_lm(folder: Path, spread: float | None = None):
    """The folder's LM and tokenizer; ``spread``: weights redrawn with that std, so that a random model writes
    varied words (as initialised, the tiny T5 writes only pad tokens)."""
    from medcap.seq2seq import hf_seq2seq_lm, hf_seq2seq_tokenizer

    model = hf_seq2seq_lm(str(folder)).eval()
    if spread:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, spread)
    return model, hf_seq2seq_tokenizer(str(folder))


def transformers_loss(model, tokenizer, sources: list[str], targets: list[str]) -> torch.Tensor:
    """transformers' own loss from ``labels`` (it shifts them behind the decoder start id itself)."""
    source_ids = [tokenizer.source_ids(s) for s in sources]
    target_ids = [tokenizer.target_ids(t) for t in targets]
    ids = torch.full((len(sources), max(map(len, source_ids))), tokenizer.pad_id)
    mask, labels = torch.zeros_like(ids), torch.full((len(sources), max(map(len, target_ids))), IGNORE_INDEX)
    for row, (s, t) in enumerate(zip(source_ids, target_ids)):
        ids[row, :len(s)], mask[row, :len(s)], labels[row, :len(t)] = torch.tensor(s), 1, torch.tensor(t)
    return model.model(input_ids=ids, attention_mask=mask, labels=labels).loss


def packed_loss(model, tokenizer, sources: list[str], targets: list[str], max_len: int = 300) -> torch.Tensor:
    from medcap.seq2seq import seq2seq_sample

    samples = [{"id": str(i), **seq2seq_sample(tokenizer, s, t, max_len, max_len)}
               for i, (s, t) in enumerate(zip(sources, targets))]
    batch = collate_captions(samples, pad_id=tokenizer.pad_id)
    return caption_loss(model, {"tokens": batch["tokens"]}, batch["labels"])


def test_a_bart_fuser_whose_decoder_starts_with_eos_trains_with_transformers_loss(bart_dir):
    model, tokenizer = seq2seq_lm(bart_dir)
    assert tokenizer.decoder_start_id == tokenizer.eos_id == 2
    assert tokenizer.source_ids("chest x ray")[-1] == 2  # the source itself ends with the start id
    data = FuserDataset(tokenizer, {"img1": ["chest x ray", "left lung", "a nodule"]},
                        {"img1": ["chest x ray shows a nodule", "ct scan"]}, 300)
    assert len(data) == 2
    sources = [fuser_prompt(["chest x ray", "left lung", "a nodule"])] * 2
    targets = ["chest x ray shows a nodule", "ct scan"]
    batch = collate_captions(data.samples, pad_id=tokenizer.pad_id)
    ours = caption_loss(model, {"tokens": batch["tokens"]}, batch["labels"])
    with torch.no_grad():
        expected = transformers_loss(model, tokenizer, sources, targets)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    ours.backward()
    assert model.model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_packed_rows_run_the_decoder_over_the_targets_only(t5_dir, monkeypatch):
    model, tokenizer = seq2seq_lm(t5_dir)
    sources = ["chest x ray of the left lung " * 12, "ct scan"]  # very different source lengths
    targets = ["a small nodule", "liver cyst on ultrasound of the abdomen with a lesion"]
    with torch.no_grad():
        expected = transformers_loss(model, tokenizer, sources, targets)
    widths = []
    real_forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda **kw: widths.append(
        (kw["input_ids"].shape[1], kw["decoder_input_ids"].shape[1])) or real_forward(**kw))
    with torch.no_grad():
        ours = packed_loss(model, tokenizer, sources, targets)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    longest_source = max(len(tokenizer.source_ids(s)) for s in sources)
    longest_target = max(len(tokenizer.target_ids(t)) for t in targets)
    assert longest_source > 3 * longest_target
    # the decoder reads [start, target...] without the target's last token, which predicts nothing
    assert widths[0] == (longest_source, longest_target)


def test_train_fuser_warns_of_cut_sources_and_targets(t5_dir, tmp_path, caplog):
    ids = [f"id{i}" for i in range(6)]
    long = "chest x ray shows a small nodule in the left lung " * 4
    files = [write_run(tmp_path / "a.csv", [(k, long if k in ("id1", "id4") else "ct scan") for k in ids]),
             write_run(tmp_path / "b.csv", [(k, "liver cyst") for k in ids]),
             write_run(tmp_path / "c.csv", [(k, "mri brain lesion") for k in ids])]
    write_run(tmp_path / "data" / "valid_captions.csv", [(k, long * 3 if k == "id2" else "ct scan") for k in ids])
    with caplog.at_level("WARNING"):
        cli.run_recipe("train_fuser", "aueb/train_fuser", [
            f"fuser_dir={t5_dir}", f"data_dir={tmp_path / 'data'}", f"candidates=[{','.join(map(str, files))}]",
            f"output_dir={tmp_path / 'fuser'}", "device=cpu", "epochs=null", "max_steps=1", "batch_size=2",
            "holdout=1", "max_seq_len=100", "save_every=null", "metric_logger=null"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "max_seq_len" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("2 of 6 samples have their source (the candidates) cut to max_seq_len=100 tokens")
    assert "IDs " in warnings[0] and "'id1'" in warnings[0] and "'id4'" in warnings[0]
    assert warnings[0].endswith("fuse does not truncate, so at test time the model sees all candidates")
    assert warnings[1].startswith("1 of 6 samples have their target caption cut to max_seq_len=100 tokens")
    assert "ID 'id2'" in warnings[1]


def test_seq2seq_sampling_is_reproducible_with_a_seed(t5_dir):
    model, tokenizer = seq2seq_lm(t5_dir, spread=0.3)
    prompts = [fuser_prompt_ids(tokenizer, ["chest x ray", "ct scan"], "Fuse."), tokenizer.source_ids("liver cyst")]
    settings = dict(batch_size=2, max_new_tokens=8, temperature=1.0)
    first = generate_texts(model, tokenizer, prompts, seed=3, **settings)
    assert generate_texts(model, tokenizer, prompts, seed=3, **settings) == first
    assert generate_texts(model, tokenizer, prompts, seed=4, **settings) != first
    assert generate_texts(model, tokenizer, prompts, seed=3, batch_size=2, max_new_tokens=8) != first  # greedy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seq2seq_sampling_on_cuda_is_reproducible_with_a_seed(t5_dir):
    model, tokenizer = seq2seq_lm(t5_dir, spread=0.3)
    model.cuda()
    prompts = [fuser_prompt_ids(tokenizer, ["chest x ray", "ct scan"], "Fuse.")]
    settings = dict(batch_size=1, max_new_tokens=8, temperature=1.0, seed=3)
    assert generate_texts(model, tokenizer, prompts, **settings) == generate_texts(model, tokenizer, prompts,
                                                                                    **settings)


def test_seq2seq_generation_refuses_or_passes_on_every_decoding_key(t5_dir, monkeypatch):
    model, tokenizer = seq2seq_lm(t5_dir, spread=0.3)
    prompts = [tokenizer.source_ids("chest x ray")]
    with pytest.raises(ValueError, match=r"beam search is deterministic: set temperature to 0 \(got 0.7\) or "
                                         r"num_beams to 1"):
        generate_texts(model, tokenizer, prompts, batch_size=1, max_new_tokens=4, num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match=r"length_normalization='hf_4_30': the encoder-decoder's beam search is "
                                         r"transformers' own"):
        generate_texts(model, tokenizer, prompts, batch_size=1, max_new_tokens=4, num_beams=2,
                       length_normalization="hf_4_30")
    with pytest.raises(ValueError, match="repetition penalty counts the generated tokens only: set penalize_prompt "
                                         "to false"):
        generate_texts(model, tokenizer, prompts, batch_size=1, max_new_tokens=4, repetition_penalty=1.2)
    seen = []
    real_generate = model.model.generate
    monkeypatch.setattr(model.model, "generate", lambda **kw: seen.append(kw["use_cache"]) or real_generate(**kw))
    settings = dict(batch_size=1, max_new_tokens=4, num_beams=2, length_normalization="with_end_token")
    cached = generate_texts(model, tokenizer, prompts, use_cache=True, **settings)
    assert generate_texts(model, tokenizer, prompts, use_cache=False, **settings) == cached
    assert seen == [True, False]


# --- prompt strings and prompts too long for the decoder ---

@pytest.mark.parametrize("key, value, message", [
    ("template", "Using the descriptions: {candidates} (from {models})",
     r"prompt.template has the placeholder \{models\}; it takes \{instruction\} and \{candidates\}"),
    ("template", "{instruction}: {}", r"prompt.template has the placeholder \{\}; it takes"),
    ("template", "{instruction} only", r"prompt.template must contain \{candidates\}"),
    ("candidate_line", "{n}. {caption}",
     r"prompt.candidate_line has the placeholder \{n\}; it takes \{rank\} and \{caption\}"),
    ("candidate_line", "{caption.upper}", r"prompt.candidate_line has the placeholder \{caption.upper\}"),
    ("candidate_line", "{rank}. {caption", r"prompt.candidate_line is not a format string \(.*\)"),
    ("candidate_line", "{rank}. {caption:d}", r"prompt.candidate_line is not a format string \(.*'d'.*\)"),
])
def test_prompt_placeholders_are_checked_naming_the_key_and_the_source(key, value, message):
    with pytest.raises(ValueError, match=r"^train_fuser config: " + message):
        prompt_settings({key: value}, "train_fuser config")


def test_prompt_settings_keep_every_placeholder_the_prompt_uses():
    settings = prompt_settings({"template": "{candidates}\n{instruction}", "candidate_line": "{rank:>2}) {caption!r}"},
                               "fuse config")
    layout = {k: settings[k] for k in ("template", "candidate_line", "separator")}
    assert fuser_prompt(["a b", "c"], "Fuse.", **layout) == " 1) 'a b'\n 2) 'c'\nFuse."


def test_fuse_names_the_id_and_the_files_of_a_prompt_too_long_for_the_decoder(tokenizer, tmp_path):
    ids = ["x", "y", "z"]
    files = [write_run(tmp_path / "a.csv", [(k, "word " * 300 if k == "y" else "a") for k in ids]),
             write_run(tmp_path / "b.csv", [(k, "b") for k in ids])]
    config = tiny_config(tmp_path, "fuse", output_dir=str(tmp_path / "fused"), checkpoint=None,
                         candidates=[str(f) for f in files], max_new_tokens=4, batch_size=3)
    with pytest.raises(ValueError, match=r"ID 'y': the prompt built from the candidates in .*a\.csv, .*b\.csv is "
                                         r"\d+ tokens, and with max_new_tokens=4 needs \d+, more than the decoder's "
                                         r"max_seq_len 256$"):
        cli.run_recipe("fuse", str(config), [])
    # a prompt that fits, but not with the tokens to generate
    prompt = fuser_prompt_ids(tokenizer, ["b", "b"])
    config = tiny_config(tmp_path, "fuse", output_dir=str(tmp_path / "fused"), checkpoint=None,
                         candidates=[str(f) for f in files[1:]] * 2, max_new_tokens=257 - len(prompt), batch_size=3)
    with pytest.raises(ValueError, match=rf"ID 'x': .* is {len(prompt)} tokens, and with max_new_tokens="
                                         rf"{257 - len(prompt)} needs 257, more than the decoder's max_seq_len 256, "
                                         rf"and 2 more IDs$"):
        cli.run_recipe("fuse", str(config), [])


@pytest.mark.parametrize("override, refused", [
    ({}, None),
    ({"holdout": 100}, "holdout: 8 -> 100"),
    ({"max_seq_len": 64}, "max_seq_len: 256 -> 64"),
    ({"prompt": {"instruction": "Fuse."}}, "prompt.instruction: 'Write the caption.' -> 'Fuse.'"),
    ({"candidates": ["/elsewhere/greedy/val/predictions.csv", "/elsewhere/beam/val/predictions.csv"]}, None),
    ({"candidates": ["runs/beam/val/predictions.csv", "runs/greedy/val/predictions.csv"]},
     "candidates: ['greedy/val/predictions.csv', 'beam/val/predictions.csv'] -> ['beam/val/predictions.csv', "
     "'greedy/val/predictions.csv']"),
])
def test_a_fuser_run_resumes_only_with_the_same_samples_in_the_same_order(tmp_path, override, refused):
    from medcap.checkpoint import CONFIG, STATE, CheckpointError
    from medcap.runs import check_resumable

    saved = {"seed": 0, "batch_size": 2, "holdout": 8, "max_seq_len": 256,
             "prompt": {"instruction": "Write the caption."},
             "candidates": ["runs/greedy/val/predictions.csv", "runs/beam/val/predictions.csv"]}
    (tmp_path / CONFIG).write_text(OmegaConf.to_yaml(saved))
    torch.save({"world_size": 1}, tmp_path / STATE)
    current = OmegaConf.create({**saved, **override})
    keys = ("candidates", "holdout", "max_seq_len", "prompt")
    if refused is None:
        check_resumable(current, tmp_path, keys)
    else:
        with pytest.raises(CheckpointError, match=re.escape(refused)):
            check_resumable(current, tmp_path, keys)
    check_resumable(current, tmp_path)  # the finetune recipes' keys alone do not look at these
