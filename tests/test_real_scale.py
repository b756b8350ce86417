"""What tiny default runs miss and real configs hit: activation checkpointing renaming parameters, LoRA / QLoRA
adapters in checkpoints, fp16 / bf16 numerics, the loss's memory, and checkpoints that lack a trained part."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer

from medcap.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medcap.models import builders
from medcap.precision import check_training_dtype, keep_trained_parts_in
from medcap.text import IGNORE_INDEX
from medcap.training import caption_loss

# (builder, trainable, lora settings): every way a config trains a part
METHODS = {
    "medcap": (builders.tiny_llama3_biomedclip, {"encoder": "full", "projector": "full", "decoder": "frozen"}, None),
    "projector_only": (builders.tiny_llama3_biomedclip, {"encoder": "frozen", "projector": "full",
                                                         "decoder": "frozen"}, None),
    "llava_lora": (builders.tiny_llama3_2_clip336, {"encoder": "frozen", "projector": "full", "decoder": "lora"},
                   {"decoder": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "output_proj", "w1"]}}),
    "llava_qlora": (builders.tiny_llama3_2_clip336, {"encoder": "frozen", "projector": "full", "decoder": "qlora"},
                    {"decoder": {"rank": 4, "alpha": 8}}),
    "llava_full": (builders.tiny_llama3_2_clip336, {"encoder": "frozen", "projector": "full", "decoder": "full"}, None),
    "r2gengpt_delta": (builders.tiny_llama2_swin, {"encoder": "lora", "projector": "full", "decoder": "frozen"},
                       {"encoder": {"rank": 4, "alpha": 4, "dropout": 0.1}}),
}


def build(method, checkpointing, seed=0):
    builder, trainable, lora = METHODS[method]
    torch.manual_seed(seed)
    kwargs = {"embed_dim": 256} if method == "llava_qlora" else {}
    model = builder(trainable=trainable, lora=lora, **kwargs)
    if checkpointing:
        training.set_activation_checkpointing(model.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
    return model.eval()


def inputs(model, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    size = model.vision.encoder.image_size
    images = torch.randn(2, 3, size, size, generator=g).to(dtype)
    tokens = torch.cat([torch.full((2, model.tokens_per_image), model.image_token_id),
                        torch.randint(2, 500, (2, 5), generator=g)], dim=1)
    return {"tokens": tokens, "encoder_input": {"image": {"images": images}}}


def pretend_trained(model, seed=1):
    """Move every trainable tensor as training would (adapters leave zero, so the output changes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_trained_part_survives_save_and_reload(method, checkpointing, tmp_path):
    model = build(method, checkpointing)
    before = model(**inputs(model)).detach()
    pretend_trained(model)
    trained = model(**inputs(model)).detach()
    assert not torch.allclose(before, trained, atol=1e-4)
    save_checkpoint(model, tmp_path / "ck")

    saved = load_file(tmp_path / "ck" / "model.safetensors")
    _, trainable, _ = METHODS[method]
    assert {k.split(".")[0] for k in saved} == {p for p, m in trainable.items() if m != "frozen"}
    if "lora" in trainable.values() or "qlora" in trainable.values():
        assert any(".lora_a." in k for k in saved) and any(".lora_b." in k for k in saved)
    assert not any("_checkpoint_wrapped_module" in k for k in saved)

    fresh = build(method, checkpointing)  # the same (random) base weights, untrained parts
    assert not torch.allclose(fresh(**inputs(fresh)), trained, atol=1e-4)
    load_checkpoint(fresh, tmp_path / "ck")
    assert torch.allclose(fresh(**inputs(fresh)), trained, atol=1e-6)


def test_a_checkpoint_that_lacks_a_part_its_run_trained_is_refused(tmp_path):
    # what the LoRA + activation checkpointing bug wrote: the metadata says the decoder trained, the file has
    # only the projector
    model = build("llava_lora", checkpointing=False)
    save_checkpoint(model, tmp_path / "ck")
    state = load_file(tmp_path / "ck" / "model.safetensors")
    meta = {"trainable": json.dumps(model.trainable), "lora": "{}"}
    save_file({k: v for k, v in state.items() if k.startswith("projector.")}, tmp_path / "ck" / "model.safetensors",
              metadata=meta)
    with pytest.raises(CheckpointError, match=r"ck/model.safetensors: the run trained the decoder \(lora\) but "
                                              r"the file holds none of its weights"):
        load_checkpoint(build("llava_lora", checkpointing=False), tmp_path / "ck")
    # and one adapter missing out of many names the part
    save_file({k: v for k, v in state.items() if "layers.1.attn.q_proj.lora_b" not in k},
              tmp_path / "ck" / "model.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=r"part 'decoder' \(lora\) does not match the model: missing "
                                              r"\['decoder.0.layers.1.attn.q_proj.lora_b.weight'\]"):
        load_checkpoint(build("llava_lora", checkpointing=False), tmp_path / "ck")


def test_fp16_training_is_refused_with_what_to_use():
    with pytest.raises(ValueError, match="dtype=fp16 cannot train.*use dtype=bf16"):
        check_training_dtype(torch.float16)
    check_training_dtype(torch.bfloat16)


def one_step(model, lr=2e-5):
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = inputs(model, dtype=torch.bfloat16)
    labels = batch["tokens"].masked_fill(batch["tokens"] == model.image_token_id, IGNORE_INDEX)
    caption_loss(model, batch, labels).backward()
    optimizer.step()
    return [float((p.detach() != b).float().mean()) for p, b in zip(params, before)], params


def test_bf16_keeps_trained_parts_in_fp32_so_small_updates_are_not_lost():
    # pure bf16: an AdamW step of 2e-5 on weights of ~0.02-0.1 rounds away in most entries
    with training.set_default_dtype(torch.bfloat16):
        pure = build("llava_lora", checkpointing=True)
    pretend_trained(pure)  # mid-training: adapters away from zero, so every one of them has a gradient
    moved, _ = one_step(pure.train())
    assert sum(moved) / len(moved) < 0.5
    # the trained parts in fp32, computed in bf16 under autocast: every trained weight moves
    with training.set_default_dtype(torch.bfloat16):
        mixed = build("llava_lora", checkpointing=True)
    pretend_trained(mixed)
    keep_trained_parts_in(mixed, torch.float32, torch.bfloat16)
    assert {p.dtype for p in mixed.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in mixed.decoder.parameters() if not p.requires_grad} == {torch.bfloat16}
    moved, params = one_step(mixed.train())
    assert min(moved) > 0.99, moved


def test_the_loss_projects_only_labelled_positions():
    model = build("llava_lora", checkpointing=False)
    batch = inputs(model)
    labels = torch.full_like(batch["tokens"], IGNORE_INDEX)
    labels[:, -2:] = batch["tokens"][:, -2:]
    rows = []
    model.decoder.output.register_forward_hook(lambda mod, args, out: rows.append(out.shape[0])) \
        if hasattr(model.decoder.output, "register_forward_hook") else None
    full = model(**batch)
    expected = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX)
    assert caption_loss(model, batch, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    assert rows[-1] == 4  # 2 rows x 2 labels projected, not 2 x 13 positions
