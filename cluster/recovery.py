"""What keeps a run from being lost: checkpoints of the driver's state beside the learner's, a dead learner
rebuilt from the last one, and SIGTERM or Ctrl-C turned into a checkpoint and a clean stop.

``Recovery`` is a part of ``cluster.driver.Driver`` (a mixin): it reads the driver's run directory, learner,
fleet, version store, stream, evaluator and logs, and its ``_start_learner``, ``sync``, ``_finish_eval`` and
``_open_log``. ``relay train --resume`` reads what ``checkpoint`` writes (``cluster/train.py``).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import ray

from cluster import checkpoint
from cluster.errors import LearnerDied, RunError


class Recovery:
    """The driver's checkpoints and restores (see the module docstring)."""

    def _guarded_step(self) -> dict[str, float] | None:
        """``_step``, restoring the learner from the last checkpoint if it died (None then)."""
        try:
            return self._step()
        except LearnerDied as e:  # WeightsLost too: the weights went with the learner that published them
            self._restore_learner(e)
            return None

    # ---- the learner ------------------------------------------------------------------------------
    def _learner_call(self, method, *args):
        """``method(*args)``, a call of the learner group with its deadline; a dead learner raises LearnerDied,
        a non-finite run RunError."""
        from learner.group import RankFailed
        from learner.learner import NonFiniteError

        try:
            return method(*args)
        except RankFailed as e:
            raise LearnerDied(str(e)) from e
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, NonFiniteError):
                last = self.last_checkpoint or "not written yet"
                raise RunError(f"{e.cause} The last checkpoint is {last}") from None
            raise

    def _restore_learner(self, error: Exception) -> None:
        """Rebuild a dead learner from the last checkpoint and roll the run back to it; or stop, saying how
        to resume."""
        where = self.last_checkpoint
        if where is None or self.learner_restores >= self.cfg.learner.max_restores:
            why = "no checkpoint was written yet" if where is None else \
                f"it was restored {self.learner_restores} times already (learner.max_restores)"
            raise RunError(f"the learner died at step {self.step + 1} ({error}) and {why}. Fix the cause, then "
                           f"continue from the last checkpoint with: relay train --resume {self.run_dir}")
        started = time.perf_counter()
        self._finish_eval(wait=True)
        self.learner_restores += 1
        self.log(f"the learner died at step {self.step + 1} ({error}); restoring it from {where}")
        self.learner.kill()
        try:
            self.learner = self._start_learner(str(where), with_state=True)
            ahead = max(self.store.latest_version, max(self.fleet.versions.values(), default=0))
            self.learner.set_version(ahead)  # versions only go up
            self._restore(checkpoint.read_state(where), resume=False)
            self.sync()  # every actor gets the checkpoint's weights, as a new version
        except (ray.exceptions.RayError, LearnerDied) as e:
            raise RunError(f"the learner died again while being restored from {where} ({_first_line(e)}). Fix the "
                           f"cause, then continue with: relay train --resume {self.run_dir}") from None
        if self.sink:
            self.sink.log({"system/learner_restores_total": 1.0})
        self.log(f"learner restored in {time.perf_counter() - started:.1f} s; continuing from step {self.step}")

    # ---- checkpoints ------------------------------------------------------------------------------
    def _last_checkpoint(self, name: str, elapsed: float) -> Path:
        try:
            return self.checkpoint(name, elapsed=elapsed)
        except LearnerDied as e:
            raise RunError(f"the learner died ({e}); the previous checkpoint ({self.last_checkpoint or 'none yet'}) "
                           f"is intact. Continue with: relay train --resume {self.run_dir}") from None

    def _checkpoint_due(self) -> bool:
        c = self.cfg.checkpoint
        return bool((c.every and self.step % c.every == 0)
                    or (c.every_s and time.time() - self.last_checkpoint_time >= c.every_s))

    def checkpoint(self, name: str, elapsed: float = 0.0) -> Path:
        """A full checkpoint: the learner's state and the driver's, committed atomically (cluster/checkpoint.py).
        A failed write leaves the previous checkpoint as it was and says why (LearnerDied if the learner died)."""
        self._finish_eval(wait=True)  # its metrics and the evaluator's history belong to the checkpoint
        started = time.perf_counter()

        def save(staging: Path) -> None:
            from learner.group import RankFailed

            try:
                self.learner.save(str(staging.resolve()))
            except ray.exceptions.RayTaskError as e:  # the learner's OSError (disk full, permissions) as itself
                if isinstance(e.cause, OSError):
                    raise e.cause from None
                raise
            except RankFailed as e:
                raise LearnerDied(f"while writing checkpoint {name}: {e}") from None

        path = checkpoint.write(self.run_dir, name, save, self._state(elapsed), previous=self.last_checkpoint)
        self.last_checkpoint, self.last_checkpoint_time = path, time.time()
        checkpoint.prune(self.run_dir, self.cfg.checkpoint.keep_last, protect=self.fleet.policy_path)
        if self.sink:
            self.sink.log({"system/checkpoint_seconds": time.perf_counter() - started})
        return path

    def _state(self, elapsed: float) -> dict:
        """Everything besides the learner's state that continuing exactly needs."""
        pending = [i for picks, _ in self.inflight for i in picks]  # launched, not trained: drawn again
        if self.stream is not None:
            pending += self.stream.pending()
        return {
            "step": self.step,
            "version": self.store.latest_version if self.store.latest_version > 0 else self.fleet.start_version,
            "order": pending + self.order,
            "rng": _jsonable_rng(self.rng.getstate()),
            "evals": self.evals,
            "elapsed_s": elapsed,
            "metrics_offset": self.logger.offset() if self.logger else 0,
            "reward_norm": self.reward.norm_state() if self.cfg.reward.normalize else None,
            "evaluator": self.evaluator.state() if self.evaluator else self._evaluator_state,
            "service_counts": self._service_counts,
            "restarts": self.fleet.restarts,
            "learner_restores": self.learner_restores,
            "reference": self.policy_path,
        }

    def _restore(self, state: dict, resume: bool = True) -> None:
        """Continue from a checkpoint's driver state: a resume (``resume``), or a restored learner, whose run
        keeps its clock and counters."""
        self.step, self.order, self.evals = state["step"], list(state["order"]), [tuple(e) for e in state["evals"]]
        self.rng.setstate(_rng_from_json(state["rng"]))
        if resume:
            self.elapsed_before = state["elapsed_s"]
            self.fleet.restarts = state["restarts"]
            self.learner_restores = state.get("learner_restores", 0)
        self.inflight.clear()
        if self.stream is not None:
            self.stream.reset()
        self._service_counts = state["service_counts"]
        self._evaluator_state = state["evaluator"]
        if self.evaluator is not None and state["evaluator"] is not None:
            self.evaluator.restore(state["evaluator"])
        if state["reward_norm"] is not None:
            self.reward.set_norm_state(state["reward_norm"])
        if self.logger is not None:  # a restored learner: the steps after the checkpoint are redone
            self.logger.close()
            self._open_log(state["metrics_offset"])
        self._metrics_offset = state["metrics_offset"]

    _metrics_offset: int | None = None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _jsonable_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]


class _graceful_stop:
    """SIGTERM or a first Ctrl-C sets ``driver._stop``: the step in flight finishes, a checkpoint is written and
    the run returns. A second Ctrl-C interrupts at once. Only in the main thread (signals arrive there)."""

    def __init__(self, driver: Recovery):
        self.driver, self.saved = driver, {}

    def _handle(self, signum, frame):  # only sets a flag: printing here could re-enter a print in progress
        if self.driver._stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.driver._stop = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
