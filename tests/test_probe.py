"""The linear probe: separable features, agreement with an exact solver, batched == separate, selection on val."""
import torch
import torch.nn.functional as F

from evaluation.accuracy import classification_report, confusion_matrix, topk_accuracy
from evaluation.probe import feature_stats, select_on_val, train_probes


def clusters(n_per_class, dim=32, classes=10, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def fit(features, labels, weight_decays, epochs=30, seed=0):
    mean, std = feature_stats(features)
    standardized = (features - mean) / std
    return train_probes(lambda idx, step: standardized[idx], labels, num_classes=10, mean=mean, std=std,
                        weight_decays=weight_decays, epochs=epochs, batch_size=256, lr=0.1, seed=seed)


def test_probe_is_perfect_on_linearly_separable_features():
    train_x, train_y = clusters(200)
    test_x, test_y = clusters(100, seed=1)
    probes = fit(train_x, train_y, [0.0, 1e-3])
    for logits in probes.logits(test_x):
        assert topk_accuracy(logits, test_y) == 100.0


def test_probe_reaches_the_exact_regularized_optimum():
    """Mini-batch SGD ends at the same training loss as full-batch L-BFGS on the same convex objective."""
    x, y = clusters(100, spread=3.0)  # overlapping classes: a non-trivial optimum
    wd = 1e-2
    probes = fit(x, y, [wd], epochs=100)
    z = (x - probes.mean) / probes.std

    def objective(w, b):
        return F.cross_entropy(z @ w.T + b, y) + 0.5 * wd * w.pow(2).sum()

    w, b = torch.zeros(10, 32, requires_grad=True), torch.zeros(10, requires_grad=True)
    lbfgs = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = objective(w, b)
        loss.backward()
        return loss

    lbfgs.step(closure)
    ours = objective(probes.weight[0], probes.bias[0]).item()
    exact = objective(w, b).item()
    assert exact <= ours < exact + 1e-3, (ours, exact)


def test_batched_classifiers_train_independently():
    """Classifier g's updates depend only on W_g: changing one classifier's decay leaves the others bit-identical,
    so training the grid together equals training each alone."""
    x, y = clusters(50, spread=2.0)
    together = fit(x, y, [0.0, 1e-3, 1e-1], epochs=5)
    changed = fit(x, y, [0.0, 5e-2, 1e-1], epochs=5)
    assert torch.equal(changed.weight[0], together.weight[0]) and torch.equal(changed.weight[2], together.weight[2])
    assert not torch.equal(changed.weight[1], together.weight[1])


def test_selection_uses_validation_and_prefers_stronger_decay_on_ties():
    x, y = clusters(100)
    probes = fit(x, y, [0.0, 1e-4], epochs=5)
    chosen = select_on_val(probes, *clusters(20, seed=2))
    assert chosen.val_top1_by_wd == {"0": 100.0, "0.0001": 100.0}
    assert chosen.weight_decay == 1e-4 and chosen.probe.weight.shape[0] == 1


def test_classification_report_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6]])
    labels = torch.tensor([0, 1, 2, 2])
    report = classification_report(scores, labels, ["a", "b", "c"])
    assert report["test/top1"] == 75.0 and report["test/top5"] == 100.0
    assert report["test/per_class"] == {"a": 100.0, "b": 100.0, "c": 50.0}
    assert report["test/confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert topk_accuracy(scores, labels, 2) == 100.0
    assert confusion_matrix(torch.tensor([1]), torch.tensor([0]), 2).tolist() == [[0, 1], [0, 0]]
