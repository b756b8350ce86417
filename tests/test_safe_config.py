"""A config read from a shared file (an index's or a checkpoint's meta.json) can only build medcap's builders."""

import pytest
import torch
from omegaconf import OmegaConf

from medcap.retrieval import embedder_from_source
from medcap.safe_config import check_components

SHELL = {"_component_": "os.system", "command": "touch {marker}"}


@pytest.mark.parametrize("key", ["encoder", "model"])
def test_a_node_given_as_yaml_text_is_refused_before_anything_runs(tmp_path, key):
    # OmegaConf.create parses a string as YAML: the node would be built without having been checked
    marker = tmp_path / "ran"
    node = "{_component_: os.system, command: 'touch %s'}" % marker
    with pytest.raises(ValueError, match=rf"meta.json: source.{key} must be a config mapping .*found str"):
        embedder_from_source({key: node}, torch.device("cpu"), torch.float32, read_from=tmp_path / "meta.json")
    assert not marker.exists()


def test_a_source_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ValueError, match="meta.json: the source encoder must be a mapping, found list"):
        embedder_from_source([], torch.device("cpu"), torch.float32, read_from=tmp_path / "meta.json")


@pytest.mark.parametrize("wrap", [lambda n: n, OmegaConf.create], ids=["dict", "DictConfig"])
def test_components_inside_omegaconf_nodes_are_checked(tmp_path, wrap):
    node = wrap({"encoder": {"inner": [dict(SHELL, command="true")]}})
    with pytest.raises(ValueError, match=r"f.json: encoder.inner\[0\]._component_ = 'os.system' is not allowed"):
        check_components(node, "f.json")
    check_components(wrap({"encoder": {"_component_": "medcap.models.encoders.TimmEncoder"}}), "f.json")


@pytest.mark.parametrize("name", ["medcap.models.llava_hf.save_llava_hf", "medcap.models.llava_hf._write_shards",
                                  "medcap.models.llava_hf.llava_hf_tensors", "medcap.models.encoders._Encoder",
                                  "medcap.models.encoders.offline_timm_name", "medcap.models.builders.torch"])
def test_only_model_builders_are_allowed_not_medcaps_writers_or_helpers(name):
    with pytest.raises(ValueError, match=f"_component_ = '{name}' is not allowed"):
        check_components({"_component_": name}, "config.yaml")


def test_every_builder_a_config_or_index_names_is_allowed():
    for name in ("medcap.models.builders.llama3_1_8b_biomedclip", "medcap.models.builders.tiny_demo",
                 "medcap.models.builders.llava_hf", "medcap.models.encoders.biomedclip_vit_b16",
                 "medcap.models.encoders.OpenClipEncoder", "medcap.models.llava_hf.llava_hf_vision_encoder"):
        check_components({"_component_": name}, "config.yaml")
