import torch

from engine.knn import extract_features, knn_predict, knn_top1
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
