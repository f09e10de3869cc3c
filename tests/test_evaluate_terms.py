"""The gate's off-policy terms, computed per user state in chunks, equal the per-row formula."""

import numpy as np
import pytest
import torch

from rec.choice import ChoiceModel
from rec.evaluate import _evaluation_terms
from rec.features import Items, Users
from rec.policy import TwoTowerPolicy, item_feature_matrix, user_feature_matrix

N_TOPICS = 6


def _world(n_states: int, n_services: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    interest = torch.softmax(2 * torch.randn(n_states, N_TOPICS, generator=generator), 1)
    interest[: n_states // 5] = 0.0  # cold-start states
    states = Users(np.arange(n_states), interest, torch.rand(n_states, generator=generator),
                   (torch.rand(n_states, N_TOPICS, generator=generator) < 0.3).float(),
                   interest.sum(1) == 0)
    items = Items(np.arange(n_services), np.arange(n_services) // 2,
                  torch.randint(0, N_TOPICS, (n_services,), generator=generator),
                  torch.randn(n_services, 3, generator=generator),
                  torch.zeros(n_services), torch.zeros(n_services))
    model = ChoiceModel(N_TOPICS, 3, n_positions=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return states, items, model, TwoTowerPolicy(N_TOPICS, 3).eval()


def _per_row(policy, states, items, model, item, position, state, exploration):
    """The formula row by row, with the (rows, services) tables the chunked code avoids."""
    item_features = item_feature_matrix(items.topic, items.numeric, N_TOPICS)
    features = user_feature_matrix(states.interest, states.strength, states.signup)
    scores = policy.score(features, item_features)[state]
    ranks = scores.argsort(dim=1, descending=True).argsort(dim=1)
    dist = ((1 - exploration) * (ranks == position.unsqueeze(1)).float()
            + exploration * torch.softmax(scores, dim=1))
    utility = model.all_item_utilities(states.interest, states.strength, states.signup,
                                       items.topic, items.numeric)[state]
    last = model.config["n_positions"] - 1
    click = torch.sigmoid(utility + model.position_bias[position.clamp(max=last)].unsqueeze(1))
    rows = torch.arange(len(item))
    return (dist[rows, item].clamp(1e-12, 1.0), click[rows, item], (dist * click).sum(1))


@pytest.mark.parametrize("n_services,max_position", [(150, 12), (8, 11)])
@torch.no_grad()
def test_chunked_terms_equal_the_per_row_formula(n_services, max_position):
    states, items, model, policy = _world(300, n_services, seed=n_services)
    generator = torch.Generator().manual_seed(1)
    n_rows = 4000
    state = torch.randint(0, 300, (n_rows,), generator=generator)
    state[:50] = 299  # the last chunk is a partial one
    item = torch.randint(0, n_services, (n_rows,), generator=generator)
    position = torch.randint(0, max_position + 1, (n_rows,), generator=generator)
    torch.manual_seed(99)
    other = TwoTowerPolicy(N_TOPICS, 3).eval()
    q_logged, terms = _evaluation_terms([policy, other], states, items, model, item, position,
                                        state, 0.2, chunk=64)
    for one, (p_logged, direct) in zip((policy, other), terms, strict=True):
        expected = _per_row(one, states, items, model, item, position, state, 0.2)
        got = (p_logged, q_logged, direct)
        for name, a, b in zip(("p_logged", "q_logged", "direct"), got, expected, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        # The greedy part is exercised: some logged services are the policy's pick there.
        assert (p_logged > 0.5).sum() > 0
    assert not torch.allclose(terms[0][0], terms[1][0])


def test_cluster_bootstrap_matches_the_row_bootstrap_for_singleton_clusters_and_widens():
    """One row per cluster is the row bootstrap; correlated rows get a wider interval."""
    from rec import ope

    rng = np.random.default_rng(0)
    n = 3000
    # Ten impressions per user state; a state's rows share most of their clicks.
    state = np.repeat(np.arange(n // 10), 10)
    shared = rng.random(n // 10) < 0.3
    reward = np.where(rng.random(n) < 0.8, shared[state], rng.random(n) < 0.3).astype(float)
    feedback = ope.LoggedFeedback(action=np.zeros(n, dtype=int),
                                  position=np.zeros(n, dtype=int), reward=reward,
                                  pscore=np.full(n, 0.5))
    action_dist = np.stack([np.full(n, 0.5), np.full(n, 0.5)], axis=1)[:, :, None]
    reward_hat = np.full((n, 2, 1), 0.3)
    rows = ope.evaluate_policy(feedback, action_dist, reward_hat, n_boot=400, seed=1)
    singletons = ope.evaluate_policy(feedback, action_dist, reward_hat, n_boot=400, seed=1,
                                     clusters=np.arange(n))
    clustered = ope.evaluate_policy(feedback, action_dist, reward_hat, n_boot=400, seed=1,
                                    clusters=state)
    for name in ("ips", "snips", "dr"):
        assert clustered[name].estimate == pytest.approx(rows[name].estimate)
        assert singletons[name].ci_low == pytest.approx(rows[name].ci_low, abs=1e-9)
        assert singletons[name].ci_high == pytest.approx(rows[name].ci_high, abs=1e-9)
        width = rows[name].ci_high - rows[name].ci_low
        assert clustered[name].ci_high - clustered[name].ci_low > 1.5 * width
