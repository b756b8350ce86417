"""``compile=true``: the training recipe compiles the decoder layers (torchtune's ``compile_model``) without changing
what the model computes, what its checkpoints hold, or compiling anything for evaluation."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchtune.modules import TransformerSelfAttentionLayer

from medcap import cli
from medcap.data.demo_builder import build_demo
from medcap.runtime import caption_dataset, caption_loader, setup_training_model
from medcap.training import caption_loss, model_inputs
from tests.test_tokenizers import LLAMA3_MODEL

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, seed=0, n_train=8, n_val=8, n_test=8)
    return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them
    yield
    torch._dynamo.reset()


def training_model(config: str, data, compile: bool, dtype=torch.float32, **overrides):
    cfg = OmegaConf.load(ROOT / "configs" / "tiny" / f"{config}.yaml")
    cfg.dataset.manifest = str(data / "train.jsonl")
    cfg.compile = compile
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    torch.manual_seed(0)
    model, tokenizer = setup_training_model(cfg, CPU, dtype)
    return model, tokenizer, cfg


def loss_and_grads(model, batch, dtype):
    torch.manual_seed(0)
    loss = caption_loss(model, model_inputs(batch, CPU, dtype), batch["labels"])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def compare(config, data, dtype=torch.float32, **overrides):
    """Loss and trained parameters' gradients of the same batches, eager and with compile=true."""
    plain, tokenizer, cfg = training_model(config, data, False, dtype, **overrides)
    compiled, _, _ = training_model(config, data, True, dtype, **overrides)
    compiled.load_state_dict(plain.state_dict())
    layers = [m for m in compiled.modules() if isinstance(m, TransformerSelfAttentionLayer)]
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert not any(m._compiled_call_impl is not None for m in plain.modules())
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no _orig_mod. in any name
    dataset = caption_dataset(cfg.dataset, tokenizer, plain)
    batches = list(caption_loader(dataset, tokenizer, 3))  # 3 + 3 + 2 samples
    assert len({batch["tokens"].shape for batch in batches}) > 1  # a later shape compiles the layers again
    pairs = []
    for batch in batches:
        pairs.append((loss_and_grads(plain, batch, dtype), loss_and_grads(compiled, batch, dtype)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not silently run eagerly
    return pairs


@pytest.mark.parametrize("config, overrides", [
    ("finetune_vision", {}),  # medcap's method: encoder + projector train, the LLM frozen
    ("finetune", {"model.lora.decoder.dropout": 0.0}),  # LoRA on the LLM
    ("finetune_vision", {"enable_activation_checkpointing": True}),
    ("finetune", {"model.lora.decoder.dropout": 0.0, "model.trainable.decoder": "qlora",  # NF4 base weights
                  "model._component_": "medcap.models.builders.tiny_llama3_biomedclip", "model.embed_dim": 256,
                  "model.projector": "pooled_mlp", "tokenizer._component_": "medcap.text.llama3_tokenizer",
                  "tokenizer.path": str(LLAMA3_MODEL)}),
])
def test_compiled_layers_give_the_eager_loss_and_gradients(data, monkeypatch, config, overrides):
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")  # dynamo + AOTAutograd's graphs, no C++ build
    pairs = compare(config, data, **overrides)
    for (loss, grads), (loss_c, grads_c) in pairs:
        torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_inductor_compiled_layers_in_fp32_and_bf16(data):
    reference = compare("finetune_vision", data)
    for (loss, grads), (loss_c, grads_c) in reference:
        torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # bf16 LLM (the demo's dtype): the compiled step is no farther from the fp32 gradients than the eager one
    low = compare("finetune_vision", data, torch.bfloat16)
    for ((_, exact), _), ((_, eager), (_, compiled)) in zip(reference, low):
        for name in exact:
            scale = exact[name].norm()
            error_eager = (eager[name].float() - exact[name]).norm() / scale
            error_compiled = (compiled[name].float() - exact[name]).norm() / scale
            assert error_compiled <= 1.5 * error_eager + 1e-3, name


def test_the_recipe_compiles_for_training_only(data, tmp_path, monkeypatch):
    """A run with compile=true: the layers are compiled under autograd (training steps), never for evaluation
    (validation loss and generated captions run eagerly), and its checkpoint holds what an eager run's holds."""
    grad_modes = []

    def recording(graph, example_inputs):
        grad_modes.append(torch.is_grad_enabled())
        return graph.forward

    registry = torch._dynamo.backends.registry  # registered for this test only (register_backend cannot undo)
    monkeypatch.setitem(registry._BACKENDS, "medcap_test_recording", None)
    monkeypatch.setitem(registry._COMPILER_FNS, "medcap_test_recording", recording)
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "medcap_test_recording")
    common = [f"dataset.manifest={data / 'train.jsonl'}", f"val_dataset.manifest={data / 'val.jsonl'}",
              "max_steps=4", "eval_every=2", "save_every=4", "val_generation.num_samples=4"]
    runs = {}
    for compile in (False, True):
        out = tmp_path / str(compile)
        cli.run_recipe("finetune", "tiny/finetune", common + [f"output_dir={out}", f"compile={compile}"])
        runs[compile] = out
    assert grad_modes and all(grad_modes)
    checkpoints = {c: load_file(out / "checkpoints" / "step_000004" / "model.safetensors")
                   for c, out in runs.items()}
    assert checkpoints[True].keys() == checkpoints[False].keys()
    history = (runs[True] / "train_summary.json").read_text()
    assert '"val_loss"' in history and '"val_BLEU-4"' in history
