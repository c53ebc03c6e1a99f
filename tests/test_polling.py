"""Adaptive polling: a full classroom polls the server less often, one learner at full rate."""

import types

import pytest

from pages._ui import polling


@pytest.mark.parametrize("sessions", [1, 2, 3])
def test_a_small_room_polls_at_each_panels_own_rate(sessions):
    assert polling.scaled(1.0, sessions) == 1.0
    assert polling.scaled(15, sessions) == 15


def test_twenty_tabs_poll_in_proportion_so_the_total_rate_stays_that_of_three():
    assert polling.scaled(2, 20) == pytest.approx(13.3)
    assert polling.scaled(1.0, 6) == 2.0
    # total polls per second across the room: 20 tabs at the scaled rate ≈ 3 tabs at the base rate
    assert 20 / polling.scaled(3, 20) == pytest.approx(3 / 3, rel=0.01)


def test_even_a_crowded_room_moves_a_live_panel_once_a_minute():
    assert polling.scaled(3, 200) == polling.LONGEST_S
    assert polling.scaled(90, 200) == 90  # a base slower than the cap is never made faster


def test_without_a_server_there_is_one_session():
    assert polling.connected_sessions() == 1
    assert polling.every(2) == 2


def test_the_count_comes_from_the_running_server(monkeypatch):
    from streamlit import runtime

    manager = types.SimpleNamespace(num_active_sessions=lambda: 20)
    monkeypatch.setattr(runtime, "exists", lambda: True)
    monkeypatch.setattr(runtime, "get_instance", lambda: types.SimpleNamespace(_session_mgr=manager))
    assert polling.connected_sessions() == 20
    assert polling.every(2) == pytest.approx(13.3)


def test_a_count_that_cannot_be_read_falls_back_to_full_rate(monkeypatch):
    from streamlit import runtime

    monkeypatch.setattr(runtime, "exists", lambda: True)
    monkeypatch.setattr(runtime, "get_instance", lambda: object())  # no session manager
    assert polling.connected_sessions() == 1
