"""Pins the upstream signatures medcap relies on: moving to a new torchtune is a version bump plus this test
turning red where something moved, not a rebase."""

import inspect
from importlib.metadata import version

import torchtune
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.models.llama2._component_builders import llama2
from torchtune.models.llama3_1._component_builders import llama3_1
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import delete_kv_caches
from torchtune.modules.model_fusion import EarlyFusionModel
from torchtune.training import FullModelHFCheckpointer


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_pinned_versions():
    assert version("torchtune") == "0.6.1" and torchtune.__version__.startswith("0.6.1")


def test_early_fusion_model_interface():
    # medcap.models.vlm.VisionLanguageModel subclasses it and overrides setup_caches and forward
    assert params(EarlyFusionModel.__init__) == ["self", "decoder", "encoders", "encoder_tokens", "decoder_trainable",
                                                 "encoders_trainable", "fusion_trainable"]
    assert params(EarlyFusionModel.forward) == ["self", "tokens", "mask", "encoder_input", "input_pos", "kwargs"]
    assert params(EarlyFusionModel.setup_caches) == ["self", "batch_size", "dtype"]
    src = inspect.getsource(EarlyFusionModel.__init__)
    assert "self.tok_embeddings = decoder.tok_embeddings" in src  # parts() relies on where the embeddings live


def test_decoder_and_generation_helpers():
    assert params(TransformerDecoder.setup_caches) == ["self", "batch_size", "dtype", "encoder_max_seq_len",
                                                       "decoder_max_seq_len"]
    assert params(get_causal_mask_from_padding_mask) == ["padding_mask", "target_seq_len"]
    assert params(get_position_ids_from_padding_mask) == ["padding_mask"]
    assert params(delete_kv_caches) == ["model"]


def test_builders_and_checkpointer():
    for builder in (llama3_1, llama2):
        assert {"vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "max_seq_len",
                "intermediate_dim"} <= set(params(builder))
    assert {"checkpoint_dir", "checkpoint_files", "model_type", "output_dir"} <= set(params(FullModelHFCheckpointer))


def test_peft_distributed_and_conversion_helpers():
    from torchtune import training
    from torchtune.models.convert_weights import tune_to_hf
    from torchtune.modules.peft import LoRALinear

    # medcap.models.lora.AdaptedLinear subclasses LoRALinear, builds it on the meta device and swaps the weight in
    assert params(LoRALinear.__init__) == ["self", "in_dim", "out_dim", "rank", "alpha", "dropout", "use_bias",
                                           "quantize_base", "quantization_kwargs"]
    src = inspect.getsource(LoRALinear)
    assert "self._quantize_base" in src and "linear_nf4" in src and "def initialize_parameters" in src
    # AdaptedLinear.forward repeats LoRALinear's adapter term around medcap's own base product
    forward = inspect.getsource(LoRALinear.forward)
    assert "self.disabled" in forward and "(self.alpha / self.rank) * self.lora_b(lora_out)" in forward
    assert params(tune_to_hf) == ["state_dict", "num_heads", "num_kv_heads", "dim", "head_dim"]
    assert params(training.get_full_optimizer_state_dict) == ["model", "opt", "is_rank_zero", "device"]
    assert params(training.load_from_full_optimizer_state_dict) == ["model", "opt", "full_sd", "device"]
    assert params(training.set_activation_checkpointing) == ["model", "auto_wrap_policy", "kwargs"]
    # compile=true: compile_model compiles every TransformerSelfAttentionLayer it finds in place (any model)
    assert params(training.compile_model) == ["model", "verbose"]
    assert "m.compile(backend=backend)" in inspect.getsource(training.compile_model)


def test_tied_output_projection_calls_its_linear_module():
    # medcap.models.linear.use_few_rows_products gives TiedLinear another product module with this forward
    from torchtune.modules import TiedLinear
    from torchtune.modules.tied_linear import Linear

    assert params(Linear.forward) == ["self", "x", "weight"]
    assert "self.linear(x, self.tied_module.weight)" in inspect.getsource(TiedLinear.__call__)


def test_timm_same_padding_and_the_convolution_backward_op():
    # medcap.models.depthwise subclasses timm's Conv2dSame (padding in forward) and calls aten's convolution_backward
    import torch
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same

    assert params(Conv2dSame.__init__)[:8] == ["self", "in_channels", "out_channels", "kernel_size", "stride",
                                              "padding", "dilation", "groups"]
    assert "pad_same(x, weight.shape[-2:], stride, dilation)" in inspect.getsource(inspect.getmodule(Conv2dSame))
    assert params(pad_same)[:4] == ["x", "kernel_size", "stride", "dilation"]
    schema = str(torch.ops.aten.convolution_backward.default._schema)
    assert schema.startswith("aten::convolution_backward(Tensor grad_output, Tensor input, Tensor weight, "
                             "SymInt[]? bias_sizes, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
                             "bool transposed, SymInt[] output_padding, SymInt groups, bool[3] output_mask)"), schema
