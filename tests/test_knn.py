import torch

from evaluation.knn import extract_features, knn_predict, knn_top1
from models import create_encoder


def test_knn_on_separable_clusters_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(4).repeat(50)
    bank = centres[labels] + torch.randn(200, 16, generator=g) * 0.1
    q_labels = torch.arange(4).repeat(10)
    queries = centres[q_labels] + torch.randn(40, 16, generator=g) * 0.1
    assert knn_top1(bank, labels, queries, q_labels, num_classes=4, k=20) == 100.0


def test_weighted_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), num_classes=2, k=2, temperature=0.5)
    cos = torch.nn.functional.normalize(bank, dim=1)[:, 0]
    torch.testing.assert_close(scores[0], torch.stack([(cos[0] / 0.5).exp(), (cos[1] / 0.5).exp()]))


def test_extract_features_keeps_training_mode_and_shape():
    enc = create_encoder("resnet18", width=4)
    enc.train()
    feats = extract_features(enc, torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), mean=(0.5,) * 3,
                             std=(0.25,) * 3, batch_size=4)
    assert feats.shape == (10, enc.feature_dim) and enc.training


def _clustered_features(n: int, seed: int):
    """Noisy features around 10 class centres, hard enough that some queries are misclassified."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, 10, (n,), generator=g)
    return centres[labels] + 1.2 * torch.randn(n, 32, generator=g), labels


def test_majority_vote_equals_scikit_learn_cosine_knn():
    """dkobak's protocol, KNeighborsClassifier(n_neighbors=10, metric="cosine"), computed independently."""
    from sklearn.neighbors import KNeighborsClassifier

    bank, bank_labels = _clustered_features(3000, 0)
    queries, query_labels = _clustered_features(1000, 1)
    ours = knn_predict(bank, bank_labels, queries, num_classes=10, k=10, vote="majority").argmax(dim=1)
    oracle = KNeighborsClassifier(n_neighbors=10, metric="cosine").fit(bank.double().numpy(), bank_labels.numpy())
    theirs = torch.from_numpy(oracle.predict(queries.double().numpy()))
    assert 40 < (ours == query_labels).double().mean() * 100 < 99  # a non-trivial task: errors exist to disagree on
    assert torch.equal(ours, theirs)
    expected = 100.0 * oracle.score(queries.double().numpy(), query_labels.numpy())
    assert knn_top1(bank, bank_labels, queries, query_labels, num_classes=10, k=10, vote="majority") == \
        round(expected, 4)


def test_weighted_vote_equals_a_direct_computation():
    """The InstDisc vote (lightly's monitor, k=200, T=0.1), written out with numpy and scikit-learn's neighbours."""
    import numpy as np
    from sklearn.neighbors import NearestNeighbors

    bank, bank_labels = _clustered_features(2000, 2)
    queries, _ = _clustered_features(300, 3)
    ours = knn_predict(bank, bank_labels, queries, num_classes=10, k=200, temperature=0.1)
    dist, idx = NearestNeighbors(n_neighbors=200, metric="cosine").fit(bank.double().numpy()).kneighbors(
        queries.double().numpy())
    expected = np.zeros((300, 10))
    np.add.at(expected, (np.arange(300)[:, None], bank_labels.numpy()[idx]), np.exp((1 - dist) / 0.1))
    torch.testing.assert_close(ours.double(), torch.from_numpy(expected), rtol=1e-4, atol=0)


def test_unknown_vote_is_refused():
    import pytest

    with pytest.raises(ValueError, match="vote"):
        knn_predict(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), torch.ones(1, 2), num_classes=1, vote="soft")
