"""SpRAy and the HDF5 heatmap store."""

import sys

import numpy as np
import pytest
import torch

import fastlrp
from fastlrp import analysis
from fastlrp.apps.demo import load_demo_model, make_dataset


def purity(labels, truth):
    """Share of samples that belong to their cluster's majority (1 = every cluster is pure)."""
    return sum(max(truth[labels == k].sum(), (~truth[labels == k]).sum()) for k in np.unique(labels)) / len(truth)


@pytest.fixture(scope="module")
def watermark_heatmaps():
    """LRP heatmaps of the class-1 images of a Clever-Hans set in which half carry the watermark."""
    model = load_demo_model()
    images, labels, marked = make_dataset(160, seed=23, watermark_fraction=0.5)
    cross = labels == 1
    relevance = fastlrp.LRP(model, composite="epsilon_plus")(images[cross], labels[cross]).detach()
    return relevance, marked[cross].numpy()


# --- building blocks ----------------------------------------------------------------------

def test_eigengap_finds_planted_blocks():
    # three groups of points far apart: the kNN graph has three components
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(c, 0.1, size=(20, 4)) for c in (0.0, 5.0, 10.0)])
    affinity = analysis.knn_affinity(points, 5)
    assert (affinity != affinity.T).nnz == 0 and affinity.diagonal().sum() == 0
    assert (np.asarray(affinity.sum(1)).ravel() >= 5).all()
    values, vectors = analysis.spectral_decomposition(affinity, 6)
    assert np.allclose(values[:3], 0, atol=1e-9) and values[3] > 0.05
    assert analysis.suggest_clusters(values, 5) == 3
    labels = analysis.kmeans(vectors[:, :3] / np.linalg.norm(vectors[:, :3], axis=1, keepdims=True), 3)
    assert purity(labels, np.arange(60) < 20) == 1 and len(np.unique(labels)) == 3


def test_sparse_solver_agrees_with_dense(monkeypatch):
    rng = np.random.default_rng(1)
    points = np.concatenate([rng.normal(c, 1.0, size=(40, 3)) for c in (0.0, 3.0)])
    affinity = analysis.knn_affinity(points, 6)
    dense, _ = analysis.spectral_decomposition(affinity, 4)
    # the module, not the function that shares its name on the package
    monkeypatch.setattr(sys.modules["fastlrp.analysis.spray"], "DENSE_LIMIT", 10)
    sparse, _ = analysis.spectral_decomposition(affinity, 4)
    assert np.allclose(dense, sparse, atol=1e-8)


def test_pooling_and_normalization():
    heat = torch.zeros(2, 3, 8, 8)
    heat[0, :, :4, :4] = 1.0   # top-left quarter, summed over 3 channels
    heat[1, 0, 4:, 4:] = -2.0
    pooled = analysis.pool_heatmaps(heat, 2)
    assert pooled.shape == (2, 4)
    assert np.allclose(pooled, [[1, 0, 0, 0], [0, 0, 0, -1]])
    assert np.allclose(analysis.pool_heatmaps(heat, 2, normalize=None)[0], [3, 0, 0, 0])


def test_spray_errors_name_the_argument():
    heat = torch.rand(20, 8, 8)
    with pytest.raises(ValueError, match="n_neighbors"):
        analysis.spray(heat, n_neighbors=20)
    with pytest.raises(ValueError, match="pooled_size"):
        analysis.spray(heat, pooled_size=16)
    with pytest.raises(ValueError, match="normalize"):
        analysis.spray(heat, normalize="z")
    with pytest.raises(ValueError, match="embedding"):
        analysis.spray(heat, embedding="umap")
    with pytest.raises(ValueError, match="n_clusters"):
        analysis.spray(heat, n_clusters=0)
    with pytest.raises(TypeError, match="heatmaps"):
        analysis.spray([[1.0]])
    with pytest.raises(ValueError, match="heatmaps"):
        analysis.spray(torch.rand(20, 8))


# --- SpRAy on the Clever-Hans data ----------------------------------------------------------

def test_spray_separates_the_watermark_images(watermark_heatmaps):
    relevance, marked = watermark_heatmaps
    two = analysis.spray(relevance, n_clusters=2, n_neighbors=6, pooled_size=4)
    assert two.n_clusters == 2 and two.labels.shape == (len(marked),)
    assert purity(two.labels, marked) > 0.9
    watermark_cluster = int(np.argmax([marked[two.labels == k].mean() for k in range(2)]))
    # the prototype of the watermark cluster puts its relevance in the bottom-right corner
    corner = two.prototypes[watermark_cluster][-6:, -6:].sum() / np.abs(two.prototypes[watermark_cluster]).sum()
    assert corner > 0.2 > two.prototypes[1 - watermark_cluster][-6:, -6:].sum()
    # with the eigengap's own choice, clusters are still nearly pure (strategies may split further)
    free = analysis.spray(relevance, n_neighbors=6, pooled_size=4, max_clusters=8)
    assert 2 <= free.suggested_clusters <= 8 and free.n_clusters == free.suggested_clusters
    assert purity(free.labels, marked) > 0.85
    assert free.embedding_2d.shape == (len(marked), 2)
    assert np.all(np.diff(free.eigenvalues) >= -1e-9)


def test_spray_plot(watermark_heatmaps):
    import matplotlib
    matplotlib.use("Agg")
    result = analysis.spray(watermark_heatmaps[0], n_clusters=2, n_neighbors=6, pooled_size=4)
    figure = result.plot()
    assert len(figure.axes) == 4


def test_tsne_embedding(watermark_heatmaps):
    pytest.importorskip("sklearn")
    result = analysis.spray(watermark_heatmaps[0][:40], n_clusters=2, n_neighbors=6, embedding="tsne")
    assert result.embedding_2d.shape == (40, 2) and np.isfinite(result.embedding_2d).all()


# --- HDF5 storage ------------------------------------------------------------------------------

def test_store_round_trip_and_spray_from_disk(tmp_path, watermark_heatmaps):
    pytest.importorskip("h5py")
    relevance, marked = watermark_heatmaps
    path = tmp_path / "heat.h5"
    with analysis.HeatmapStore(path, "w", chunk_rows=16) as store:
        for part, flags in zip(relevance.split(13), torch.from_numpy(marked).split(13)):
            store.append(part.sum(1), marked=flags)
    with analysis.HeatmapStore(path) as store:
        assert len(store) == len(marked) and store.shape == (32, 32)
        assert np.array_equal(store.column("marked"), marked)
        assert np.allclose(store.read(5, 9), relevance[5:9].sum(1).numpy(), atol=1e-6)
        assert sum(len(chunk) for _, chunk in store.chunks(7)) == len(marked)
        # chunked reading (chunks smaller than the data) gives the in-memory result
        on_disk = analysis.spray(store, n_clusters=2, n_neighbors=6, pooled_size=4, chunk_size=10)
    in_memory = analysis.spray(relevance, n_clusters=2, n_neighbors=6, pooled_size=4)
    assert np.array_equal(on_disk.labels, in_memory.labels)
    assert np.allclose(on_disk.prototypes, in_memory.prototypes, atol=1e-5)


def test_write_heatmaps_explains_in_batches(tmp_path):
    pytest.importorskip("h5py")
    images = torch.rand(10, 3, 8, 8)
    targets = torch.arange(10) % 2
    path = analysis.write_heatmaps(tmp_path / "h.h5", lambda x, t: x * (t[:, None, None, None] + 1), images,
                                   targets, batch_size=4)
    with analysis.HeatmapStore(path) as store:
        assert store.shape == (8, 8) and store.columns == ["targets"]
        assert np.allclose(store.read(), (images * (targets[:, None, None, None] + 1)).sum(1).numpy(), atol=1e-6)
        assert np.array_equal(store.column("targets"), targets.numpy())
        with pytest.raises(KeyError, match="labels"):
            store.column("labels")


def test_store_errors(tmp_path):
    pytest.importorskip("h5py")
    with pytest.raises(FileNotFoundError):
        analysis.HeatmapStore(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="mode"):
        analysis.HeatmapStore(tmp_path / "x.h5", "x")
    with analysis.HeatmapStore(tmp_path / "x.h5", "w") as store:
        store.append(np.zeros((2, 4, 4)))
        with pytest.raises(ValueError, match="heatmaps"):
            store.append(np.zeros((2, 5, 5)))
        with pytest.raises(ValueError, match="column"):
            store.append(np.zeros((2, 4, 4)), labels=np.zeros(3))


def test_missing_h5py_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match=r"fastlrp\[analysis\]"):
        analysis.HeatmapStore(tmp_path / "x.h5", "w")
