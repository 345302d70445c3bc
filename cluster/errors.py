"""The errors a run raises between its parts, in one place so that each part can name the others'.

``RunError`` reaches the user as a message; ``FleetError`` too. ``LearnerDied`` and its kind ``WeightsLost`` are
caught by the driver, which restores the learner from the last checkpoint (``cluster/recovery.py``).
"""


class RunError(RuntimeError):
    """A problem the user can fix, reported without a traceback by the CLI."""


class LearnerDied(RuntimeError):
    """The learner actor died or missed its deadline."""


class WeightsLost(LearnerDied):
    """A version's weights left the object store with the learner that put them, before every actor loaded it: the
    learner died after publishing, and is restored as any dead learner."""


class FleetError(RuntimeError):
    """No generation actor is left to take work."""


class WrongVersion(RuntimeError):
    """An on-policy shard came back sampled by another version than the one it was launched for."""
