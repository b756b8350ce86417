"""MeGPT's modules: DO-Conv, the feature enhancement module (FEM), L2 regularisation, clustering-based prompts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medcap.models.doconv import DOConv2d
from medcap.models.fem import EnhancedProjector, FeatureEnhancement, fem_macs, inference_parameters


def _perturb(conv: DOConv2d, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.D.copy_(torch.randn(conv.D.shape, generator=g) * 0.3)


def _oracle_kernel(conv: DOConv2d) -> torch.Tensor:
    """The composed kernel by explicit loops over the definition: DoW[o, i, m] = sum_s (D + I)[i, m, s] W'[o, i, s]
    with W' = W read as (C_out / groups, C_in, D_mul) and I the M*N identity tiled D_mul // (M*N) times along s
    (zero columns for the remainder)."""
    m, n = conv.kernel_size
    c_out, c_in, d_mul = conv.out_channels, conv.in_channels, conv.d_mul
    w = conv.W.detach().float().reshape(c_out // conv.groups, c_in, d_mul)
    identity = torch.zeros(m * n, d_mul)
    for s in range(d_mul // (m * n) * (m * n)):
        identity[s % (m * n), s] = 1.0
    d = conv.D.detach().float() + identity
    out = torch.zeros(c_out // conv.groups, c_in, m * n)
    for o in range(c_out // conv.groups):
        for i in range(c_in):
            for mm in range(m * n):
                out[o, i, mm] = sum(d[i, mm, s] * w[o, i, s] for s in range(d_mul))
    return out.reshape(c_out, c_in // conv.groups, m, n)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=2, dilation=2),
                                    dict(kernel_size=3, padding=1, groups=2), dict(kernel_size=(3, 5), padding=(1, 2),
                                                                                   stride=2, d_mul=20),
                                    dict(kernel_size=3, padding=1, d_mul=18), dict(kernel_size=3, padding=1, d_mul=22)])
def test_doconv_forward_equals_conv2d_with_the_folded_kernel(kwargs):
    torch.manual_seed(0)
    conv = DOConv2d(4, 6, **kwargs)
    _perturb(conv)
    x = torch.randn(2, 4, 9, 9)
    kernel = _oracle_kernel(conv)
    expected = F.conv2d(x, kernel, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(conv.kernel(), kernel, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.fold()(x), expected, atol=1e-5, rtol=1e-5)
    conv.eval()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_doconv_at_init_is_the_plain_conv_of_w():
    torch.manual_seed(1)
    conv = DOConv2d(3, 5, 3, padding=1, dilation=1)
    assert torch.count_nonzero(conv.D) == 0
    plain = nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        plain.weight.copy_(conv.W.reshape(5, 3, 3, 3))
        plain.bias.copy_(conv.bias)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(conv(x), plain(x))


@pytest.mark.parametrize("d_mul", [18, 22])
def test_doconv_identity_is_tiled_along_d_mul(d_mul):
    # with D = 0 the kernel is the sum of W's M*N-wide slices (two of them for D_mul 18 and 22; 22's last 4 unused)
    torch.manual_seed(7)
    conv = DOConv2d(3, 5, 3, padding=1, d_mul=d_mul)
    w = conv.W.detach()
    kernel = (w[:, :, 0:9] + w[:, :, 9:18]).reshape(5, 3, 3, 3)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(conv(x), F.conv2d(x, kernel, conv.bias, padding=1))


def test_doconv_1x1_kernel_takes_no_d_mul():
    with pytest.raises(ValueError, match="d_mul 2: a 1x1 kernel"):
        DOConv2d(4, 6, 1, d_mul=2)
    conv = DOConv2d(4, 6, 1, d_mul=1)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.W.detach().reshape(6, 4, 1, 1), conv.bias))


def test_doconv_gradients_reach_d_and_w():
    torch.manual_seed(2)
    conv = DOConv2d(3, 4, 3, padding=1)
    conv(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert conv.W.grad is not None and conv.W.grad.abs().sum() > 0
    assert conv.D.grad is not None and conv.D.grad.abs().sum() > 0


def test_doconv_eval_kernel_is_cached_and_refolded_after_a_step():
    torch.manual_seed(3)
    conv = DOConv2d(2, 2, 3, padding=1).eval()
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        first = conv(x)
        cached = conv._folded[1]
        assert conv(x).equal(first) and conv._folded[1] is cached  # folded once
        conv.D.add_(0.5)  # an in-place update (as an optimizer step makes) invalidates the folded kernel
        torch.testing.assert_close(conv(x), F.conv2d(x, _oracle_kernel(conv), conv.bias, padding=1))


def test_doconv_eval_kernel_is_the_same_with_and_without_autocast():
    torch.manual_seed(8)
    conv = DOConv2d(4, 4, 3, padding=1)
    _perturb(conv)
    x = torch.randn(2, 4, 6, 6)
    kernel = _oracle_kernel(conv)
    plain = conv.fold()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = conv(x)  # train mode: the kernel composed with gradients
    conv.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cached = conv(x)
            assert cached.equal(plain(x)) and cached.equal(trained.detach())
            torch.testing.assert_close(cached, F.conv2d(x, kernel, conv.bias, padding=1), atol=0.05, rtol=0.02)
        out = conv(x)  # the kernel cached under autocast, reused outside it
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, F.conv2d(x, kernel, conv.bias, padding=1))


def test_doconv_eval_kernel_is_refolded_after_replaced_or_loaded_weights():
    torch.manual_seed(9)
    conv = DOConv2d(3, 3, 3, padding=1).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        conv(x)
        conv.D.data = torch.randn(conv.D.shape)  # a new tensor, not an in-place change
        torch.testing.assert_close(conv(x), F.conv2d(x, _oracle_kernel(conv), conv.bias, padding=1))
        other = DOConv2d(3, 3, 3, padding=1)
        _perturb(other, seed=1)
        for assign in (False, True):
            conv.load_state_dict(other.state_dict(), assign=assign)
            torch.testing.assert_close(conv(x), other(x))
            other.D.add_(1.0)
        conv.W.data.mul_(0.5)  # a write through .data keeps the version: eval() refolds
        conv.eval()
        torch.testing.assert_close(conv(x), F.conv2d(x, _oracle_kernel(conv), conv.bias, padding=1))


def test_fem_starts_as_identity_and_reshapes_a_square_grid():
    torch.manual_seed(4)
    fem = FeatureEnhancement(16, reduction=4)
    tokens = torch.randn(2, 9, 16)
    assert fem(tokens).equal(tokens)  # the fusion starts at zero: the model starts as the one without FEM
    with torch.no_grad():
        nn.init.normal_(fem.fuse.weight)
    out = fem(tokens)
    # token (row r, column c) of the grid is position r * 3 + c: a 1x1-only FEM must act on each token alone
    one_by_one = FeatureEnhancement(16, branches=[{"kernel_size": 1}], zero_init_fuse=False)
    changed = tokens.clone()
    changed[0, 4] += 1.0
    diff = (one_by_one(changed) - one_by_one(tokens)).abs().sum(-1)
    assert diff[0, 4] > 0 and diff[0].count_nonzero() == 1 and diff[1].count_nonzero() == 0
    # a 3x3 branch mixes neighbours: the centre of the grid reaches all nine positions
    diff = (fem(changed) - out).abs().sum(-1)
    assert diff[0].count_nonzero() == 9
    with pytest.raises(ValueError, match="square grid"):
        fem(torch.randn(1, 8, 16))


def test_fem_refuses_a_pooled_single_token():
    from medcap.models.builders import tiny_llama2_swin

    with pytest.raises(ValueError, match="square grid .*pooled encoders"):
        FeatureEnhancement(16)(torch.randn(2, 1, 16))
    with pytest.raises(ValueError, match=r"fem needs an encoder whose tokens form a square grid of at least 2 x 2; "
                                         r"this one gives 1 token\(s\)"):
        tiny_llama2_swin(global_only=True, fem={})  # refused when the model is built, not at its first batch


def test_fem_macs_and_parameters_at_swin_b_shapes():
    fem = FeatureEnhancement(1024, reduction=4)
    # 49 positions; branches 1024 -> 256 with 1x1, 3x3, 3x3 kernels; fusion 768 -> 1024
    expected_macs = 49 * (256 * 1024 * (1 + 9 + 9) + 1024 * 768)
    assert fem_macs(fem, 49) == expected_macs
    expected_params = 256 * 1024 * 19 + 3 * 256 + 768 * 1024 + 1024
    assert inference_parameters(fem) == expected_params
    # training adds D (C_in x 9 x 9 per 3x3 branch)
    assert sum(p.numel() for p in fem.parameters()) == expected_params + 2 * 1024 * 81


def test_fem_in_the_model_trains_with_the_projector_and_is_checkpointed(tmp_path):
    from medcap.checkpoint import load_checkpoint, save_checkpoint
    from medcap.models.builders import tiny_llama2_swin

    torch.manual_seed(5)
    model = tiny_llama2_swin(trainable={"encoder": "frozen", "projector": "full", "decoder": "frozen"}, fem={})
    assert isinstance(model.vision.projector, EnhancedProjector)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".fem.branches." in n for n in trainable) and any(".fem.fuse." in n for n in trainable)
    assert all(".projector." in n for n in trainable)
    with torch.no_grad():
        model.vision.projector.fem.fuse.weight.normal_()
    save_checkpoint(model, tmp_path / "ck")
    torch.manual_seed(6)
    other = tiny_llama2_swin(trainable={"encoder": "frozen", "projector": "full", "decoder": "frozen"}, fem={})
    load_checkpoint(other, tmp_path / "ck")
    assert other.vision.projector.fem.fuse.weight.equal(model.vision.projector.fem.fuse.weight)
    assert other.vision.projector.fem.branches[1][0].D.equal(model.vision.projector.fem.branches[1][0].D)
    # a checkpoint with FEM into a model without, and the reverse: the error says which model.fem to build
    from medcap.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"unexpected \['projector.fem.*the run trained a FEM: build the model "
                                              r"with its model.fem settings"):
        load_checkpoint(tiny_llama2_swin(trainable=dict(model.trainable)), tmp_path / "ck")
    save_checkpoint(tiny_llama2_swin(trainable=dict(model.trainable)), tmp_path / "plain")
    with pytest.raises(CheckpointError, match="the run trained without FEM: build the model with model.fem=null"):
        load_checkpoint(other, tmp_path / "plain")


def test_fem_keeps_the_mappers_token_count():
    from medcap.models import decoders, encoders
    from medcap.models.builders import LLAMA3_IMAGE_ID, vision_language_model

    encoder = encoders.tiny_vit(output="patch")
    model = vision_language_model(decoders.tiny_llama3(), encoder, "mlp2", LLAMA3_IMAGE_ID, fem={})
    assert model.tokens_per_image == encoder.num_tokens
    out = model.vision(torch.randn(2, 3, encoder.image_size, encoder.image_size))
    assert out.shape == (2, encoder.num_tokens, 64)
    with pytest.raises(ValueError, match="square grid of at least 2 x 2; this one gives 1 token"):
        vision_language_model(decoders.tiny_llama3(), encoders.tiny_vit(output="pooled"), "pooled_mlp",
                              LLAMA3_IMAGE_ID, num_tokens=8, fem={})  # one pooled token is no grid for FEM


# ------------------------------------------------------------------------------------------------ L2 regularisation

def _one_sgd_step(model, batches, regularizer, tmp_path):
    from medcap.training import TrainSettings, train

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    settings = TrainSettings(max_steps=1, clip_grad_norm=None, regularizer=regularizer)
    return train(model, optimizer, scheduler, iter(batches), settings, output_dir=tmp_path,
                 device=torch.device("cpu"), dtype=torch.float32)


def test_l2_gradient_adds_two_lambda_w_on_trained_weights_only(tmp_path):
    from medcap.training import l2_regularizer
    from recipes.finetune import param_groups
    from tests.test_training import make_batches
    from tests.tiny_vlm import tiny_vlm

    lam = 0.05
    trainable = {"encoder": "frozen", "projector": "full", "decoder": "frozen"}
    torch.manual_seed(0)
    plain = tiny_vlm(trainable=trainable).eval()  # eval: no dropout, the two runs see the same function
    torch.manual_seed(0)
    regularised = tiny_vlm(trainable=trainable).eval()
    start = {k: v.clone() for k, v in regularised.state_dict().items()}
    trained = [p for g in param_groups(regularised, 1.0, {}) for p in g["params"]]
    assert 0 < len(trained) < len(list(regularised.parameters()))
    expected_term = lam * sum(float(p.detach().double().square().sum()) for p in trained)

    batches = make_batches(1)
    _one_sgd_step(plain, batches, None, tmp_path / "plain")
    summary = _one_sgd_step(regularised, batches, l2_regularizer(trained, lam), tmp_path / "l2")
    record = summary["history"][0]
    assert record["reg_loss"] == pytest.approx(expected_term, rel=1e-5)
    assert record["total_loss"] == pytest.approx(record["loss"] + record["reg_loss"])
    # SGD(lr=1): the regularised update differs from the plain one by exactly -2 * lambda * w
    a, b = plain.state_dict(), regularised.state_dict()
    names = {n for n, p in regularised.named_parameters() if p.requires_grad}
    for name in start:
        if name in names:
            torch.testing.assert_close(b[name] - a[name], -2 * lam * start[name], atol=1e-6, rtol=1e-4)
        else:  # frozen weights: untouched by either run
            assert b[name].equal(start[name]) and a[name].equal(start[name])


def test_l2_lambda_must_not_be_negative():
    from medcap.training import l2_regularizer

    with pytest.raises(ValueError, match="l2_lambda"):
        l2_regularizer([], -1.0)


# --------------------------------------------------------------------------------------- clustering-based prompts

def test_findings_mining_handles_negation_per_clause():
    from medcap.prompt_clusters import CHEST_FINDINGS, affirmed_terms

    report = ("the heart is enlarged. no pneumothorax or pleural effusion. there is no focal consolidation but "
              "a calcified granuloma in the right upper lobe ; mild degenerative changes of the spine")
    assert affirmed_terms(report, CHEST_FINDINGS) == {"cardiomegaly", "granuloma", "calcification",
                                                      "degenerative changes"}
    assert affirmed_terms("lungs are clear without effusion, negative for pneumothorax.", CHEST_FINDINGS) == set()
    # whole words only: "masses" is a mass, "massive" is not a listed phrase, "nodularity" is not "nodular"
    assert affirmed_terms("massive nodularity", CHEST_FINDINGS) == set()


def test_findings_mining_negates_findings_reported_as_resolved_after_them():
    from medcap.prompt_clusters import CHEST_FINDINGS, affirmed_terms

    for report in ["the previously seen left pleural effusion has resolved .", "the effusions have resolved",
                   "the nodule is no longer seen", "the catheter has been removed",
                   "no focal consolidation , pleural effusion or pneumothorax ."]:
        assert affirmed_terms(report, CHEST_FINDINGS) == set(), report
    # only in its clause, only before it, and not when qualified
    assert affirmed_terms("the effusion has resolved . mild cardiomegaly", CHEST_FINDINGS) == {"cardiomegaly"}
    assert affirmed_terms("the pacemaker was removed but the effusion remains", CHEST_FINDINGS) == {"pleural effusion"}
    assert affirmed_terms("the catheter has been removed and a pacemaker placed", CHEST_FINDINGS) == {
        "surgical hardware"}
    for report in ["the effusion has not resolved", "the pleural effusion has partially resolved",
                   "the left pleural effusion has not completely resolved", "the effusion has not yet resolved"]:
        assert affirmed_terms(report, CHEST_FINDINGS) == {"pleural effusion"}, report
    # only the finding in its part of the clause: the others named before it stay affirmed
    for report in ["There is cardiomegaly and the left pleural effusion has resolved.",
                   "Cardiomegaly, the effusion has resolved.",
                   "Stable cardiomegaly with interval removal of the chest tube, pneumothorax no longer seen."]:
        assert affirmed_terms(report, CHEST_FINDINGS) == {"cardiomegaly"}, report


def test_prompts_name_each_clusters_most_frequent_affirmed_findings():
    import numpy as np

    from medcap.prompt_clusters import mine_prompts

    vocabulary = {"nodule": ["nodule"], "effusion": ["effusion"], "fracture": ["fracture"]}
    reports = ["a nodule. an effusion.", "a nodule.", "no nodule. effusion.", "fracture.", "no fracture.", "clear."]
    labels = np.array([0, 0, 0, 1, 1, 2])
    prompts, stats = mine_prompts(reports, labels, 3, vocabulary, "P: {findings}.", "P: normal.", top_k=2,
                                  min_share=0.5)
    # cluster 0: nodule affirmed in 2 of 3 reports, effusion in 2 of 3 -> ties keep the vocabulary's order
    assert prompts == ["P: nodule, effusion.", "P: fracture.", "P: normal."]
    assert stats[0] == {"size": 3, "affirmed": {"nodule": 2, "effusion": 2}, "findings": ["nodule", "effusion"]}
    assert stats[1]["affirmed"] == {"fracture": 1}  # 1 of 2 = min_share 0.5: kept


def test_r2gengpt_checkpoint_into_a_model_with_fem_names_fem(tmp_path):
    from medcap.models import import_r2gengpt
    from medcap.models.builders import tiny_llama2_swin

    model = tiny_llama2_swin(fem={})
    with pytest.raises(ValueError, match="the model has MeGPT's FEM"):
        import_r2gengpt.load(model, tmp_path / "r2gengpt.pth")


def test_clustering_saves_loads_and_assigns_the_nearest_centroid(tmp_path):
    import numpy as np

    from medcap.prompt_clusters import META_FILE, WEIGHTS_FILE, PromptClusters

    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(4, 8)).astype(np.float32)
    clusters = PromptClusters(centroids, ["a", "b", "c", "d"], np.ones(8), {"source": {"encoder": None}})
    clusters.save(tmp_path)
    assert (tmp_path / META_FILE).is_file() and (tmp_path / WEIGHTS_FILE).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = PromptClusters.load(tmp_path)
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    oracle = ((queries[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert loaded.assign(queries).tolist() == oracle.tolist()
    assert loaded.prompts == ["a", "b", "c", "d"] and loaded.probe.tolist() == [1.0] * 8
    assert PromptClusters.load(tmp_path / "nothing_here") is None
    with pytest.raises(ValueError, match="4 clusters but 3 prompts"):
        PromptClusters(centroids, ["a", "b", "c"], np.ones(8), {})


@pytest.fixture(scope="module")
def megpt_run(tmp_path_factory):
    """configs/tiny/megpt.yaml trained for 2 steps in a folder holding a small demo set."""
    import os

    from medcap import cli
    from medcap.data.demo_builder import build_demo

    root = tmp_path_factory.mktemp("megpt")
    build_demo(root / "datasets" / "demo", seed=0, n_train=16, n_val=8, n_test=8)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli.run_recipe("finetune", "tiny/megpt", ["max_steps=2", "eval_every=2", "val_generation.weights=null",
                                                   "save_every=null"])
    finally:
        os.chdir(cwd)
    return root


def test_tiny_megpt_trains_with_all_modules_and_saves_its_clustering(megpt_run):
    import json

    from safetensors.torch import load_file

    folder = megpt_run / "outputs/tiny/megpt/checkpoints/step_000002"
    weights = load_file(folder / "model.safetensors")
    assert any(k.startswith("projector.fem.branches.1.0.D") for k in weights)
    assert any(k.startswith("projector.mapper.") for k in weights)
    meta = json.loads((folder / "prompt_clusters.json").read_text())
    assert meta["num_clusters"] == 3 and len(meta["prompts"]) == 3
    assert meta["source"]["encoder"]["_component_"] == "medcap.models.encoders.tiny_efficientnet"
    assert sum(c["size"] for c in meta["clusters"]) == 16
    history = json.loads((megpt_run / "outputs/tiny/megpt/train_summary.json").read_text())["history"]
    assert all(h["reg_loss"] > 0 and h["total_loss"] == pytest.approx(h["loss"] + h["reg_loss"]) for h in history)


def test_generation_picks_each_images_prompt_from_the_saved_clustering(megpt_run, monkeypatch):
    import csv

    from omegaconf import OmegaConf

    from medcap import cli, prompt_clusters
    from medcap.data.dataset import CaptionDataset
    from medcap.models.encoders import tiny_efficientnet
    from medcap.retrieval import ImageEmbedder

    monkeypatch.chdir(megpt_run)
    cli.run_recipe("generate", "tiny/megpt_generate", ["max_new_tokens=2"])
    with open("outputs/tiny/megpt_generate/predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 8

    folder = megpt_run / "outputs/tiny/megpt/checkpoints/step_000002"
    cfg = OmegaConf.create({"checkpoint": "outputs/tiny/megpt/checkpoints", "dynamic_prompts": True})
    dataset = CaptionDataset("datasets/demo/test.jsonl", with_captions=False)
    clusters = prompt_clusters.for_generation(cfg, dataset, torch.device("cpu"))
    # oracle: the recorded encoder rebuilt by hand (seed 0), features by numpy, nearest centroid by numpy
    torch.manual_seed(0)
    embedder = ImageEmbedder(tiny_efficientnet(), torch.device("cpu"))
    features = embedder.embed_samples(dataset.samples)
    nearest = ((features[:, None] - clusters.centroids[None]) ** 2).sum(-1).argmin(1)
    assert [s["prompt"] for s in dataset.samples] == [clusters.prompts[c] for c in nearest]
    # the generate config's own feature_encoder (its paths: the weights may have moved since training), checked
    # against the recorded features
    own = {"_component_": "medcap.models.encoders.tiny_efficientnet"}
    again = CaptionDataset("datasets/demo/test.jsonl", with_captions=False)
    prompt_clusters.for_generation(OmegaConf.merge(cfg, {"feature_encoder": own, "seed": 0}), again,
                                   torch.device("cpu"))
    assert [s["prompt"] for s in again.samples] == [s["prompt"] for s in dataset.samples]
    with pytest.raises(ValueError, match="probe input differs"):
        prompt_clusters.for_generation(OmegaConf.merge(cfg, {"feature_encoder": own, "seed": 1}), again,
                                       torch.device("cpu"))

    # a checkpoint whose feature encoder cannot be rebuilt as it was (another seed: other weights) is refused
    meta = (folder / "prompt_clusters.json").read_text()
    try:
        (folder / "prompt_clusters.json").write_text(meta.replace('"seed": 0', '"seed": 1', 1))
        with pytest.raises(ValueError, match="probe input differs"):
            prompt_clusters.for_generation(cfg, CaptionDataset("datasets/demo/test.jsonl", with_captions=False),
                                           torch.device("cpu"))
    finally:
        (folder / "prompt_clusters.json").write_text(meta)
    # a generation config asking for dynamic prompts from a checkpoint without a clustering
    (folder / "prompt_clusters.json").rename(folder / "moved.json")
    try:
        with pytest.raises(ValueError, match="holds no prompt_clusters.json"):
            prompt_clusters.for_generation(cfg, dataset, torch.device("cpu"))
    finally:
        (folder / "moved.json").rename(folder / "prompt_clusters.json")


def test_validation_images_are_clustered_once_for_the_loss_and_the_generated_captions(tmp_path, monkeypatch):
    from medcap import cli
    from medcap.data.demo_builder import build_demo
    from medcap.prompt_clusters import PromptClusters
    from medcap.retrieval import ImageEmbedder

    build_demo(tmp_path / "datasets" / "demo", seed=0, n_train=16, n_val=8, n_test=8)
    monkeypatch.chdir(tmp_path)
    embedded, prompted = [], []
    embed, set_prompts = ImageEmbedder.embed_samples, PromptClusters.set_prompts

    def counting_embed(self, samples, *args, **kwargs):
        embedded.append(len(samples))
        return embed(self, samples, *args, **kwargs)

    def recording_set_prompts(self, dataset, labels):
        set_prompts(self, dataset, labels)
        prompted.append([(s["id"], s["cluster"], s["prompt"]) for s in dataset.samples])

    monkeypatch.setattr(ImageEmbedder, "embed_samples", counting_embed)
    monkeypatch.setattr(PromptClusters, "set_prompts", recording_set_prompts)
    cli.run_recipe("finetune", "tiny/megpt", ["max_steps=1", "eval_every=1", "save_every=null"])
    # the training images (clustering), the validation images once (8); the check_embedder probes are 1-image calls
    assert [n for n in embedded if n > 1] == [16, 8]
    assert len(prompted) == 3 and prompted[1] == prompted[2] and len(prompted[1]) == 8  # train, val loss, val captions
    assert len({c for _, c, _ in prompted[2]}) > 1  # several clusters, so the equality above means something

# ------------------------------------------------------------------------------------------------------ configs

ROWS = {"base": set(), "fem": {"model.fem"}, "prompt": {"dynamic_prompts"}, "l2": {"l2_lambda", "optimizer"},
        "full": {"model.fem", "dynamic_prompts", "l2_lambda", "optimizer"}}


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("model",):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("row", sorted(ROWS))
def test_megpt_ablation_rows_differ_from_the_base_only_in_their_modules(row):
    from omegaconf import OmegaConf

    from medcap.models import builders

    def load(name):
        cfg = OmegaConf.load(f"configs/megpt/iuxray_{name}.yaml")
        return cfg, _flat(OmegaConf.to_container(cfg))

    base_cfg, base = load("base")
    cfg, flat = load(row)
    differing = {k for k in base.keys() | flat.keys() if base.get(k) != flat.get(k)} - {"output_dir"}
    assert differing == ROWS[row]
    assert flat["output_dir"] == f"outputs/megpt_iuxray_{row}"
    assert cfg.model._component_ == "medcap.models.builders.llama2_7b_swin"
    fem = OmegaConf.to_container(cfg.model.fem) if "fem" in cfg.model else None
    model = builders.tiny_llama2_swin(trainable=dict(cfg.model.trainable), views_per_block=2, fem=fem)
    trained = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"encoder", "projector"}
    assert any(".fem." in n for n, p in model.named_parameters() if p.requires_grad) == (fem is not None)
    if "dynamic_prompts" in cfg:  # the feature encoder is the Swin-B the model starts from
        node = OmegaConf.to_container(cfg.dynamic_prompts)
        assert node["feature_encoder"] == {"_component_": "medcap.models.encoders.swin_base",
                                           "checkpoint": "${vision_checkpoint}"}
    if "l2_lambda" in cfg:
        assert cfg.l2_lambda > 0 and cfg.optimizer.weight_decay == 0.0


@pytest.mark.parametrize("row", ["base", "fem", "prompt", "l2", "full"])
def test_demo_ablation_rows_turn_exactly_their_modules_off(row):
    from argparse import Namespace

    from omegaconf import OmegaConf
    from torchtune.config._utils import _merge_yaml_and_cli_args

    from medcap.cli import check_override_keys, find_config
    from medcap.demo_megpt import ROWS, row_overrides

    path = find_config("demo/megpt")
    overrides = row_overrides(ROWS[row])
    check_override_keys(path, overrides)  # what make demo-megpt passes is accepted by the CLI
    yaml = OmegaConf.to_container(OmegaConf.load(path))
    cfg = _merge_yaml_and_cli_args(Namespace(**yaml), overrides)  # as the recipe reads them
    assert (cfg.model.fem is not None) == ("fem" in ROWS[row])
    assert (cfg.get("dynamic_prompts") is not None) == ("prompt" in ROWS[row])
    assert bool(cfg.get("l2_lambda")) == ("l2" in ROWS[row])
    assert cfg.max_steps == yaml["max_steps"] and cfg.optimizer.lr == yaml["optimizer"]["lr"]  # same budget


def test_demo_ablation_markdown_table():
    from medcap.demo_megpt import markdown_table

    text = markdown_table({"base": {"BLEU-4": 0.12345}, "full": {}}, ["BLEU-4", "CIDEr"])
    assert text.splitlines() == ["| row | BLEU-4 | CIDEr |", "|---|---:|---:|", "| base | 0.1235 | - |",
                                 "| full | - | - |"]


def test_kmeans_trains_on_every_feature_and_keeps_the_best_start():
    from types import SimpleNamespace

    import numpy as np
    from omegaconf import OmegaConf

    from medcap.prompt_clusters import fit_prompt_clusters

    rng = np.random.default_rng(0)
    features = rng.standard_normal((300, 8)).astype(np.float32)
    stub = SimpleNamespace(embed_samples=lambda samples, batch_size, desc: features, source={},
                           embed_images=lambda images: np.zeros((1, 8), np.float32),
                           encoder=SimpleNamespace(image_size=4))
    dataset = SimpleNamespace(samples=[{"caption": "no finding"}] * 300, name="stub")
    node = OmegaConf.create({"num_clusters": 1, "niter": 5, "prompts": ["p"]})
    fitted, _ = fit_prompt_clusters(node, dataset, stub, "Describe.", seed=0)
    # one centroid: the mean of all 300 features (faiss alone would train on a sample of 256 of them)
    np.testing.assert_allclose(fitted.centroids[0], features.mean(0), atol=1e-5)

    # three tight groups; the best of several starts finds them, the inertia is the groups' own
    centres = rng.standard_normal((3, 8)).astype(np.float32) * 10
    grouped = np.repeat(centres, [5, 5, 290], axis=0) + 0.01 * rng.standard_normal((300, 8)).astype(np.float32)
    stub.embed_samples = lambda samples, batch_size, desc: grouped
    node = OmegaConf.create({"num_clusters": 3, "niter": 10, "nredo": 10, "prompts": ["a", "b", "c"]})
    fitted, labels = fit_prompt_clusters(node, dataset, stub, "Describe.", seed=0)
    assert sorted(np.bincount(labels).tolist()) == [5, 5, 290]
