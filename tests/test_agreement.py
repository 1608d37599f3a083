"""Agreement of the clients' updates against numbers worked out by hand and by plain loops."""

import math

import numpy as np
import pytest

from mops_core.agreement import update_agreement


def test_identical_updates_agree_fully():
    d = np.array([[1.0, 2.0], [3.0, -1.0]])
    assert update_agreement([d, d, d], [1, 5, 2]) == pytest.approx({"cosine": 1.0, "norm_ratio": 1.0})


def test_opposite_updates_cancel():
    d = np.array([0.5, -2.0, 1.0])
    assert update_agreement([d, -d], [3, 3]) == pytest.approx({"cosine": -1.0, "norm_ratio": 0.0}, abs=1e-12)


def test_orthogonal_updates():
    out = update_agreement([np.array([2.0, 0.0]), np.array([0.0, 2.0])], [1, 1])
    assert out["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert out["norm_ratio"] == pytest.approx(math.sqrt(0.5))  # |(e1 + e2) / 2| over 1, both of norm 2


def loops_reference(deltas, examples, gate):
    """Each expert's gate-weighted pairwise cosine and its norm ratio, pooled, written as plain loops."""
    clients, experts = gate.shape
    cos_sum = cos_weight = ratio_sum = ratio_weight = 0.0
    for e in range(experts):
        flat = [deltas[i][e].ravel() for i in range(clients)]
        for i in range(clients):
            for j in range(i + 1, clients):
                w = gate[i, e] * gate[j, e]
                cos_sum += w * flat[i] @ flat[j] / (np.linalg.norm(flat[i]) * np.linalg.norm(flat[j]))
                cos_weight += w
        a = [examples[i] * gate[i, e] for i in range(clients)]
        mean = sum(a[i] * flat[i] for i in range(clients)) / sum(a)
        mean_norm = sum(a[i] * np.linalg.norm(flat[i]) for i in range(clients)) / sum(a)
        ratio_sum += sum(a) * np.linalg.norm(mean) / mean_norm
        ratio_weight += sum(a)
    return {"cosine": cos_sum / cos_weight, "norm_ratio": ratio_sum / ratio_weight}


def test_per_expert_with_gate_weights_equals_loops():
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=(3, 2, 5)) for _ in range(4)]
    examples = [10, 3, 7, 1]
    gate = rng.dirichlet(np.ones(3), size=4)
    assert update_agreement(deltas, examples, gate) == pytest.approx(loops_reference(deltas, examples, gate))
    assert update_agreement(deltas, examples, gate) != pytest.approx(update_agreement(deltas, examples))


def test_an_expert_a_client_never_used_does_not_count_its_update():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=(2, 1, 4))
    deltas = [shared + 0.01 * rng.normal(size=shared.shape) for _ in range(3)]
    gate = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    before = update_agreement(deltas, [1, 1, 1], gate)
    deltas[2][1] = -100 * shared[1]  # the third client's expert 1, which its gate never chose
    assert update_agreement(deltas, [1, 1, 1], gate) == pytest.approx(before)
    assert before["cosine"] > 0.99


def test_one_client_has_no_pairs_and_a_wrong_gate_is_named():
    assert update_agreement([np.ones(3)], [1]) == {"cosine": None, "norm_ratio": None}
    assert update_agreement([np.zeros(3), np.zeros(3)], [1, 1]) == {"cosine": None, "norm_ratio": None}
    with pytest.raises(ValueError, match="gate must be clients x experts"):
        update_agreement([np.ones((2, 3)), np.ones((2, 3))], [1, 1], np.ones((2, 3)))
