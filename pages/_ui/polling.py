"""How often a live panel re-reads the disk: quickly for one learner, more slowly as a room fills.

Every open tab polls: the jobs sidebar, a live loss curve, the home page's path. Each poll is a
short rerun in the server's one Python process, and all sessions share its one interpreter lock.
Twenty tabs polling every second keep that process busy with polls, and a learner's click waits
behind them (docs/classroom.md measured it). So each interval grows with the number of connected
sessions once there are more than `FULL_RATE_SESSIONS`: the server's total polling rate stays
about what three tabs cost, and one learner at a laptop still sees a curve move every second.

An interval is fixed when its fragment is drawn; a tab picks up a new room size at its next full
rerun (a click, a page change).
"""

from __future__ import annotations

from streamlit import runtime

FULL_RATE_SESSIONS = 3  # up to this many tabs, every panel polls at its own base rate
LONGEST_S = 60.0  # even in a full room a live panel moves at least once a minute


def connected_sessions() -> int:
    """Browser sessions connected to this server now; 1 where there is no server (AppTest, CLI)."""
    try:
        if runtime.exists():
            # Streamlit has no public count; its session manager's is the one it keeps itself.
            return max(1, int(runtime.get_instance()._session_mgr.num_active_sessions()))
    except Exception:  # noqa: BLE001 - a count we cannot read must never break a page
        pass
    return 1


def scaled(base_s: float, sessions: int) -> float:
    """`base_s` for up to FULL_RATE_SESSIONS sessions, then in proportion to the room, capped."""
    factor = max(1.0, sessions / FULL_RATE_SESSIONS)
    return round(min(base_s * factor, max(base_s, LONGEST_S)), 1)


def every(base_s: float) -> float:
    """The poll interval for a panel whose own rate is one poll every `base_s` seconds."""
    return scaled(base_s, connected_sessions())
