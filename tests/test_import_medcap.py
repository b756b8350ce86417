"""The medcap seed's published checkpoint (``{'visual': ..., 'projector': ...}``, torch pickle) loads as
``checkpoint=``: written here in that structure from a tiny model of the same family, it reproduces the model's
outputs exactly; every key is accounted for; pickled code is refused before it runs."""

import pathlib

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medcap.checkpoint import load_checkpoint
from medcap.models.builders import tiny_demo, tiny_llama3_biomedclip
from medcap.runtime import setup_model_and_tokenizer
from tests.test_tokenizers import LLAMA3_MODEL


def seed_projector(model) -> nn.Sequential:
    """The seed's projector module, nn.Sequential(Linear, GELU, Linear), holding ``model``'s projector weights:
    its state dict has the seed's key names because it is the seed's module."""
    first, last = model.vision.projector.net[0], model.vision.projector.net[2]
    seq = nn.Sequential(nn.Linear(first.in_features, first.out_features), nn.GELU(),
                        nn.Linear(last.in_features, last.out_features))
    with torch.no_grad():
        seq[0].weight.copy_(first.weight), seq[0].bias.copy_(first.bias)
        seq[2].weight.copy_(last.weight), seq[2].bias.copy_(last.bias)
    return seq


def write_seed_file(model, path) -> pathlib.Path:
    torch.save({"visual": model.vision.encoder.visual.state_dict(),
                "projector": seed_projector(model).state_dict()}, path)
    return path


def two_models():
    """A (the trained one) and B: the same decoder, a different vision side."""
    torch.manual_seed(0)
    a = tiny_llama3_biomedclip().eval()
    torch.manual_seed(0)
    b = tiny_llama3_biomedclip().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in b.vision.parameters():
            p.normal_(0, 0.05)
    return a, b


def logits(model, images):
    n = model.tokens_per_image
    tokens = torch.tensor([[128000, 882] + [model.image_token_id] * n + [271, 5618]] * images.shape[0])
    with torch.no_grad():
        return model(tokens, encoder_input={"image": {"images": images}})


def test_seed_file_round_trip_gives_identical_outputs(tmp_path):
    a, b = two_models()
    path = write_seed_file(a, tmp_path / "meta_model_last.pt")
    assert set(torch.load(path, weights_only=True)["projector"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = logits(a, images)
    assert not torch.allclose(logits(b, images), expected)  # B differs before loading

    assert load_checkpoint(b, path) == path
    assert torch.equal(logits(b, images), expected)
    # the seed's own forward (visual -> projector -> reshape [B, -1, D]) gives the model's vision tokens
    with torch.no_grad():
        seed_tokens = seed_projector(a)(a.vision.encoder.visual(images)).reshape(2, -1, 64)
        assert torch.equal(b.vision(images), seed_tokens)
    for name, tensor in a.decoder.state_dict().items():  # the decoder is untouched
        assert torch.equal(tensor, b.decoder.state_dict()[name])


def test_setup_model_and_tokenizer_takes_the_seed_file_as_checkpoint(tmp_path):
    a, _ = two_models()
    path = write_seed_file(a, tmp_path / "meta_model_4.pt")
    cfg = OmegaConf.create({"model": {"_component_": "medcap.models.builders.tiny_llama3_biomedclip"},
                            "tokenizer": {"_component_": "medcap.text.llama3_tokenizer", "path": str(LLAMA3_MODEL)}})
    torch.manual_seed(5)
    model, _ = setup_model_and_tokenizer(cfg, torch.device("cpu"), torch.float32, checkpoint=str(path))
    for name, tensor in a.vision.state_dict().items():
        assert torch.equal(tensor, model.vision.state_dict()[name]), name


def _edited(tmp_path, a, edit):
    state = {"visual": a.vision.encoder.visual.state_dict(), "projector": seed_projector(a).state_dict()}
    edit(state)
    torch.save(state, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["projector"].pop("2.bias"), r"projector does not fit the model: missing projector\.2\.bias"),
    (lambda s: s["visual"].pop("proj"), r"visual does not fit the model: missing visual\.proj"),
    (lambda s: s["projector"].update({"1.weight": torch.zeros(1)}), r"surplus projector\.1\.weight"),
    (lambda s: s["visual"].update({"head.extra": torch.zeros(1)}), r"surplus visual\.head\.extra"),
    (lambda s: s["projector"].update({"0.weight": torch.zeros(64, 512)}),
     r"projector\.0\.weight has shape \(64, 512\), the model expects \(64, 32\)"),
    (lambda s: s.pop("projector"), r"top-level keys \['visual', 'projector'\]; missing \['projector'\], surplus \[\]"),
    (lambda s: s.update({"optimizer": {}}), r"missing \[\], surplus \['optimizer'\]"),
    (lambda s: s["visual"].update({"step": 3}), r"'visual' must be a state dict of tensors; not a tensor: \['step'\]"),
])
def test_every_key_is_accounted_for_and_a_misfit_changes_nothing(tmp_path, edit, message):
    a, b = two_models()
    path = _edited(tmp_path, a, edit)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        load_checkpoint(b, path)
    assert str(error.value).startswith(str(path))
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())


def test_a_model_without_an_open_clip_tower_or_pooled_projector_is_refused(tmp_path):
    a, _ = two_models()
    path = write_seed_file(a, tmp_path / "meta_model_last.pt")
    with pytest.raises(ValueError, match="encoder is TimmEncoder.*llama3_1_8b_biomedclip"):
        load_checkpoint(tiny_demo(), path)
    with pytest.raises(ValueError, match="projector is Sequential.*pooled_mlp"):
        load_checkpoint(tiny_llama3_biomedclip(projector="mlp2"), path)


class _RunsCode:
    """Unpickling this touches ``marker``: code a pickle can carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_file_holding_pickled_code_is_refused_and_the_code_never_runs(tmp_path):
    _, b = two_models()
    marker = tmp_path / "code_ran"
    path = tmp_path / "meta_model_last.pt"
    torch.save({"visual": {}, "projector": {"0.weight": _RunsCode(marker)}}, path)
    with pytest.raises(ValueError, match=r"meta_model_last\.pt: refused: the file holds more than tensors"):
        load_checkpoint(b, path)
    assert not marker.exists()
    # the payload is real: a plain (unsafe) load runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_the_real_projector_holds_the_seeds_layer_layout():
    """medcap's pooled_mlp at the real sizes has the seed's Linear(512, 4096) -> GELU -> Linear(4096, 4096 * 50)
    under the seed's names (built on the meta device: no memory)."""
    from medcap.models.projectors import build_projector

    with torch.device("meta"):
        ours = build_projector("pooled_mlp", 512, 4096, 50)
        seed = nn.Sequential(nn.Linear(512, 4096), nn.GELU(), nn.Linear(4096, 4096 * 50))
    assert {f"net.{k}": v.shape for k, v in seed.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()}
    assert isinstance(ours.net[1], nn.GELU) and ours.net[1].approximate == seed[1].approximate == "none"
