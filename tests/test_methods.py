"""Each published training set-up on the shared training core: exactly the configured parameters change, the
loss falls, and checkpoints reload to identical outputs."""

import json

import pytest
import torch

from medcap.checkpoint import load_checkpoint
from medcap.models import builders
from medcap.optim import OptimizerInBackward, paged_adamw_8bit
from medcap.text import IGNORE_INDEX
from medcap.training import ResumableBatchSampler, TrainSettings, train

FROZEN_LLM = {"decoder": "frozen"}
METHODS = {
    # name: (builder, builder kwargs, trainable, lora)
    "medcap": (builders.tiny_llama3_biomedclip, {}, {"encoder": "full", "projector": "full", **FROZEN_LLM}, None),
    "llava_stage1": (builders.tiny_llama3_2_clip336, {}, {"encoder": "frozen", "projector": "full", **FROZEN_LLM}, None),
    "llava_lora": (builders.tiny_llama3_2_clip336, {}, {"encoder": "frozen", "projector": "full", "decoder": "lora"},
                   {"decoder": {"rank": 4, "alpha": 8, "dropout": 0.05, "targets": ["q_proj", "v_proj", "w1"]}}),
    "llava_qlora": (builders.tiny_llama3_biomedclip, {"embed_dim": 256},
                    {"encoder": "frozen", "projector": "full", "decoder": "qlora"}, {"decoder": {"rank": 4}}),
    "llava_full": (builders.tiny_llama3_2_clip336, {}, {"encoder": "frozen", "projector": "full", "decoder": "full"}, None),
    "r2gengpt_shallow": (builders.tiny_llama2_swin, {}, {"encoder": "frozen", "projector": "full", **FROZEN_LLM}, None),
    "r2gengpt_delta": (builders.tiny_llama2_swin, {}, {"encoder": "lora", "projector": "full", **FROZEN_LLM},
                       {"encoder": {"rank": 16, "alpha": 16, "dropout": 0.1}}),
    "r2gengpt_deep": (builders.tiny_llama2_swin, {}, {"encoder": "full", "projector": "full", **FROZEN_LLM}, None),
    "r2gengpt_deep_llm_lora": (builders.tiny_llama2_swin, {}, {"encoder": "full", "projector": "full",
                                                               "decoder": "lora"}, None),
}


def build(name, seed=0):
    builder, kwargs, trainable, lora = METHODS[name]
    torch.manual_seed(seed)
    return builder(trainable=trainable, lora=lora, **kwargs)


def batches(model, batch=4, text=6, seed=0):
    """One fixed batch, repeated: image placeholders, then caption tokens that are all labelled."""
    g = torch.Generator().manual_seed(seed)
    size = model.vision.encoder.image_size
    tokens = torch.cat([torch.full((batch, model.tokens_per_image), model.image_token_id),
                        torch.randint(2, 500, (batch, text), generator=g)], dim=1)
    labels = tokens.masked_fill(tokens == model.image_token_id, IGNORE_INDEX)
    fixed = {"tokens": tokens, "labels": labels, "images": torch.randn(batch, 3, size, size, generator=g)}
    while True:
        yield fixed


def run(model, steps, tmp_path, lr=1e-2, optimizer=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return train(model, optimizer, scheduler, batches(model), TrainSettings(max_steps=steps, clip_grad_norm=None),
                 output_dir=tmp_path, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("name", list(METHODS))
def test_exactly_the_configured_parameters_train_and_the_loss_falls(name, tmp_path):
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items() if not hasattr(v, "get_original_weight")}
    summary = run(model, 12, tmp_path)
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    # EarlyFusionModel keeps the token embeddings on itself but names them decoder.tok_embeddings in state dicts
    trainable = {"decoder." + k if k.startswith("tok_embeddings.") else k
                 for k, p in model.named_parameters() if p.requires_grad}
    trained_buffers = {k for k in changed - trainable if "running_" in k or "num_batches" in k}
    assert changed - trained_buffers == trainable, (sorted(trainable - changed)[:5], sorted(changed - trainable)[:5])
    mode = METHODS[name][2]
    if mode["encoder"] != "full":  # frozen and adapted encoders keep their normalisation statistics
        assert not any(k.startswith("encoders.image.encoder.") for k in trained_buffers)
    expected_parts = {part for part, m in mode.items() if m != "frozen"}
    prefixes = {"encoder": "encoders.image.encoder.", "projector": "encoders.image.projector.",
                "decoder": ("decoder.", "tok_embeddings.")}
    assert {part for part in prefixes if any(k.startswith(prefixes[part]) for k in changed)} == expected_parts
    for part, part_mode in mode.items():
        if part_mode in ("lora", "qlora"):  # only the adapters of an adapted part change
            part_changed = [k for k in changed if k.startswith(prefixes[part])]
            assert part_changed and all(".lora_a." in k or ".lora_b." in k for k in part_changed)
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("name", ["llava_lora", "r2gengpt_delta", "medcap", "llava_qlora"])
def test_checkpoints_reload_to_identical_outputs(name, tmp_path):
    model = build(name)
    run(model, 3, tmp_path)
    fresh = build(name)
    load_checkpoint(fresh, tmp_path / "checkpoints" / "step_000003")
    batch = next(batches(model))
    inputs = {"tokens": batch["tokens"], "encoder_input": {"image": {"images": batch["images"]}}}
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs), fresh(**inputs))
    config = json.loads(
        __import__("safetensors").safe_open(tmp_path / "checkpoints" / "step_000003" / "model.safetensors",
                                            "pt").metadata()["trainable"])
    assert config == METHODS[name][2]


def test_optimizer_in_backward_equals_the_usual_step(tmp_path):
    reference, in_bwd = build("medcap"), build("medcap")
    run(reference, 4, tmp_path / "a")
    groups = [{"params": [p for p in in_bwd.parameters() if p.requires_grad], "lr": 1e-2}]
    optimizer = OptimizerInBackward(groups, lambda g: torch.optim.AdamW(g, weight_decay=0.0))
    run(in_bwd, 4, tmp_path / "b", optimizer=optimizer)
    for (name, p), q in zip(reference.named_parameters(), in_bwd.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert all(p.grad is None for p in in_bwd.parameters())  # freed as soon as each step ran
    state = optimizer.state_dict()
    assert len(state["inner"]) == len(groups[0]["params"])


def test_paged_adamw_8bit_falls_back_to_adamw_on_cpu_with_a_warning():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="not on a CUDA device; using torch.optim.AdamW"):
        optimizer = paged_adamw_8bit([p], lr=1e-3)
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["lr"] == 1e-3


def test_ranks_split_each_global_batch_into_contiguous_shares():
    single = iter(ResumableBatchSampler(12, 4, seed=3))
    ranks = [iter(ResumableBatchSampler(12, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):  # crosses an epoch boundary (3 global batches per epoch)
        assert next(single) == next(ranks[0]) + next(ranks[1])
    with pytest.raises(ValueError, match="fewer than batch_size=4 x 2 ranks"):
        ResumableBatchSampler(6, 4, seed=0, world_size=2)


@pytest.mark.parametrize("path", sorted(str(p) for p in
                                        __import__("pathlib").Path("configs").glob("*/*.yaml")
                                        if p.parent.name in ("llava", "r2gengpt", "medcap")))
def test_method_configs_build_their_trainable_sets_on_tiny_models(path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    if "trainable" not in cfg.model:
        pytest.skip("a generation config")
    tiny = {"medcap.models.builders.llama3_2_1b_clip336": builders.tiny_llama3_2_clip336,
            "medcap.models.builders.llama2_7b_swin": builders.tiny_llama2_swin,
            "medcap.models.builders.llama3_1_8b_biomedclip": builders.tiny_llama3_biomedclip}[cfg.model._component_]
    lora = OmegaConf.to_container(cfg.model.lora) if "lora" in cfg.model else None
    kwargs = {"embed_dim": 256} if cfg.model.trainable.decoder == "qlora" else {}
    model = tiny(trainable=dict(cfg.model.trainable), lora=lora, **kwargs)
    trained_parts = {part for part, module in model.parts().items() if any(p.requires_grad for p in module.parameters())}
    assert trained_parts == {part for part, mode in cfg.model.trainable.items() if mode != "frozen"}
    assert cfg.get("resume_from") == "auto"
