"""The native top-N kernel against the torch implementation it replaces, and its fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_publish import N_TOPICS, _expected_propensity, _policy_world

from rec import native, publish, topn

CAP = 25.0


@pytest.fixture(scope="module")
def kernel():
    lib = native.library()
    assert lib is not None, "the native kernel did not build (see the warning logged)"
    return lib


def _factors(users: int, services: int, dim: int, scale: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    user_vectors = scale * torch.randn(users, dim, generator=generator) / dim ** 0.5
    item_vectors = torch.randn(services, dim, generator=generator)
    return user_vectors, item_vectors


def _torch_candidates(users: torch.Tensor, items_t: torch.Tensor, n: int,
                      n_items: int) -> topn.Candidates:
    """What `rec.policy.top_n_for_policy` computes for a factor policy, in one block."""
    return topn.summarise(users @ items_t, n, n_items,
                          lambda k: k.mul_(1.0 / CAP).tanh_().mul_(CAP).exp_(),
                          lambda k: CAP * torch.tanh(k / CAP))


def _block_weights(users: torch.Tensor, items_t: torch.Tensor, n_items: int):
    width = items_t.shape[1]

    def block_weights(rows: torch.Tensor, blocks: torch.Tensor):
        columns = topn.block_columns(blocks, width // topn.BLOCK)
        raw = torch.bmm(items_t.T[columns], users[rows].unsqueeze(2)).squeeze(2)
        scored = CAP * torch.tanh(raw / CAP)
        return torch.where(columns < n_items, scored.exp(), 0.0), scored

    return block_weights


def _assert_same_candidates(ours: topn.Candidates, theirs: topn.Candidates) -> None:
    assert torch.equal(ours.index, theirs.index)
    torch.testing.assert_close(ours.score, theirs.score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=2e-5, atol=0.0)
    torch.testing.assert_close(ours.tail, theirs.tail, rtol=2e-5, atol=1e-30)


@pytest.mark.parametrize(("services", "dim", "n", "scale"), [
    (23, 5, 6, 1.0),      # one 128-wide vector of blocks, mostly padding
    (700, 17, 20, 1.0),   # 700 of 768 columns: padding inside the last blocks
    (500, 9, 20, 40.0),   # logits beyond the cap's polynomial range (the exp form)
])
def test_candidates_equal_the_torch_path(kernel, services, dim, n, scale):
    users, items = _factors(400, services, dim, scale, seed=services)
    items_t = native.transposed_items(items)
    ours = native.candidates(kernel, users, items_t, CAP, n, services)
    _assert_same_candidates(ours, _torch_candidates(users, items_t, n, services))
    assert ours.tail.shape == (400, topn.padded_width(services) // topn.BLOCK)
    assert (ours.tail >= 0).all()


def test_ties_go_to_the_lower_column(kernel):
    users, items = _factors(50, 300, 7, 1.0, seed=2)
    items[150:] = items[:150]  # every service has a twin 150 columns on
    items_t = native.transposed_items(items)
    ours = native.candidates(kernel, users, items_t, CAP, 10, 300)
    theirs = _torch_candidates(users, items_t, 10, 300)

    # Twins tie exactly; both twins are candidates, the lower column first.
    assert torch.equal(ours.index.remainder(150).view(50, 5, 2)[:, :, 0],
                       ours.index.remainder(150).view(50, 5, 2)[:, :, 1])
    assert (ours.index.view(50, 5, 2)[:, :, 0] < ours.index.view(50, 5, 2)[:, :, 1]).all()
    assert torch.equal(ours.index.sort(1).values, theirs.index.sort(1).values)
    torch.testing.assert_close(ours.score, theirs.score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.tail, theirs.tail, rtol=2e-5, atol=1e-30)


@pytest.mark.parametrize(("services", "n", "exploration"), [
    (700, 20, 0.0), (700, 20, 0.3), (40, 6, 0.5), (20, 20, 0.5)])
def test_slates_equal_the_torch_select(kernel, services, n, exploration):
    users, items = _factors(3000, services, 17, 2.0, seed=7)
    users[::5, :-1] = 0.0  # cold-start users: only the services' bias (last factor) counts
    users[::5, -1] = 1.0
    items_t = native.transposed_items(items)
    theirs = topn.select(_torch_candidates(users, items_t, n, services), exploration,
                         torch.Generator().manual_seed(11),
                         _block_weights(users, items_t, services))

    uniform = topn.slot_uniforms(len(users), n, exploration, torch.Generator().manual_seed(11))
    index = np.empty((len(users), n), np.int32)
    score = np.empty((len(users), n), np.float32)
    propensity = np.empty((len(users), n), np.float32)
    native.rank(kernel, users, items_t, CAP, n, services, exploration, uniform, index,
                score, propensity)

    # Float rounding can move a draw that lands within ~1e-6 of a boundary: a rare row.
    same = (torch.from_numpy(index).long() == theirs[0]).all(1)
    assert same.float().mean() > 0.998
    torch.testing.assert_close(torch.from_numpy(score)[same], theirs[1][same],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(propensity)[same], theirs[2][same],
                               rtol=1e-4, atol=1e-9)
    assert all(len(set(row)) == n for row in index.tolist())
    assert ((propensity > 0) & (propensity <= 1)).all()
    if exploration == 0.0:
        assert (propensity == 1).all()
        assert torch.equal(torch.from_numpy(index).long(),
                           torch.topk(users @ items_t[:, :services], n).indices)


def test_counter_uniforms_are_the_kernels_and_do_not_depend_on_blocks(kernel):
    """The kernel's own counter-based numbers equal `CounterUniforms.block` passed as a
    tensor, and a slice of rows gets the same numbers as the whole."""
    draws = topn.CounterUniforms(2024)
    whole = draws.block(1000, 8)
    assert torch.equal(draws.at(300).block(200, 8), whole[300:500])
    assert 0.0 <= whole.min() and whole.max() < 1.0
    assert abs(whole.mean().item() - 0.5) < 0.01 and abs((whole < 0.1).double().mean() - 0.1) < 0.01
    assert not torch.equal(topn.CounterUniforms(2025).block(10, 8), whole[:10])

    users, items = _factors(1000, 300, 17, 2.0, seed=3)
    items_t = native.transposed_items(items)
    outputs = []
    for uniform in (draws.at(500), draws.at(500).block(1000, 8)):
        out = (np.empty((1000, 8), np.int32), np.empty((1000, 8), np.float32),
               np.empty((1000, 8), np.float32))
        native.rank(kernel, users, items_t, CAP, 8, 300, 0.4, uniform, *out)
        outputs.append(out)
    for computed, passed in zip(*outputs, strict=True):
        np.testing.assert_array_equal(computed, passed)


def test_rank_users_lists_do_not_depend_on_the_block_size(monkeypatch):
    policy, users, items = _policy_world(3000, 300)
    first = publish.rank_users(policy, users, items, 10, 0.3, seed=5)
    monkeypatch.setattr(publish, "SELECT_ROWS", 700)
    monkeypatch.setattr(publish, "FACTOR_ROWS", 300)
    second = publish.rank_users(policy, users, items, 10, 0.3, seed=5, threads=1)
    np.testing.assert_array_equal(first.service_rows, second.service_rows)
    np.testing.assert_array_equal(first.propensities, second.propensities)
    other = publish.rank_users(policy, users, items, 10, 0.3, seed=6)
    assert (other.service_rows != first.service_rows).any()


def test_rank_users_fills_given_lists_and_refuses_a_wrong_shape():
    policy, users, items = _policy_world(2000, 300)
    fresh = publish.rank_users(policy, users, items, 10, 0.3, seed=5)
    reused = publish.empty_ranked(users.user_ids, 10)
    reused.service_rows.fill(-1)
    returned = publish.rank_users(policy, users, items, 10, 0.3, seed=5, out=reused)
    assert returned is reused
    np.testing.assert_array_equal(reused.service_rows, fresh.service_rows)
    np.testing.assert_array_equal(reused.propensities, fresh.propensities)
    with pytest.raises(ValueError, match="slots"):
        publish.rank_users(policy, users, items, 20, 0.3, seed=5, out=reused)


def _reset_native(monkeypatch) -> None:
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)


def test_rank_users_native_equals_torch_path_and_propensities_are_exact(monkeypatch):
    policy, users, items = _policy_world(2500, 400)
    exploration = 0.25
    assert native.library() is not None
    ours = publish.rank_users(policy, users, items, 20, exploration, seed=4)

    monkeypatch.setenv("REC_NATIVE", "0")
    assert native.library() is None
    theirs = publish.rank_users(policy, users, items, 20, exploration, seed=4)

    same = (ours.service_rows == theirs.service_rows).all(1)
    assert same.mean() > 0.998
    np.testing.assert_allclose(ours.propensities[same], theirs.propensities[same], rtol=1e-4)
    np.testing.assert_allclose(ours.scores, np.take_along_axis(
        _scores(policy, users, items), ours.service_rows.astype(np.int64), 1), atol=1e-4)
    expected = _expected_propensity(torch.from_numpy(_scores(policy, users, items)),
                                    torch.from_numpy(ours.service_rows).long(), exploration)
    torch.testing.assert_close(torch.from_numpy(ours.propensities).double(), expected,
                               rtol=1e-3, atol=1e-7)
    assert users.cold.any()  # cold-start users are ranked like the others
    assert all(len(set(row)) == 20 for row in ours.service_rows.tolist())


@pytest.mark.parametrize(("embed_dim", "hidden_dim", "weight_scale"), [
    (16, 64, 1.0),   # the default tower
    (10, 40, 3.0),   # widths off the 16-unit grid; saturated and near-zero tanh units
])
def test_native_user_tower_equals_the_policy_factors(kernel, embed_dim, hidden_dim,
                                                     weight_scale):
    from rec.policy import TwoTowerPolicy, item_feature_matrix, user_feature_matrix

    torch.manual_seed(5)
    policy = TwoTowerPolicy(N_TOPICS, 4, embed_dim=embed_dim, hidden_dim=hidden_dim).eval()
    with torch.no_grad():
        for layer in policy.user_tower_layers():
            layer.weight.mul_(weight_scale)
    _, users, items = _policy_world(1000, 30)
    features = user_feature_matrix(users.interest, users.strength, users.signup)
    features[::7] *= -4.0  # inputs beyond the training range reach every branch of tanh

    ours = native.UserTower(kernel, policy.user_tower_layers()).factors(features)
    with torch.no_grad():
        theirs, _, _ = policy.factors(features, item_feature_matrix(items.topic, items.numeric,
                                                                    N_TOPICS))
    assert ours.shape == theirs.shape == (1000, embed_dim + 1)
    assert (ours[:, -1] == 1.0).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6)


def _scores(policy, users, items) -> np.ndarray:
    from rec.policy import item_feature_matrix, user_feature_matrix

    features = user_feature_matrix(users.interest, users.strength, users.signup)
    with torch.no_grad():
        return policy.score(features, item_feature_matrix(items.topic, items.numeric,
                                                          users.interest.shape[1])).numpy()


def test_without_a_compiler_ranking_falls_back_to_torch_with_one_warning(
        monkeypatch, tmp_path, caplog):
    policy, users, items = _policy_world(300, 50)
    _reset_native(monkeypatch)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("REC_NATIVE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="rec.native"):
        first = publish.rank_users(policy, users, items, 5, 0.2, seed=1)
        second = publish.rank_users(policy, users, items, 5, 0.2, seed=1)
    warnings = [r for r in caplog.records if r.name == "rec.native"]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0].getMessage()
    np.testing.assert_array_equal(first.service_rows, second.service_rows)
    assert ((first.propensities > 0) & (first.propensities <= 1)).all()


def test_a_fresh_cache_builds_the_kernel(monkeypatch, tmp_path):
    _reset_native(monkeypatch)
    monkeypatch.setenv("REC_NATIVE_CACHE", str(tmp_path))
    lib = native.library()
    assert lib is not None
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


def test_rows_of_equal_logits_take_the_first_columns(kernel):
    # All 700 services tie: more than the kernel ranks by counting, so its fallback runs.
    users, items = _factors(3, 700, 5, 1.0, seed=3)
    users[:] = 0.0
    items_t = native.transposed_items(items)
    ours = native.candidates(kernel, users, items_t, CAP, 20, 700)

    assert torch.equal(ours.index, torch.arange(20).expand(3, 20))
    torch.testing.assert_close(ours.weight, torch.ones(3, 20, dtype=torch.float64),
                               rtol=1e-6, atol=0.0)
    blocks = topn.padded_width(700) // topn.BLOCK
    others = torch.zeros(topn.padded_width(700))
    others[20:700] = 1.0
    expected_tail = others.view(topn.BLOCK, blocks).sum(0).double()
    torch.testing.assert_close(ours.tail, expected_tail.expand(3, blocks), rtol=1e-6,
                               atol=0.0)
