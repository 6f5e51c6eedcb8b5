"""gd_cli.landscape: groups, direction normalisation, restoration, summary."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gd_cli import landscape as ls  # noqa: E402
from gd_core import ArgumentError, SensitivityProfile, Site  # noqa: E402


class Net(torch.nn.Module):
    """Four blocks, each a Linear followed by a dropout site."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1)) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def _profile(net: Net, scores: list[float]) -> SensitivityProfile:
    sites = [
        Site(f"blocks.{i}.1", (f"blocks.{i}.0.weight", f"blocks.{i}.0.bias")) for i in range(4)
    ]
    fisher = {
        n: np.full(tuple(p.shape), scores[int(n.split(".")[1])]) for n, p in net.named_parameters()
    }
    return SensitivityProfile.from_fisher(fisher, sites)


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).sum(-1)


def test_groups_follow_the_site_scores() -> None:
    net = Net()
    prof = _profile(net, [1.0, 9.0, 3.0, 0.5])
    groups = ls.split_sites(prof)
    assert groups["top"] == ["blocks.1.1", "blocks.2.1"]
    assert groups["bottom"] == ["blocks.0.1", "blocks.3.1"]
    assert len(groups["all"]) == 4


def test_parameters_are_restored_and_shapes_are_right() -> None:
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    res = ls.loss_landscape(
        net, _loss, [torch.randn(6, 4)], _profile(net, [1, 9, 3, 0.5]), directions=2, points=5,
        progress=False,
    )  # fmt: skip
    assert net.training  # mode restored too
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert set(res.losses) == {"top", "bottom", "all"}
    for arr in res.losses.values():
        assert arr.shape == (2, 5) and np.all(arr[:, 2] == res.base_loss)
    assert res.group_sizes == {"top": 40, "bottom": 40, "all": 80}
    np.testing.assert_allclose(res.steps, np.linspace(-0.5, 0.5, 5))


def test_only_the_group_moves() -> None:
    """Perturbing a group whose parameters the loss ignores leaves the loss flat."""
    net = Net()
    x = torch.randn(6, 4)

    def loss_of_first_block(model: Net, batch: torch.Tensor) -> torch.Tensor:
        return model.blocks[0](batch).pow(2).sum(-1)  # depends on block 0 only

    prof = _profile(net, [0.1, 5, 5, 0.2])  # block 0 is in the bottom group
    res = ls.loss_landscape(net, loss_of_first_block, [x], prof, points=3, progress=False)
    assert np.allclose(res.losses["top"], res.base_loss)
    assert not np.allclose(res.losses["bottom"], res.base_loss)
    assert not np.allclose(res.losses["all"], res.base_loss)


def test_filter_and_plain_normalisation() -> None:
    params = {"w": torch.randn(3, 5), "b": torch.randn(3)}
    gen = torch.Generator().manual_seed(1)
    d = ls.random_direction(params, ["w", "b"], gen, "filter")
    torch.testing.assert_close(d["w"].norm(dim=1), params["w"].norm(dim=1))
    torch.testing.assert_close(d["b"].norm(), params["b"].norm())
    d = ls.random_direction(params, ["w", "b"], gen, "plain")
    total = torch.sqrt(sum(v.pow(2).sum() for v in d.values()))
    torch.testing.assert_close(total, torch.sqrt(sum(v.pow(2).sum() for v in params.values())))
    with pytest.raises(ArgumentError, match="normalization"):
        ls.random_direction(params, ["w"], gen, "nope")


def test_summary_of_a_parabola() -> None:
    steps = np.linspace(-1, 1, 5)
    res = ls.LandscapeResult(
        steps, {"top": np.array([3 * steps**2 + 1])}, 1.0, {}, {}, {}, "plain", 1.0, 0
    )
    s = res.summary()["top"]
    assert s["curvature"] == pytest.approx(6.0)
    assert s["increase_at_radius"] == pytest.approx(3.0)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"points": 4}, "odd"), ({"radius": 0.0}, "radius"), ({"directions": 0}, "directions")],
)
def test_bad_arguments(kwargs: dict, word: str) -> None:
    net = Net()
    with pytest.raises(ArgumentError, match=word):
        ls.loss_landscape(net, _loss, [torch.randn(2, 4)], _profile(net, [1, 2, 3, 4]),
                          progress=False, **kwargs)  # fmt: skip


def test_frozen_targets_keeps_contrastive_positives() -> None:
    transformers = pytest.importorskip("transformers")
    from adapters.torch import ContrastiveLoss

    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    batch = {"input_ids": torch.randint(5, 30, (3, 6))}
    plain, frozen = ContrastiveLoss(seed=0), ls.FrozenTargets(ContrastiveLoss(seed=0))
    with torch.no_grad():
        pos0 = plain.embed(model, batch)
        torch.testing.assert_close(frozen(model, batch), plain(model, batch))  # same at theta_0
        model.encoder.layer[0].output.dense.weight.mul_(3.0)
        moved_frozen, moved_plain = frozen(model, batch), plain(model, batch)
        assert not torch.allclose(plain.embed(model, batch), pos0)
    # the frozen loss kept the positives of theta_0; the plain one recomputed them
    torch.testing.assert_close(frozen._cache[id(batch)][1], pos0)
    assert not torch.allclose(moved_frozen, moved_plain)
    assert "embed" not in vars(frozen._contrastive)  # the method is restored after each call
