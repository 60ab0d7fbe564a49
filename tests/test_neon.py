"""NEON: neuralized k-means and one-class SVM."""

import pytest
import torch

from fastlrp.analysis import NeuralizedKMeans, NeuralizedOneClassSVM

FEATURES = 6


@pytest.fixture
def blobs():
    """Three clusters that differ only in features 0 and 1; features 2-5 are shared noise."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.zeros(3, FEATURES, dtype=torch.float64)
    centres[:, :2] = torch.tensor([[6.0, 0.0], [0.0, 6.0], [-6.0, -6.0]], dtype=torch.float64)
    points = torch.cat([c + torch.randn(40, FEATURES, generator=generator, dtype=torch.float64) for c in centres])
    truth = torch.arange(3).repeat_interleave(40)
    # centroids estimated from the data, so they differ (a little) in the noise features too
    centroids = torch.stack([points[truth == k].mean(0) for k in range(3)])
    return points, truth, centroids


def test_kmeans_evidence_is_conserved_and_points_at_the_separating_features(blobs):
    points, truth, centroids = blobs
    model = NeuralizedKMeans(centroids)
    assert torch.equal(model.assign(points), truth)
    explanation = model.explain(points)
    assert explanation.relevance.shape == points.shape
    # conservation: the features share exactly the cluster evidence f_c(x)
    assert explanation.conservation_error().max() < 1e-10
    assert (explanation.score > 0).all()  # each point is evidence for its own cluster
    # evidence is at most the hard min of the logits, and close to it
    hard = model.logits(points, truth).min(1).values
    assert (explanation.score <= hard + 1e-9).all()
    assert ((hard - explanation.score) <= 0.1 * hard.mean()).all()
    separating = explanation.relevance[:, :2].sum(1) / explanation.relevance.sum(1)
    assert separating.mean() > 0.95
    assert (explanation.relevance[:, 2:].abs().amax(1) < 0.1 * explanation.relevance[:, :2].abs().amax(1)).all()
    # competitor relevance: per sample it sums to the evidence and skips the own cluster
    assert torch.allclose(explanation.intermediate.sum(1), explanation.score)
    assert (explanation.intermediate.gather(1, truth[:, None]) == 0).all()


def test_kmeans_explains_a_chosen_cluster_batched(blobs):
    points, truth, centroids = blobs
    model = NeuralizedKMeans(centroids, beta=5.0)
    against = model.explain(points[:40], cluster=1)  # points of cluster 0 asked about cluster 1
    assert (against.score < 0).all() and against.conservation_error().max() < 1e-10
    # a batch gives what one-by-one gives
    single = torch.cat([model.explain(points[i:i + 1], cluster=1).relevance for i in range(5)])
    assert torch.allclose(single, against.relevance[:5])
    # the hard min is the limit of a stiff soft-min
    stiff = NeuralizedKMeans(centroids, beta=1e4).evidence(points, truth)
    assert torch.allclose(stiff, model.logits(points, truth).min(1).values, atol=1e-3)


def test_kmeans_errors_name_the_argument(blobs):
    points, _, centroids = blobs
    with pytest.raises(ValueError, match="centroids"):
        NeuralizedKMeans(centroids[:1])
    with pytest.raises(ValueError, match="beta"):
        NeuralizedKMeans(centroids, beta=-1.0)
    model = NeuralizedKMeans(centroids)
    with pytest.raises(ValueError, match="cluster"):
        model.explain(points, cluster=3)
    with pytest.raises(TypeError, match="cluster"):
        model.explain(points, cluster=0.5)
    with pytest.raises(ValueError, match="x"):
        model.explain(points[:, :4])


@pytest.fixture
def normal_data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(200, FEATURES, generator=generator, dtype=torch.float64)


def test_one_class_svm_points_at_the_anomalous_feature(normal_data):
    # a Parzen-window OC-SVM: every training point a support vector with equal weight
    model = NeuralizedOneClassSVM(normal_data, torch.ones(len(normal_data)), gamma=0.1)
    outlier = torch.zeros(1, FEATURES, dtype=torch.float64)
    outlier[0, 3] = 6.0
    batch = torch.cat([outlier, normal_data[:20]])
    explanation = model.explain(batch)
    assert explanation.conservation_error().max() < 1e-10
    assert (explanation.relevance >= 0).all()
    assert explanation.score[0] > explanation.score[1:].max()
    assert explanation.relevance[0].argmax() == 3
    assert explanation.relevance[0, 3] > 0.6 * explanation.score[0]


def test_one_class_svm_from_sklearn(normal_data):
    svm = pytest.importorskip("sklearn.svm")
    fitted = svm.OneClassSVM(kernel="rbf", gamma=0.1, nu=0.1).fit(normal_data.numpy())
    model = NeuralizedOneClassSVM.from_sklearn(fitted)
    assert torch.equal(model.is_outlier(normal_data), torch.from_numpy(fitted.predict(normal_data.numpy()) == -1))
    # the outlier score ranks samples as scikit-learn's decision function does (reversed)
    probe = torch.cat([normal_data[:30], 3 * normal_data[30:60]])
    ours = model.outlier_score(probe).argsort()
    theirs = torch.from_numpy(-fitted.decision_function(probe.numpy())).argsort()
    assert torch.equal(ours, theirs)
    outlier = torch.zeros(1, FEATURES, dtype=torch.float64)
    outlier[0, 1] = -5.0
    explanation = model.explain(outlier)
    assert explanation.relevance[0].argmax() == 1 and explanation.conservation_error().max() < 1e-10
    with pytest.raises(ValueError, match="kernel"):
        NeuralizedOneClassSVM.from_sklearn(svm.OneClassSVM(kernel="linear").fit(normal_data.numpy()))


def test_one_class_svm_errors_name_the_argument(normal_data):
    with pytest.raises(ValueError, match="alphas"):
        NeuralizedOneClassSVM(normal_data, torch.ones(3), gamma=0.1)
    with pytest.raises(ValueError, match="alphas"):
        NeuralizedOneClassSVM(normal_data, torch.zeros(len(normal_data)), gamma=0.1)
    with pytest.raises(ValueError, match="gamma"):
        NeuralizedOneClassSVM(normal_data, torch.ones(len(normal_data)), gamma=0.0)
    with pytest.raises(ValueError, match="support_vectors"):
        NeuralizedOneClassSVM(normal_data[0], torch.ones(1), gamma=0.1)
    with pytest.raises(ValueError, match="threshold"):
        NeuralizedOneClassSVM(normal_data, torch.ones(len(normal_data)), gamma=0.1).is_outlier(normal_data)


def test_feature_relevance_continues_through_a_network_with_lrp(blobs):
    import fastlrp
    points, truth, _ = blobs
    torch.manual_seed(0)
    feature_net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 4, bias=False)).double().eval()
    features = feature_net(points).detach()
    centroids = torch.stack([features[truth == k].mean(0) for k in range(3)])
    neon = NeuralizedKMeans(centroids).explain(features)
    # a tiny epsilon: some features lie near 0, where the default 1e-6 would absorb ~1e-3 of R
    relevance = fastlrp.LRP(feature_net, start="one", epsilon=1e-12)(points, target=neon.relevance)
    assert relevance.shape == points.shape
    assert torch.allclose(relevance.sum(1), neon.score, rtol=1e-6)
