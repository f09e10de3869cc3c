"""The Open Bandit Dataset against the project's models: fit the choice model on real logged
clicks and estimate Bernoulli Thompson Sampling's click rate off-line from random-policy logs.

The files are read directly (`rec.ingest.open_bandit_files`), so the evaluation needs no
database; `rec.ingest.open_bandit` loads the same files into the app schema.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from rec.choice import ChoiceData, ChoiceModel, fit_choice_model
from rec.ingest.open_bandit_files import CampaignLog, find_prior_file, read_campaign
from rec.ope import LoggedFeedback, evaluate_policy

log = logging.getLogger(__name__)

L2_GRID = (1e-4, 3e-4, 1e-3)
"""Penalties tried by inner validation. The choice model's penalty also shrinks its position
biases, which the position-only baseline fits freely; above 1e-3 (a prior sd under about 0.25
on a log-odds coefficient at 8,000 impressions) it erases them, so the grid stops there."""


# ---------- the BTS policy


def load_bts_prior(prior_file: str | Path, campaign: str, n_items: int) -> tuple[np.ndarray, ...]:
    """The Beta prior (alpha, beta) per item of the production BTS policy for a campaign."""
    with Path(prior_file).open() as handle:
        priors = yaml.safe_load(handle)
    if campaign not in priors:
        raise KeyError(f"{prior_file} has no prior for campaign {campaign!r}: {sorted(priors)}")
    alpha = np.asarray(priors[campaign]["alpha"], dtype=float)
    beta = np.asarray(priors[campaign]["beta"], dtype=float)
    if len(alpha) != n_items or len(beta) != n_items:
        raise ValueError(
            f"prior of {campaign!r} has {len(alpha)} items, the campaign's logs {n_items}")
    return alpha, beta


def bts_action_dist(
    alpha: np.ndarray, beta: np.ndarray, n_positions: int, *, n_sim: int = 100_000,
    seed: int = 0, chunk: int = 10_000,
) -> np.ndarray:
    """(A, P) probability that Bernoulli Thompson Sampling puts item a at position p.

    Each draw samples a click rate per item from its Beta posterior and ranks the items by
    it: the highest goes to position 0, the next to position 1, and so on. With no feedback
    since the prior, the posterior is the prior, and the policy ignores the user.
    """
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(alpha), n_positions))
    for start in range(0, n_sim, chunk):
        size = min(chunk, n_sim - start)
        theta = rng.beta(alpha, beta, size=(size, len(alpha)))
        ranked = np.argsort(-theta, axis=1)[:, :n_positions]
        for position in range(n_positions):
            counts[:, position] += np.bincount(ranked[:, position], minlength=len(alpha))
    return counts / n_sim


# ---------- the choice model on the dataset's features


def choice_data(log_: CampaignLog) -> tuple[ChoiceData, int]:
    """The campaign's impressions in the choice model's layout, and its number of topics.

    Mapping: an item's first categorical feature is its topic; its numeric feature
    (standardised) and the one-hot codes of its other categorical features are its numeric
    features; the user state of an impression is its row's user-item affinities summed per
    topic (interest shares, strength = log1p of the total, "sign-up" = any affinity to the
    topic). Each impression is a slate of its own: the files do not say which rows shared a
    page.
    """
    # Limitation: the hashed user features are not used; the model has no user-category
    # term to put them in, and 230 user categories against fewer than 100 clicks would
    # not be learnt anyway.
    items = log_.items
    topic_codes, topic = np.unique(items.categorical[:, 0], return_inverse=True)
    numeric = [(items.numeric - items.numeric.mean()) / (items.numeric.std() or 1.0)]
    for column in range(1, items.categorical.shape[1]):
        values, codes = np.unique(items.categorical[:, column], return_inverse=True)
        numeric.extend((codes == k).astype(float) for k in range(len(values)))
    n_topics = len(topic_codes)

    by_topic = np.zeros((len(log_.item), n_topics))
    np.add.at(by_topic.T, topic, log_.affinity.T)
    total = by_topic.sum(axis=1, keepdims=True)
    interest = np.divide(by_topic, total, out=np.zeros_like(by_topic), where=total > 0)
    n = len(log_.item)
    data = ChoiceData(
        interest=torch.tensor(interest, dtype=torch.float64),
        strength=torch.tensor(np.log1p(total[:, 0]), dtype=torch.float64),
        signup=torch.tensor((by_topic > 0).astype(float), dtype=torch.float64),
        topic=torch.tensor(topic, dtype=torch.long),
        item_numeric=torch.tensor(np.stack(numeric, axis=1), dtype=torch.float64),
        slate=torch.arange(n),
        user=torch.arange(n),
        item=torch.tensor(log_.item, dtype=torch.long),
        position=torch.tensor(log_.position, dtype=torch.long),
        clicked=torch.tensor(log_.click, dtype=torch.float64),
    )
    return data, n_topics


def click_probability(model: ChoiceModel, data: ChoiceData) -> np.ndarray:
    """(N,) the model's click probability of each impression (a slate of one item)."""
    with torch.no_grad():
        utility = model.double().impression_utilities(data)
    return torch.sigmoid(utility).numpy()


def reward_table(model: ChoiceModel, data: ChoiceData, n_positions: int) -> np.ndarray:
    """(N, A, P) click probability of every item at every position for each row's user."""
    with torch.no_grad():
        model = model.double()
        at_top = model.all_item_utilities(
            data.interest[data.user], data.strength[data.user], data.signup[data.user],
            data.topic, data.item_numeric)
        last = model.config["n_positions"] - 1
        bias = model.position_bias[torch.arange(n_positions).clamp(max=last)]
        return torch.sigmoid(at_top.unsqueeze(2) + bias.view(1, 1, -1)).numpy()


def _log_loss(probability: np.ndarray, clicked: np.ndarray) -> float:
    probability = np.clip(probability, 1e-12, 1 - 1e-12)
    return float(-np.mean(clicked * np.log(probability) + (1 - clicked) * np.log1p(-probability)))


def calibration_by_decile(probability: np.ndarray, clicked: np.ndarray) -> list[dict]:
    """Ten equal-count bins of predicted probability: rows, mean predicted, observed rate."""
    order = np.argsort(probability, kind="stable")
    return [
        {"decile": k + 1, "n": int(len(rows)), "predicted": float(probability[rows].mean()),
         "observed": float(clicked[rows].mean())}
        for k, rows in enumerate(np.array_split(order, 10)) if len(rows)
    ]


def select_l2(
    data: ChoiceData, n_topics: int, *, l2_grid: tuple[float, ...] = L2_GRID,
    repeats: int = 2, seed: int = 0, max_iter: int = 100,
) -> tuple[float, dict[str, float]]:
    """The penalty with the lowest mean held-out log-loss over repeated random splits."""
    losses = {}
    for l2 in l2_grid:
        losses[l2] = float(np.mean([
            fit_choice_model(data, n_topics, l2=l2, seed=seed + r, holdout_fraction=0.25,
                             max_iter=max_iter)[1]["heldout_logloss"]
            for r in range(repeats)
        ]))
    return min(losses, key=losses.get), {str(k): v for k, v in losses.items()}


def fit_reward_model(
    data: ChoiceData, n_topics: int, *, seed: int = 0, max_iter: int = 100,
) -> tuple[ChoiceModel, float]:
    """The choice model fitted on all rows, with its penalty chosen by inner validation."""
    l2, _ = select_l2(data, n_topics, seed=seed, max_iter=max_iter)
    model, _ = fit_choice_model(data, n_topics, l2=l2, seed=seed, holdout_fraction=0.0,
                                max_iter=max_iter)
    return model, l2


def _position_rates(clicked: np.ndarray, position: np.ndarray, n_positions: int) -> np.ndarray:
    """Each position's click rate, the maximum-likelihood fit of the position-only logit.

    Half a click and one impression of smoothing keep a click-free position finite.
    """
    return np.array([(clicked[position == p].sum() + 0.5) / ((position == p).sum() + 1.0)
                     for p in range(n_positions)])


def cross_validate(
    data: ChoiceData, n_topics: int, *, folds: int = 5, seed: int = 0, max_iter: int = 100,
) -> dict:
    """K-fold held-out log-loss of the choice model against the position-only baseline.

    Every impression is held out once, so all of the sample's few clicks are scored. Within
    each training fold the penalty is chosen by inner validation, so the held-out fold
    judges the model only once. Calibration is by decile of the held-out predictions.
    """
    started = time.perf_counter()
    n = data.n_impressions
    fold = np.random.default_rng(seed).permutation(n) % folds
    clicked, position = data.clicked.numpy(), data.position.numpy()
    n_positions = int(position.max()) + 1
    predicted, baseline, chosen = np.zeros(n), np.zeros(n), []
    for k in range(folds):
        train, held = fold != k, fold == k
        train_data = data.select(torch.from_numpy(train))
        l2, _ = select_l2(train_data, n_topics, seed=seed + 10 * k, max_iter=max_iter)
        model, _ = fit_choice_model(train_data, n_topics, l2=l2, seed=seed,
                                    holdout_fraction=0.0, max_iter=max_iter)
        predicted[held] = click_probability(model, data.select(torch.from_numpy(held)))
        baseline[held] = _position_rates(clicked[train], position[train],
                                         n_positions)[position[held]]
        chosen.append(l2)

    report = {
        "heldout_logloss": _log_loss(predicted, clicked),
        "baseline_logloss": _log_loss(baseline, clicked),
        "folds": folds,
        "l2_per_fold": chosen,
        "heldout_clicks": int(clicked.sum()),
        "heldout_click_rate": float(clicked.mean()),
        "heldout_predicted_click_rate": float(predicted.mean()),
        "calibration": calibration_by_decile(predicted, clicked),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("choice model, %d-fold held-out log-loss %.5f, position-only %.5f (%.1f s)",
             folds, report["heldout_logloss"], report["baseline_logloss"], report["seconds"])
    return report


# ---------- the evaluation


def evaluate_bts(
    random_path: str | Path,
    bts_path: str | Path,
    campaign: str | None = None,
    *,
    prior_file: str | Path | None = None,
    n_sim: int = 100_000,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Estimate BTS's click rate from the random-policy logs and compare it with its own logs.

    Args:
        random_path: the random policy's campaign folder (or its parent with `campaign`).
        bts_path: the BTS policy's campaign folder (or its parent with `campaign`).
        campaign: the campaign; the random folder's name when None.
        prior_file: the BTS priors; `prior_bts.yaml` found beside the folders when None.
        n_sim: Monte Carlo draws of the BTS posteriors.
        n_boot: bootstrap replicates of each interval.
        seed: seed of every random step (split, draws, bootstrap).

    Returns:
        observed_ctr, estimators (ips, snips, dr: estimate, ci, relative_error),
        choice_model (held-out and baseline log-loss, calibration) and data figures.
    """
    random_log = read_campaign(random_path, campaign)
    bts_log = read_campaign(bts_path, random_log.campaign)
    if not np.array_equal(random_log.items.item_ids, bts_log.items.item_ids):
        raise ValueError("the two folders describe different items")
    prior_file = prior_file or find_prior_file(random_log.folder) or find_prior_file(
        bts_log.folder)
    if prior_file is None:
        raise FileNotFoundError("no prior_bts.yaml beside the folders: pass prior_file")

    n_items, n_positions = len(random_log.items.item_ids), random_log.n_positions
    alpha, beta = load_bts_prior(prior_file, random_log.campaign, n_items)
    action_dist = bts_action_dist(alpha, beta, n_positions, n_sim=n_sim, seed=seed)

    data, n_topics = choice_data(random_log)
    threads = torch.get_num_threads()
    # The fits run on small tensors, where one thread is faster than several contending.
    torch.set_num_threads(1)
    try:
        choice_report = cross_validate(data, n_topics, seed=seed)
        reward_model, reward_l2 = fit_reward_model(data, n_topics, seed=seed)
    finally:
        torch.set_num_threads(threads)
    # Limitation: the reward model is fitted on the same rows DR averages over (no
    # cross-fitting) and is held fixed in the bootstrap, so DR's interval omits its error.
    reward_hat = reward_table(reward_model, data, n_positions)

    feedback = LoggedFeedback(action=random_log.item, position=random_log.position,
                              reward=random_log.click.astype(float),
                              pscore=random_log.propensity)
    estimates = evaluate_policy(feedback, action_dist, reward_hat, n_boot=n_boot, seed=seed)
    observed = float(bts_log.click.mean())

    # How well the simulated action distribution matches the propensities BTS logged.
    logged_vs_simulated = action_dist[bts_log.item, bts_log.position] - bts_log.propensity
    return {
        "campaign": random_log.campaign,
        "observed_ctr": observed,
        "estimators": {
            name: {**e.as_dict(), "relative_error": abs(e.estimate - observed) / observed}
            for name, e in estimates.items()
        },
        "choice_model": {**choice_report, "reward_model_l2": reward_l2},
        "random_ctr": float(random_log.click.mean()),
        "rows": {
            "random": {"read": random_log.rows_read, "accepted": len(random_log.item),
                       "clicks": int(random_log.click.sum())},
            "bts": {"read": bts_log.rows_read, "accepted": len(bts_log.item),
                    "clicks": int(bts_log.click.sum())},
        },
        "bts_action_dist": {
            "n_sim": n_sim,
            "max_abs_gap_to_logged_propensity": float(np.abs(logged_vs_simulated).max()),
            "mean_abs_gap_to_logged_propensity": float(np.abs(logged_vs_simulated).mean()),
        },
        "seed": seed,
        "n_boot": n_boot,
    }
