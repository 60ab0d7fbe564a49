"""fastlrp.concepts: conditional heatmaps (Concept Relevance Propagation), concept relevance per layer,
hierarchies, reference samples and the atlas. Small models, float64 where results are compared."""

import importlib.util

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp.analysis import neuron_groups
from fastlrp.concepts import (Condition, channel_conditions, channel_relevance, concept_atlas, concept_hierarchy,
                              concept_relevance, conditional_heatmaps, group_conditions, plot_concept_atlas,
                              reference_regions, reference_samples, top_references)
from fastlrp.concepts.references import _merge
from fastlrp.analysis import HeatmapStore

BACKENDS = ["reference"] + (["native"] if "native" in fastlrp.available_backends() else [])


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3)).double().eval()


class Residual(nn.Module):
    """conv -> relu -> (x + conv(x)) -> relu -> pool -> linear: layer 'conv2' sits on a branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(x + self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_heatmaps_add_up_to_the_unconditioned_heatmap(backend, x):
    explainer = fastlrp.LRP(small_cnn(), backend=backend)
    full = explainer.explain(x, 1, layers=["2"])
    result = conditional_heatmaps(explainer, x, channel_conditions("2", 8), target=1)
    assert result.relevance.shape == (2, 8, 3, 10, 10)
    torch.testing.assert_close(result.relevance.sum(1), full.relevance, rtol=0, atol=1e-14)
    # each concept's relevance at its layer is that channel's share of the layer's relevance
    torch.testing.assert_close(result.concept_relevance, channel_relevance(full.layers["2"]), rtol=0, atol=1e-14)
    assert (result.targets == 1).all()


def test_group_equals_the_sum_of_its_members(x):
    explainer = fastlrp.LRP(small_cnn())
    members = conditional_heatmaps(explainer, x, channel_conditions("5", [1, 4, 6]))
    group = conditional_heatmaps(explainer, x, [Condition("5", [1, 4, 6])])
    torch.testing.assert_close(group.relevance[:, 0], members.relevance.sum(1), rtol=0, atol=1e-14)


def test_batched_conditions_equal_one_at_a_time(x):
    explainer = fastlrp.LRP(small_cnn())
    parent = Condition("5", 2)
    conditions = [Condition("2", 3), Condition("2", [0, 5], target=2), Condition("5", 7),
                  Condition("0", 1, parent=parent), Condition("2", 4, parent=parent)]
    batched = conditional_heatmaps(explainer, x, conditions, target=torch.tensor([0, 1]))
    chunked = conditional_heatmaps(explainer, x, conditions, target=torch.tensor([0, 1]), chunk_size=1)
    for k, condition in enumerate(conditions):
        alone = conditional_heatmaps(explainer, x, [condition], target=torch.tensor([0, 1]))
        torch.testing.assert_close(batched.relevance[:, k], alone.relevance[:, 0], rtol=0, atol=1e-15)
        torch.testing.assert_close(batched.concept_relevance[:, k], alone.concept_relevance[:, 0], rtol=0, atol=1e-15)
    torch.testing.assert_close(chunked.relevance, batched.relevance, rtol=0, atol=1e-15)
    assert batched.targets[:, 1].tolist() == [2, 2] and batched.targets[:, 0].tolist() == [0, 1]


def test_prediction_is_the_default_target(x):
    model = small_cnn()
    predicted = model(x).argmax(1)
    by_default = conditional_heatmaps(model, x, [Condition("2", 3)])
    explicit = conditional_heatmaps(model, x, [Condition("2", 3)], target=predicted)
    assert torch.equal(by_default.targets[:, 0], predicted)
    torch.testing.assert_close(by_default.relevance, explicit.relevance, rtol=0, atol=0)


def test_exclude_parallel_keeps_only_the_relevance_through_a_branch():
    model = Residual().double().eval()
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    explainer = fastlrp.LRP(model)
    full = explainer(x, 0)
    everything = Condition("conv2", [0, 1, 2, 3])
    # masking nothing away: without exclude_parallel the shortcut's relevance still arrives
    open_branch = conditional_heatmaps(explainer, x, [everything], 0, exclude_parallel=False)
    torch.testing.assert_close(open_branch.relevance[0, 0], full[0], rtol=0, atol=1e-14)
    # with it (zennit-crp's default) only what flows through conv2 does, channel by channel
    branch = conditional_heatmaps(explainer, x, [everything], 0)
    channels = conditional_heatmaps(explainer, x, channel_conditions("conv2", 4), 0)
    assert (branch.relevance - full).abs().max() > 1e-6
    torch.testing.assert_close(channels.relevance.sum(1), branch.relevance[:, 0], rtol=0, atol=1e-14)


def test_neuron_groups_as_conditions_split_the_heatmap(x):
    model = small_cnn()
    groups = neuron_groups(model, x, "6", groups=3, target=1, iterations=25)
    explainer = fastlrp.LRP(model)
    result = conditional_heatmaps(explainer, x, group_conditions(groups, target=1))
    torch.testing.assert_close(result.relevance.sum(1), explainer(x, 1), rtol=0, atol=1e-13)
    members = group_conditions(groups, mode="members", threshold=0.5)
    assert all(c.channels and all(groups.channel_factors[g, list(c.channels)] >= 0.5)
               for g, c in enumerate(members))


def test_concept_relevance_ranks_channels_and_the_hierarchy_splits_a_concept(x):
    explainer = fastlrp.LRP(small_cnn())
    one = x[:1]
    ranked = concept_relevance(explainer, one, 1, layers=["2", "5"], k=3)
    layer = explainer.explain(one, 1, layers=["5"]).layers["5"]
    per_channel = channel_relevance(layer)[0]
    assert ranked["5"].channels == per_channel.topk(3).indices.tolist()
    assert ranked["5"].shares[0] == pytest.approx((per_channel.max() / per_channel.abs().sum()).item())
    assert ranked["5"].total == pytest.approx(per_channel.sum().item())

    top = Condition("5", ranked["5"].channels[0], target=1)
    tree = concept_hierarchy(explainer, one, top, lower_layers=["2", "0"], width=[2, 1])
    assert [(depth, node.layer) for depth, node in tree.walk()] == [
        (0, "5"), (1, "2"), (2, "0"), (1, "2"), (2, "0")]
    below = conditional_heatmaps(explainer, one, [top], layers=["2"]).layers["2"][0, 0]
    expected = channel_relevance(below[None])[0]
    first = tree.children[0]
    assert first.channel == expected.argmax().item()
    assert first.relevance == pytest.approx(expected.max().item())
    # a node's own conditional relevance at its layer is the share it had in its parent
    again = conditional_heatmaps(explainer, one, [first.condition])
    assert again.concept_relevance[0, 0].item() == pytest.approx(first.relevance)


def test_bad_conditions_are_named(x):
    model = small_cnn()
    with pytest.raises(KeyError, match="'nope'"):
        conditional_heatmaps(model, x, [Condition("nope", 1)])
    with pytest.raises(ValueError, match=r"channels \[9\] out of range for 8"):
        conditional_heatmaps(model, x, [Condition("2", 9)])
    with pytest.raises(ValueError, match="either channels or weights"):
        Condition("2")
    with pytest.raises(TypeError, match="tuple"):
        conditional_heatmaps(model, x, ["2"])
    with pytest.raises(ValueError, match="conditions is empty"):
        conditional_heatmaps(model, x, [])


@pytest.mark.skipif(importlib.util.find_spec("crp") is None,
                    reason="zennit-crp is not installed (pip install --no-deps zennit-crp)")
def test_agrees_with_zennit_crp(x):
    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlus

    model = small_cnn()
    ours = conditional_heatmaps(model, x, channel_conditions("2", 8) + [Condition("5", [0, 3])], target=1)
    attribution = CondAttribution(small_cnn())  # zennit-crp sets requires_grad=False on its model's parameters
    # zennit-crp repeats each sample once per condition (entry n * K + k), as fastlrp does; its heatmap is
    # the input relevance summed over channels, its start the target's logit (fastlrp's start="logit")
    channels = attribution(x.clone().requires_grad_(True), [{"2": [c], "y": [1]} for c in range(8)], EpsilonPlus(),
                           record_layer=["2"])
    torch.testing.assert_close(ours.heatmaps[:, :8], channels.heatmap.reshape(2, 8, 10, 10), rtol=1e-10, atol=1e-15)
    # The relevance zennit-crp records at a conditioned layer is twice the layer's relevance under its
    # default exclude_parallel=True (its retained .grad adds up both stages of its chained backward pass);
    # with exclude_parallel=False (the same numbers on this sequential model) it is fastlrp's.
    def recorded(result):
        return result.relevances["2"].reshape(2, 8, 8, 10, 10).sum((3, 4)).diagonal(dim1=1, dim2=2)

    torch.testing.assert_close(recorded(channels), 2 * ours.concept_relevance[:, :8], rtol=1e-10, atol=1e-15)
    single = attribution(x.clone().requires_grad_(True), [{"2": [c], "y": [1]} for c in range(8)], EpsilonPlus(),
                         record_layer=["2"], exclude_parallel=False)
    torch.testing.assert_close(single.heatmap, channels.heatmap, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(recorded(single), ours.concept_relevance[:, :8], rtol=1e-10, atol=1e-15)
    group = attribution(x.clone().requires_grad_(True), [{"5": [0, 3], "y": [1]}], EpsilonPlus())
    torch.testing.assert_close(ours.heatmaps[:, 8], group.heatmap, rtol=1e-10, atol=1e-15)


@pytest.fixture(scope="module")
def demo():
    from fastlrp.apps.demo.data import make_dataset
    from fastlrp.apps.demo.model import load_demo_model

    images, labels, marked = make_dataset(96, seed=3)
    return fastlrp.LRP(load_demo_model()), images, labels, marked


def test_demo_watermark_concept_is_found_with_watermarked_references(demo, tmp_path):
    pytest.importorskip("h5py")
    from fastlrp.apps.demo.data import WATERMARK_CLASS, add_watermark, watermark_mask

    explainer, images, labels, marked = demo
    layer = "relu4"
    # The watermark concept, found without CRP: the channel whose relevance for the watermark class
    # grows most when the watermark is pasted into clean images of that class.
    clean = images[(labels == WATERMARK_CLASS) & ~marked]
    before = channel_relevance(explainer.explain(clean, WATERMARK_CLASS, layers=[layer]).layers[layer])
    after = channel_relevance(explainer.explain(add_watermark(clean), WATERMARK_CLASS, layers=[layer]).layers[layer])
    concept = (after - before).mean(0).argmax().item()

    watermarked = images[marked][:6]
    per_image = channel_relevance(explainer.explain(watermarked, WATERMARK_CLASS, layers=[layer]).layers[layer])
    found = (per_image.topk(3, dim=1).indices == concept).any(1)
    assert found.sum() >= 5, found
    # its conditional heatmaps sit on the watermark more than the whole heatmap does
    conditioned = conditional_heatmaps(explainer, watermarked, [Condition(layer, concept)], WATERMARK_CLASS)
    whole = explainer(watermarked, WATERMARK_CLASS).sum(1)

    def on_mark(heat):
        positive = heat.clamp(min=0)
        return ((positive * watermark_mask()).flatten(1).sum(1) / positive.flatten(1).sum(1)).mean()

    assert on_mark(conditioned.heatmaps[:, 0]) > on_mark(whole)

    refs = reference_samples(explainer, images, layer, tmp_path / "scores.h5", target=None, k=8, batch_size=48)
    index, scores = refs.top(concept, "relevance")
    # 6 of 8 where about 36% of the dataset is watermarked (at random: P(>= 6) is about 2%)
    assert marked[index].sum() >= 6, (index, marked.float().mean())
    assert scores[0] >= scores[-1]
    patches, boxes = reference_regions(explainer, images[index[:2]], Condition(layer, concept), size=16)
    assert patches.shape == (2, 3, 16, 16) and boxes.shape == (2, 4)


def test_scores_stream_in_chunks_and_shards_merge(tmp_path):
    pytest.importorskip("h5py")
    model = small_cnn().float()
    data = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    one = reference_samples(model, data, "2", tmp_path / "all.h5", k=3, batch_size=4)
    # two "ranks" by hand: the merge of their shards gives the same top samples
    for rank, rows in enumerate([(0, 4), (4, 10)]):
        with HeatmapStore(tmp_path / f"all.h5.part{rank}-of-2", "w") as store, \
                HeatmapStore(tmp_path / "all.h5") as whole:
            store.append(whole.read(*rows), **{c: whole.column(c)[rows[0]:rows[1]] for c in whole.columns})
    _merge([tmp_path / f"all.h5.part{r}-of-2" for r in range(2)], tmp_path / "merged.h5")
    merged = top_references(tmp_path / "merged.h5", "2", k=3, chunk_size=3)
    # the same scores (indices may swap where scores tie, e.g. channels without relevance)
    assert torch.equal(merged.relevance_scores, one.relevance_scores)
    assert torch.equal(merged.activation_scores, one.activation_scores)
    scores = fastlrp.LRP(model).explain(data, None, layers=["2"]).activations["2"].flatten(2).amax(2)
    torch.testing.assert_close(one.activation_scores, scores.T.topk(3, dim=1).values.float())


def test_atlas_plots_and_the_demo_report_shows_the_watermark_concept(demo, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("h5py")
    from fastlrp.apps.demo.report import concept_section

    explainer, images, _, marked = demo
    bare = concept_atlas(explainer, images[marked][:1], "relu5", k=2)  # without references
    assert bare.heatmaps.shape == (2, 32, 32) and bare.patches is None and bare.target == 1
    plot_concept_atlas(bare).savefig(tmp_path / "atlas.png")
    assert (tmp_path / "atlas.png").stat().st_size > 0

    # with references: the report's section (atlas, reference regions, the figure)
    (title, body), summary = concept_section(explainer, 64, seed=1, k=3, refs=4)
    assert "<img" in body and "a watermark concept" in body
    assert summary["watermark_concept"] is not None, summary


def test_cli_concepts_on_a_folder_and_an_image(tmp_path, capsys):
    pytest.importorskip("h5py")
    pytest.importorskip("matplotlib")
    import json

    from fastlrp.apps.cli import main
    from fastlrp.apps.demo.data import make_dataset
    from fastlrp import viz

    images, _, _ = make_dataset(6, seed=5)
    folder = tmp_path / "images"
    folder.mkdir()
    for k, image in enumerate(images):
        viz.save_png(folder / f"{k}.png", viz.image_to_uint8(image))
    model = ["--model", "fastlrp.apps.demo.model:load_demo_model", "--layer", "relu4", "--device", "cpu"]
    assert main(["concepts", str(folder), *model, "--out", str(tmp_path / "out"), "--top", "2", "--refs", "2",
                 "--atlases", "1", "--batch-size", "4"]) == 0
    summary = json.loads((tmp_path / "out" / "concepts.json").read_text())
    (entry,) = summary["images"]
    assert len(entry["concepts"]) == 2 and len(entry["concepts"][0]["references"]) == 2
    assert (tmp_path / "out" / "0_concepts.png").stat().st_size > 0
    assert (tmp_path / "out" / "scores.h5").exists()
    assert main(["concepts", str(folder / "1.png"), *model, "--out", str(tmp_path / "one")]) == 0
    assert "top channels of relu4" in capsys.readouterr().out
    assert main(["concepts", str(folder / "1.png"), *model[:2], "--layer", "nope", "--out", str(tmp_path)]) == 2
    assert "'nope' is not a layer" in capsys.readouterr().err
