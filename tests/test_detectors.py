import torch

from pst_dist.pst.detectors import scatter_ratio


def test_scatter_ratio_matches_definition_and_ignores_absent_classes():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(60, 4, generator=g, dtype=torch.double), torch.arange(60) % 5
    mu = feats.mean(0)
    between = sum(float((labels == c).sum()) * ((feats[labels == c].mean(0) - mu) ** 2).sum() for c in range(5))
    within = sum(((feats[labels == c] - feats[labels == c].mean(0)) ** 2).sum() for c in range(5))
    assert torch.isclose(scatter_ratio(feats, labels), between / within)
    assert torch.isclose(scatter_ratio(feats, labels, num_classes=100), between / within)
    clustered = feats + 5 * torch.nn.functional.one_hot(labels % 4, 4).double()
    assert scatter_ratio(clustered, labels) > scatter_ratio(feats, labels)
