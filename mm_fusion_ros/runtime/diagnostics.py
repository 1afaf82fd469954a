"""What the nodes put on /diagnostics, assembled from plain counters (no ROS types).

Levels follow diagnostic_msgs/DiagnosticStatus: OK 0, WARN 1, ERROR 2. A worker exception
(workers.FaultLog) makes a status ERROR for `error_hold_s` after it, then WARN while its count is
not zero; drops make the synchronizer WARN.
"""
from dataclasses import dataclass, field

OK, WARN, ERROR = 0, 1, 2
# Samples lost after the synchronizer: not handed to the learner process (its ring was full),
# refused by the replay buffer (predicted, not trained on), and samples from the intake
# process whose prediction raised (intake: process; in one process these are the
# synchronizer's dispatch_errors).
LOST_SAMPLE_KEYS = ('learner_missed_samples', 'buffer_rejected_samples', 'intake_failed_samples')
ERROR_HOLD_S = 60.0
HARDWARE_ID = 'mm_fusion_ros'


@dataclass
class Status:
    level: int
    name: str
    message: str
    values: dict = field(default_factory=dict)   # str -> str


def fault_part(faults_snapshot: dict, hold_s: float = ERROR_HOLD_S):
    """(level, message or '', values) of the worker exceptions."""
    values, level, recent = {}, OK, []
    for worker, (count, age_s, message) in sorted(faults_snapshot.items()):
        values[f'errors_{worker}'] = str(count)
        values[f'last_error_{worker}'] = message
        level = max(level, ERROR if age_s <= hold_s else WARN)
        if age_s <= hold_s:
            recent.append(f'{worker}: {message}')
    return level, '; '.join(recent), values


def synchronizer_status(node_name: str, stats: dict, buffer: dict, rates_hz: dict,
                        emitted: int, failed_samples: int, faults_snapshot: dict,
                        extra: dict = None) -> Status:
    values = {f'rate_{k}_hz': f'{v:.1f}' for k, v in rates_hz.items()}
    values.update(extra or {})
    values.update({f'received_{k}': str(v) for k, v in stats['received'].items()})
    values.update({f'dropped_{k}': str(v) for k, v in stats['dropped'].items()})
    values.update({f'masked_{k}': str(v) for k, v in stats['masked'].items()})
    values.update({'emitted': str(emitted), 'dispatch_errors': str(failed_samples),
                   'run': str(stats.get('run', 0)), 'rewinds': str(stats.get('rewinds', 0))})
    if buffer is not None:   # None: the buffer is the trainer's (its status has it)
        values.update({'buffer_size': str(buffer['size']), 'buffer_bytes': str(buffer['bytes']),
                       'buffer_capacity': str(buffer['capacity'])})
    fault_level, fault_message, fault_values = fault_part(faults_snapshot)
    values.update(fault_values)
    dropped = sum(stats['dropped'].values())
    message = f'{emitted} samples, {dropped} dropped'
    if fault_message:
        message += f'; {fault_message}'
    return Status(level=max(WARN if dropped else OK, fault_level),
                  name=f'{node_name}: synchronizer', message=message, values=values)


def trainer_status(node_name: str, metrics: dict, trajectory: dict,
                   faults_snapshot: dict) -> Status:
    keys = ('online_samples', 'online_steps', 'online_steps_failed', 'buffer_size',
            'training_enabled', 'autosaves', 'autosave_failures', *LOST_SAMPLE_KEYS)
    values = {k: str(metrics[k]) for k in keys if k in metrics}
    # The last step's loss and each of its parts (gt, the self-supervised terms), for watching
    # what the online training learns from; nan: no step yet, or the part was not in it.
    values.update({k[len('last_'):]: f'{v:.6g}' for k, v in metrics.items()
                   if k.startswith('last_loss')})
    if 'supervision' in metrics:
        values['supervision'] = str(metrics['supervision'])
    values.update({f'trajectory_{k}': str(v) for k, v in trajectory.items()})
    values.update({k: str(v) for k, v in metrics.items() if k.startswith('filter_')})
    # The deployment guard (training/guard.py): whether predictions use the adapted weights.
    values.update({k: str(v) for k, v in metrics.items() if k.startswith('guard_')})
    level, fault_message, fault_values = fault_part(faults_snapshot)
    values.update(fault_values)
    message = (f'{metrics.get("online_steps", 0)} steps on {metrics.get("online_samples", 0)} '
               f'samples; {trajectory.get("bridged", 0)} steps bridged, '
               f'{trajectory.get("segments", 0)} segment(s)')
    lost = {k: metrics[k] for k in LOST_SAMPLE_KEYS if metrics.get(k)}
    if lost:   # samples the learner or the predictor never got: drops, as the synchronizer's
        level = max(level, WARN)
        message += '; ' + ', '.join(f'{v} {k}' for k, v in lost.items())
    if fault_message:
        message += f'; {fault_message}'
    return Status(level=level, name=f'{node_name}: trainer', message=message, values=values)
