"""Eq. 8-9: pick the proposal closest in feature space to the VOS mask, accept above tau only."""
import numpy as np
import pytest

from hqsmem_ros.core.gating import select_proposals


def test_hand_computed_choice_and_cosines():
    base = np.array([[1.0, 0.0], [0.0, 2.0]])
    props = np.array([
        [[0.0, 1.0], [3.0, 4.0], [1.0, 1.0]],    # cos 0, 0.6, 0.7071 -> 2
        [[0.0, -1.0], [5.0, 12.0], [1.0, 0.0]],  # cos -1, 12/13, 0 -> 1
    ])
    chosen, accept, best = select_proposals(base, props, tau_verify=0.65)
    assert chosen.tolist() == [2, 1]
    np.testing.assert_allclose(best, [np.sqrt(0.5), 12 / 13])
    assert accept.tolist() == [True, True]
    _, accept, _ = select_proposals(base, props, tau_verify=0.8)
    assert accept.tolist() == [False, True]


def test_scale_does_not_matter():
    base = np.array([[2.0, 1.0, 0.0]])
    props = np.array([[[1.0, 0.0, 0.0], [40.0, 20.0, 0.1], [0.0, 0.0, 9.0]]])
    chosen, _, best = select_proposals(base, props * 1e-3, 0.5)
    assert chosen.tolist() == [1]
    chosen2, _, best2 = select_proposals(base * 100, props, 0.5)
    assert chosen2.tolist() == [1]
    np.testing.assert_allclose(best, best2)


def test_ties_go_to_the_first_proposal():
    base = np.array([[1.0, 1.0]])
    props = np.array([[[0.0, 1.0], [2.0, 2.0], [1.0, 1.0]]])  # slots 1 and 2 both cos 1
    chosen, accept, best = select_proposals(base, props, 0.9)
    assert chosen.tolist() == [1] and accept.tolist() == [True]
    np.testing.assert_allclose(best, [1.0])


def test_zero_vectors_have_cosine_zero_and_are_never_accepted_at_tau_zero():
    base = np.array([[1.0, 0.0], [0.0, 0.0]])
    props = np.array([
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],     # every proposal empty
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],     # empty VOS mask
    ])
    chosen, accept, best = select_proposals(base, props, tau_verify=0.0)
    assert chosen.tolist() == [0, 0]
    np.testing.assert_array_equal(best, [0.0, 0.0])
    assert accept.tolist() == [False, False]
    assert np.all(np.isfinite(best))


def test_tau_boundary_is_strict():
    base = np.array([[1.0, 0.0]])
    props = np.array([[[0.5, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # best cos exactly 1.0
    _, accept, best = select_proposals(base, props, tau_verify=1.0)
    assert best[0] == 1.0 and accept.tolist() == [False]   # equal to tau: rejected
    _, accept, _ = select_proposals(base, props, tau_verify=np.nextafter(1.0, 0.0))
    assert accept.tolist() == [True]
    props_06 = np.array([[[3.0, 4.0], [0.0, 1.0], [0.0, -1.0]]])  # best cos 3/5, exactly 0.6 in float
    _, accept, best = select_proposals(base, props_06, tau_verify=0.6)
    assert best[0] == 0.6 and accept.tolist() == [False]
    _, accept, _ = select_proposals(base, props_06, tau_verify=0.59)
    assert accept.tolist() == [True]


def test_no_objects_and_shape_errors():
    chosen, accept, best = select_proposals(np.zeros((0, 4)), np.zeros((0, 3, 4)), 0.5)
    assert chosen.shape == accept.shape == best.shape == (0,)
    with pytest.raises(ValueError, match="shapes"):
        select_proposals(np.zeros((2, 4)), np.zeros((2, 3, 5)), 0.5)
    with pytest.raises(ValueError, match="shapes"):
        select_proposals(np.zeros((2, 4)), np.zeros((3, 3, 4)), 0.5)
