import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from medcap.checkpoint import load_checkpoint, load_training_state, resolve_checkpoint, save_checkpoint
from medcap.precision import keep_trained_parts_in
from medcap.text import IGNORE_INDEX
from medcap.training import ResumableBatchSampler, TrainSettings, caption_loss, train
from tests.tiny_vlm import VOCAB, sample_batch, tiny_vlm


def test_sampler_epochs_are_permutations_and_resume_continues_the_order():
    sampler = ResumableBatchSampler(10, batch_size=3, seed=5)
    first = list(itertools.islice(iter(sampler), 9))  # 3 batches per epoch, 3 epochs
    for epoch in range(3):
        seen = sum(first[epoch * 3:(epoch + 1) * 3], [])
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    assert first[:3] != first[3:6]  # a new order each epoch
    resumed = list(itertools.islice(iter(ResumableBatchSampler(10, 3, seed=5, start=4)), 5))
    assert resumed == first[4:9]
    with pytest.raises(ValueError, match="4 samples, fewer than batch_size=8"):
        ResumableBatchSampler(4, 8, seed=0)


class FixedLogits(torch.nn.Module):
    """Returns fixed logits [B, L, V], selected where the loss asks (``output_at``), and records the request."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.asked = logits, None

    def forward(self, tokens, output_at=None):
        self.asked = output_at
        return self.logits if output_at is None else self.logits[output_at]


def test_caption_loss_hand_checked():
    # uniform logits: every labelled position costs log(V); only positions 2 and 3 carry labels
    logits = torch.zeros(1, 4, VOCAB)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6]])
    model = FixedLogits(logits)
    inputs = {"tokens": torch.zeros(1, 4, dtype=torch.long)}
    assert caption_loss(model, inputs, labels).item() == pytest.approx(math.log(VOCAB))
    assert caption_loss(model, inputs, labels, reduction="sum").item() == pytest.approx(2 * math.log(VOCAB))
    # the label at position i is predicted from position i-1: only positions 1 and 2 are projected
    assert model.asked.tolist() == [[False, True, True, False]]
    logits[0, 1, 5] = 100.0
    assert caption_loss(model, inputs, labels, reduction="sum").item() == pytest.approx(math.log(VOCAB), abs=1e-4)


def test_caption_loss_equals_full_logits_cross_entropy_on_a_real_model():
    model = tiny_vlm(trainable={"encoder": "full", "projector": "full", "decoder": "lora"}).eval()
    tokens, images = sample_batch(batch_size=2, text_len=6)
    labels = tokens.masked_fill(tokens == model.image_token_id, IGNORE_INDEX)
    labels[0, -3:] = IGNORE_INDEX  # rows with different label counts
    inputs = {"tokens": tokens, "encoder_input": {"image": {"images": images}}}
    full = model(**inputs)
    expected = F.cross_entropy(full[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert caption_loss(model, inputs, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def make_batches(n=6, seed=0):
    out = []
    for i in range(n):
        tokens, images = sample_batch(batch_size=2, seed=seed + i)
        labels = tokens.clone()
        labels[:, :5] = IGNORE_INDEX  # the image block and the first text token are prompt
        out.append({"tokens": tokens, "labels": labels, "images": images})
    return out


def run(model, tmp_path, steps=6, accum=1, clip=1.0, lr=3e-2, batches=None, optimizer_cls=torch.optim.AdamW):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batches = itertools.cycle(batches or make_batches())
    settings = TrainSettings(max_steps=steps, gradient_accumulation_steps=accum, clip_grad_norm=clip, save_every=3)
    return train(model, optimizer, scheduler, batches, settings, output_dir=tmp_path, device=torch.device("cpu"),
                 dtype=torch.float32)


def test_only_the_trained_parts_change_and_the_loss_falls(tmp_path):
    model = tiny_vlm(trainable={"encoder": "full", "projector": "full", "decoder": "frozen"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = run(model, tmp_path, steps=12, batches=make_batches(1))
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < 0.85 * losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoders.image.") for k in changed)
    assert any(k.startswith("encoders.image.encoder.conv") for k in changed)
    assert any(k.startswith("encoders.image.projector") for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_gradient_clipping_is_applied(tmp_path):
    # with SGD(lr=1) an update equals minus the clipped gradient, so its norm is the clip value
    model = tiny_vlm(trainable={"encoder": "frozen", "projector": "full"})
    before = [p.clone() for p in model.vision.projector.parameters()]
    summary = run(model, tmp_path, steps=1, clip=1e-3, lr=1.0, optimizer_cls=torch.optim.SGD)
    step = torch.cat([(p - b).flatten() for p, b in zip(model.vision.projector.parameters(), before)])
    assert summary["history"][0]["grad_norm"] > 1e-3
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    small = make_batches(2)
    small[1]["labels"][0, 5:8] = IGNORE_INDEX  # 10 labelled tokens in the first micro-batch, 7 in the second
    large = [{k: torch.cat([small[0][k], small[1][k]]) for k in small[0]}]
    a = tiny_vlm(trainable={"encoder": "frozen", "projector": "full"})
    b = tiny_vlm(trainable={"encoder": "frozen", "projector": "full"})
    run(a, tmp_path / "a", steps=1, accum=2, batches=small, optimizer_cls=torch.optim.SGD, lr=0.1, clip=None)
    run(b, tmp_path / "b", steps=1, accum=1, batches=large, optimizer_cls=torch.optim.SGD, lr=0.1, clip=None)
    for pa, pb in zip(a.vision.projector.parameters(), b.vision.projector.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_checkpoint_holds_only_trained_parts_and_reloads_to_identical_outputs(tmp_path):
    model = tiny_vlm(trainable={"encoder": "full", "projector": "full", "decoder": "frozen"})
    run(model, tmp_path, steps=3)
    ckpt = resolve_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "step_000003"
    from safetensors.torch import load_file
    keys = load_file(ckpt / "model.safetensors").keys()
    assert keys and all(k.startswith(("encoder.", "projector.")) for k in keys)
    assert "encoder.norm.running_mean" in keys  # BatchNorm statistics travel with the trained encoder
    state = load_training_state(ckpt)
    assert state["step"] == 3 and "optimizer" in state and "rng" in state

    fresh = tiny_vlm(seed=99)  # different random init everywhere ...
    fresh.decoder.load_state_dict(model.decoder.state_dict())
    fresh.tok_embeddings.load_state_dict(model.tok_embeddings.state_dict())  # ... but the same frozen LLM
    load_checkpoint(fresh, tmp_path / "checkpoints")
    tokens, images = sample_batch()
    model.eval(), fresh.eval()
    assert torch.equal(model(tokens, encoder_input={"image": {"images": images}}),
                       fresh(tokens, encoder_input={"image": {"images": images}}))


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tmp_path):
    def go(patience, start=0, history=None):
        model = tiny_vlm(trainable={"encoder": "frozen", "projector": "full"})
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        settings = TrainSettings(max_steps=20, clip_grad_norm=None, eval_every=2, select_metric="val_x",
                                 select_mode="max", patience=patience)
        return train(model, optimizer, scheduler, itertools.cycle(make_batches()), settings, output_dir=tmp_path,
                     device=torch.device("cpu"), dtype=torch.float32, evaluate=lambda: {"val_x": 0.0},
                     start_step=start, history=history)

    first = go(patience=1)  # no improvement at the second evaluation: stops at step 4
    assert first["steps"] == 4 and first["stopped_early"]
    state = load_training_state(tmp_path / "checkpoints" / "step_000004")
    again = go(patience=1, start=state["step"], history=json.loads(state["history"]))
    assert again["steps"] == 4 and again["stopped_early"] and again["history"] == first["history"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "best_step_000002", "step_000004"]
    more = go(patience=3, start=state["step"], history=json.loads(state["history"]))  # more patience: it goes on
    assert more["steps"] == 8 and [h["step"] for h in more["history"]] == list(range(1, 9))


def test_master_dtype_less_precise_than_dtype_is_refused():
    model = tiny_vlm(trainable={"encoder": "full", "projector": "full"})
    with pytest.raises(ValueError, match="master_dtype=bf16 is less precise than dtype=fp32"):
        keep_trained_parts_in(model, torch.bfloat16, torch.float32)
    assert model.compute_dtype is None and next(model.vision.projector.parameters()).dtype == torch.float32
    keep_trained_parts_in(model.to(torch.bfloat16), torch.float32, torch.bfloat16)  # the other way round is the point
    assert model.compute_dtype == torch.bfloat16 and next(model.vision.projector.parameters()).dtype == torch.float32


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path)
    model = tiny_vlm()
    save_checkpoint(model, tmp_path / "ck")
    assert not (tmp_path / "ck.tmp").exists()
    other = tiny_vlm(projector="linear")
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(other, tmp_path / "ck")


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer

    plain = tiny_vlm(trainable={"encoder": "frozen", "projector": "full"})
    checkpointed = tiny_vlm(trainable={"encoder": "frozen", "projector": "full"})
    training.set_activation_checkpointing(checkpointed.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
    for model, out in ((plain, "a"), (checkpointed, "b")):
        run(model, tmp_path / out, steps=2, optimizer_cls=torch.optim.SGD, lr=0.1)
    for pa, pb in zip(plain.vision.projector.parameters(), checkpointed.vision.projector.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
