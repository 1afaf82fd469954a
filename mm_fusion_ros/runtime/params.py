"""Run-time parameter updates of the trainer, validated as one request: all or nothing.

`ros2 param set` (or a set_parameters call with several values) is checked whole before any of
it is applied, so a request with one bad value changes nothing. A value the learner process
does not confirm (it is gone, or does not answer in time: then it takes it later) fails the
request; its reason names the values already applied before it.
"""
import math

RUNTIME_PARAMS = ('train.learning_rate', 'training_enabled')


def as_number(value):
    """'1e-5' (YAML reads 1e-5 without a dot as text, so `ros2 param set` sends a string) or
    1 -> float; anything else is returned as it is, for the check to refuse."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check(name, value):
    if name not in RUNTIME_PARAMS:
        return f'{name} is fixed at start; only {", ".join(RUNTIME_PARAMS)} change at run time'
    if name == 'train.learning_rate' and not (
            isinstance(value, float) and math.isfinite(value) and value > 0):
        return f'train.learning_rate must be a number > 0, got {value!r}'
    if name == 'training_enabled' and not isinstance(value, bool):
        return f'training_enabled must be true or false, got {value!r}'
    return None


class TrainerParameters:
    """Applies validated updates to an OnlineTrainer (set_learning_rate, set_training)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def update(self, changes: dict):
        """{name: value} -> (True, '') when all were applied, (False, reason) when none was."""
        for name, value in changes.items():
            reason = _check(name, value)
            if reason:
                return False, reason
        applied = []
        for name, value in changes.items():
            try:
                if name == 'train.learning_rate':
                    self.trainer.set_learning_rate(value)
                else:
                    self.trainer.set_training(value)
            except RuntimeError as e:   # the learner process did not confirm it (LearnerError)
                done = f' ({", ".join(applied)} already applied)' if applied else ''
                return False, f'{name} not confirmed by the learner: {e}{done}'
            applied.append(name)
        return True, ''
