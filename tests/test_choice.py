"""The choice model recovers known parameters from simulated slates and beats position-only."""

from __future__ import annotations

import torch

from rec.choice import (
    ChoiceData,
    ChoiceModel,
    fit_choice_model,
    slate_negative_log_likelihood,
    slate_weights,
)
from rec.sim.engine import Catalogue, UserState, sample_slate_choice

torch.set_num_threads(1)

N_TOPICS = 6
N_NUMERIC = 2
N_ITEMS = 60
N_USERS = 3000
N_SLATES = 30000
SLATE_SIZE = 5
TRUE_POSITION_BIAS = torch.tensor([0.0, -0.3, -0.6, -0.8, -1.0])
TRUE_AFFINITY_DIAGONAL = torch.linspace(1.0, 2.5, N_TOPICS)


def _truth() -> ChoiceModel:
    model = ChoiceModel(N_TOPICS, N_NUMERIC, SLATE_SIZE)
    with torch.no_grad():
        model.affinity.copy_(torch.diag(TRUE_AFFINITY_DIAGONAL))
        model.signup_coef.fill_(0.8)
        model.strength_coef.fill_(0.3)
        model.numeric_coef.copy_(torch.tensor([0.5, -0.4]))
        model.topic_bias.copy_(torch.linspace(-0.3, 0.3, N_TOPICS))
        model.later_position_bias.copy_(TRUE_POSITION_BIAS[1:])
        model.intercept.fill_(-2.0)
    return model


def _simulated_logs(seed: int = 0) -> ChoiceData:
    generator = torch.Generator().manual_seed(seed)
    interest = torch.softmax(2.0 * torch.randn(N_USERS, N_TOPICS, generator=generator), dim=1)
    no_history = torch.rand(N_USERS, generator=generator) < 0.25
    interest[no_history] = 0.0
    strength = torch.where(no_history, 0.0, 3.0 * torch.rand(N_USERS, generator=generator))
    signup = (torch.rand(N_USERS, N_TOPICS, generator=generator) < 0.25).float()
    topic = torch.arange(N_ITEMS) % N_TOPICS
    numeric = torch.randn(N_ITEMS, N_NUMERIC, generator=generator)

    user = torch.randint(N_USERS, (N_SLATES,), generator=generator)
    slates = torch.rand(N_SLATES, N_ITEMS, generator=generator).argsort(dim=1)[:, :SLATE_SIZE]
    state = UserState.from_features(interest, strength, signup).index(user)
    with torch.no_grad():
        utilities = _truth().utilities(state, Catalogue(topic, numeric), slates)
    choice = sample_slate_choice(utilities, 0.0, generator)
    clicked = torch.zeros(N_SLATES, SLATE_SIZE)
    has_click = choice >= 0
    clicked[has_click, choice[has_click]] = 1.0

    return ChoiceData(
        interest=interest,
        strength=strength,
        signup=signup,
        topic=topic,
        item_numeric=numeric,
        slate=torch.arange(N_SLATES).repeat_interleave(SLATE_SIZE),
        user=user.repeat_interleave(SLATE_SIZE),
        item=slates.reshape(-1),
        position=torch.arange(SLATE_SIZE).repeat(N_SLATES),
        clicked=clicked.reshape(-1),
    )


def test_fit_recovers_truth_and_beats_position_only(tmp_path):
    data = _simulated_logs()
    model, metrics = fit_choice_model(data, N_TOPICS, l2=1e-5, seed=0)

    torch.testing.assert_close(
        model.position_bias.detach(), TRUE_POSITION_BIAS, atol=0.08, rtol=0.0
    )
    torch.testing.assert_close(
        torch.diagonal(model.affinity.detach()), TRUE_AFFINITY_DIAGONAL, atol=0.35, rtol=0.0
    )
    assert abs(model.signup_coef.item() - 0.8) < 0.1
    torch.testing.assert_close(
        model.numeric_coef.detach(), torch.tensor([0.5, -0.4]), atol=0.08, rtol=0.0
    )

    assert metrics["heldout_logloss"] < metrics["baseline_heldout_logloss"] - 0.03
    assert metrics["train_logloss"] < metrics["baseline_train_logloss"]
    assert metrics["heldout_calibration_error"] < 0.01
    rate, predicted = metrics["heldout_click_rate"], metrics["heldout_predicted_click_rate"]
    assert abs(predicted - rate) < 0.1 * rate

    path = tmp_path / "choice.pt"
    model.save(path)
    restored = ChoiceModel.load(path)
    torch.testing.assert_close(
        restored.impression_utilities(data), model.impression_utilities(data)
    )


def test_multiple_clicks_count_as_separate_choices():
    data = _simulated_logs()
    small = data.select(torch.arange(2 * SLATE_SIZE))
    small.clicked = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0])
    model = _truth()
    utility = model.impression_utilities(small).detach()
    nll, _ = slate_negative_log_likelihood(utility, small.slate, small.clicked, 2)
    first_denominator = torch.logsumexp(torch.cat([torch.zeros(1), utility[:5]]), dim=0)
    expected_first = 2 * first_denominator - utility[0] - utility[1]
    expected_second = torch.logsumexp(torch.cat([torch.zeros(1), utility[5:]]), dim=0)
    torch.testing.assert_close(nll, torch.stack([expected_first, expected_second]))


N_EXPERTS = 20
TRUE_EXPERT_EFFECT = torch.linspace(-0.8, 0.8, N_EXPERTS)[torch.randperm(
    N_EXPERTS, generator=torch.Generator().manual_seed(5))]


def _expert_logs(seed: int = 1) -> ChoiceData:
    """Logs whose clicks also depend on the expert of each service (3 services per expert)."""
    data = _simulated_logs(seed)
    item_expert = 100 + torch.arange(N_ITEMS) // 3  # ids need not start at 0
    truth = ChoiceModel(N_TOPICS, N_NUMERIC, SLATE_SIZE, n_experts=N_EXPERTS)
    state = {k: v for k, v in _truth().state_dict().items() if not k.startswith("expert")}
    truth.load_state_dict(state, strict=False)
    with torch.no_grad():
        truth.expert_effect.copy_(TRUE_EXPERT_EFFECT)
    truth.set_expert_ids(torch.unique(item_expert))

    generator = torch.Generator().manual_seed(seed + 100)
    n_slates = data.n_impressions // SLATE_SIZE
    state = UserState.from_features(data.interest, data.strength, data.signup).index(
        data.user.view(n_slates, SLATE_SIZE)[:, 0]
    )
    slates = data.item.view(n_slates, SLATE_SIZE)
    with torch.no_grad():
        catalogue = Catalogue(data.topic, data.item_numeric, item_expert)
        choice = sample_slate_choice(truth.utilities(state, catalogue, slates), 0.0, generator)
    clicked = torch.zeros(n_slates, SLATE_SIZE)
    clicked[choice >= 0, choice[choice >= 0]] = 1.0
    data.clicked = clicked.reshape(-1)
    data.item_expert = item_expert
    return data


def test_fit_recovers_expert_effects_and_reports_deciles():
    data = _expert_logs()
    model, metrics = fit_choice_model(data, N_TOPICS, l2=1e-5, seed=0)

    assert metrics["n_experts"] == N_EXPERTS
    # topic biases and expert effects share one free constant: compare centred effects
    fitted = model.expert_effects(100 + torch.arange(N_EXPERTS)).detach()
    error = (fitted - fitted.mean()) - (TRUE_EXPERT_EFFECT - TRUE_EXPERT_EFFECT.mean())
    assert error.abs().max() < 0.3, error
    assert torch.corrcoef(torch.stack([fitted, TRUE_EXPERT_EFFECT]))[0, 1] > 0.9
    assert model.expert_effects(torch.tensor([7])).item() == 0.0  # unseen expert

    deciles = metrics["calibration_deciles"]
    assert len(deciles) == 10
    assert sum(row["n"] for row in deciles) == round(0.2 * N_SLATES) * SLATE_SIZE
    predicted = [row["predicted"] for row in deciles]
    assert predicted == sorted(predicted)
    for row in deciles:
        assert abs(row["predicted"] - row["observed"]) < 0.03, row

    without = ChoiceData(**{**data.__dict__, "item_expert": None})
    _, plain = fit_choice_model(without, N_TOPICS, l2=1e-5, seed=0)
    assert metrics["heldout_logloss"] < plain["heldout_logloss"] - 0.002


def test_slate_weights_from_logged_propensities():
    propensity = torch.tensor([0.5, 0.5, 1.0, float("nan"), 0.01, 0.01], dtype=torch.float64)
    slate = torch.tensor([0, 0, 1, 1, 2, 2])
    weights = slate_weights(propensity, slate, 3, max_weight=20.0)
    raw = torch.tensor([2.0, 1.0, 20.0], dtype=torch.float64)  # 1 / geometric mean, clipped
    torch.testing.assert_close(weights, raw / raw.mean())


def test_propensity_weighting_enters_the_fit():
    data = _simulated_logs(seed=2).select(torch.arange(8000 * SLATE_SIZE))
    _, unweighted = fit_choice_model(data, N_TOPICS, seed=0)

    data.propensity = torch.full((data.n_impressions,), 0.3, dtype=torch.float64)
    _, equal = fit_choice_model(data, N_TOPICS, seed=0)
    assert abs(equal["train_logloss"] - unweighted["train_logloss"]) < 1e-6
    assert equal["propensity_share"] == 1.0

    # slates the logging policy rarely showed count more: the training loss moves
    generator = torch.Generator().manual_seed(0)
    slate_propensity = torch.rand(8000, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    data.propensity = slate_propensity.repeat_interleave(SLATE_SIZE)
    _, weighted = fit_choice_model(data, N_TOPICS, seed=0)
    assert abs(weighted["train_logloss"] - unweighted["train_logloss"]) > 1e-4


def test_impression_utilities_equal_the_slate_utilities():
    """The per-impression path (user terms formed per state) sums the same terms."""
    data = _simulated_logs(seed=3)
    model = _truth()
    state = UserState.from_features(data.interest, data.strength, data.signup)
    slates = data.item.reshape(-1, SLATE_SIZE)
    users = data.user.reshape(-1, SLATE_SIZE)[:, 0]
    with torch.no_grad():
        expected = model.utilities(state.index(users), Catalogue(data.topic, data.item_numeric),
                                   slates).reshape(-1)
        torch.testing.assert_close(model.impression_utilities(data), expected)
        baseline = ChoiceModel(N_TOPICS, N_NUMERIC, SLATE_SIZE, position_only=True)
        baseline.later_position_bias.copy_(TRUE_POSITION_BIAS[1:])
        baseline.intercept.fill_(-1.0)
        torch.testing.assert_close(baseline.impression_utilities(data),
                                   -1.0 + TRUE_POSITION_BIAS[data.position])
