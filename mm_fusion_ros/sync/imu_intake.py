"""ImuIntake: serialized IMU messages, taken in batches, into the Synchronizer.

The IMU comes at 100 Hz, so a 5x replay is 500 messages/s. One subscription callback per
message (decode, frame check, add_imu, wake the dispatcher) cost about as much Python as the
rest of a sample's intake (bench/profile_online.py, docs/online_runtime.md). The synchronizer
node instead takes every message queued behind the one its callback got (ros/imu_intake.py)
and hands the list here: one numpy decode (messages.imu_batch_to_arrays), one frame check per
frame_id, one Synchronizer.add_imu_batch. The outcome equals the messages handled one at a time
(test_synchronizer.py, test_imu_intake.py): a message that does not decode counts as
'bad_message', one in an unknown frame as 'wrong_frame', and add_imu_batch counts the others as
add_imu would (late, duplicate, nonfinite, ...).
"""
import numpy as np

from mm_fusion_ros.messages import imu_batch_to_arrays
from mm_fusion_ros.sync.frames import FrameError, FrameGuard


class ImuIntake:
    """forward(stamps, accel, gyro), if given, also gets every batch added (the intake
    process's link to the prediction process), before any sample the batch completes can be
    popped. It runs under the synchronizer's lock: it must not call its locking methods."""

    def __init__(self, sync, frames: FrameGuard, forward=None):
        self.sync, self.frames, self.forward = sync, frames, forward
        self.batches = 0   # add_raw calls: with messages received, how well they batch

    def add_raw(self, raws) -> tuple:
        """Serialized sensor_msgs/Imu messages, in the order taken -> (messages added to the
        synchronizer, [(reason, ValueError)] of those skipped, each counted there)."""
        self.batches += 1
        stamps, accel, gyro, frame_ids, bad = imu_batch_to_arrays(raws)
        keep = np.ones(len(raws), dtype=bool)
        skipped = []
        for i, error in bad:
            keep[i] = False
            skipped.append(('bad_message', error))
        ids = None
        for frame_id in sorted(set(frame_ids)):
            if len(set(frame_ids)) == 1:   # the usual case
                rows = keep.copy()
            else:
                ids = np.asarray(frame_ids, dtype=object) if ids is None else ids
                rows = keep & (ids == frame_id)
            if not rows.any():
                continue
            try:
                accel[rows], gyro[rows] = self.frames.imu(accel[rows], gyro[rows], frame_id)
            except FrameError as e:
                keep &= ~rows
                skipped += [('wrong_frame', e)] * int(rows.sum())
        for reason, _ in skipped:
            self.sync.reject('imu', reason)
        if keep.any():
            rows, forward = (stamps[keep], accel[keep], gyro[keep]), self.forward
            # Forwarded under the synchronizer's lock: no sample these rows complete can be
            # handed on (by the dispatch thread) ahead of them.
            self.sync.add_imu_batch(*rows, then=forward and (lambda: forward(*rows)))
        return int(keep.sum()), skipped
