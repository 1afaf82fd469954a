"""IMU sources of a KITTI odometry sequence, all yielding one ImuData on the sequence clock.

Resolution order for a sequence (the first that exists wins):
1. `--imu_path DIR` given: DIR/NN.mat (frame-aligned 100 Hz IMU, key `imu_data_interp`);
2. DATA/sequences/NN/oxts/ (KITTI raw OXTS layout, what the synthetic world writes);
3. DATA/imus/NN.mat;
4. a KITTI raw root (`raw_root`), through the devkit's odometry -> raw-drive mapping.
Otherwise the sequence has no IMU (None), e.g. real KITTI 03.

Clock rule: times.txt's zero is the first OXTS timestamp of an OXTS folder in the sequence (the
synthetic world writes it so), or the synced timestamp of the first frame for a raw root; .mat
samples sit at 10 per frame interval, sample 10·k at times.txt[k] (PROVENANCE.md).
"""
import logging
from pathlib import Path

import numpy as np

from mm_fusion_ros.kitti.raw import OXTS_INDEX, raw_oxts_for_sequence, read_oxts_folder
from mm_fusion_ros.kitti.sample import ImuData

log = logging.getLogger(__name__)

MAT_KEY = 'imu_data_interp'
MAT_SAMPLES_PER_FRAME = 10


def oxts_to_imu(stamps_ns, fields, t0_ns, source='') -> ImuData:
    """OXTS rows -> ImuData (accel ax ay az, gyro wx wy wz, rpy) with stamps relative to t0_ns."""
    idx = OXTS_INDEX
    stamps = (np.asarray(stamps_ns, dtype=np.int64) - int(t0_ns)) * 1e-9
    return ImuData(stamps=stamps,
                   accel=fields[:, [idx['ax'], idx['ay'], idx['az']]].copy(),
                   gyro=fields[:, [idx['wx'], idx['wy'], idx['wz']]].copy(),
                   rpy=fields[:, [idx['roll'], idx['pitch'], idx['yaw']]].copy(),
                   source=str(source), t0_ns=int(t0_ns))


def read_oxts_imu(folder) -> ImuData:
    stamps, fields = read_oxts_folder(folder)
    if len(stamps) == 0:
        raise ValueError(f'{folder}: OXTS folder has no samples')
    return oxts_to_imu(stamps, fields, stamps[0], folder)


def read_mat_imu(path, times) -> ImuData:
    """Frame-aligned 100 Hz IMU (.mat, imu_data_interp, (10·(N-1)+1, 6)) on times.txt's clock."""
    from scipy.io import loadmat  # scipy is only needed for this source
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: IMU .mat file not found')
    try:
        mat = loadmat(path)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f'{path}: not a readable MATLAB file ({e})') from e
    if MAT_KEY not in mat:
        keys = sorted(k for k in mat if not k.startswith('__'))
        raise ValueError(f'{path}: key {MAT_KEY!r} not found; keys present: {keys}')
    data = np.asarray(mat[MAT_KEY], dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    expected = MAT_SAMPLES_PER_FRAME * (len(times) - 1) + 1
    if data.ndim != 2 or data.shape[1] != 6:
        raise ValueError(f'{path}: {MAT_KEY} has shape {data.shape}, expected (M, 6)')
    if len(data) != expected:
        raise ValueError(f'{path}: {len(data)} IMU samples, but times.txt has {len(times)} frames '
                         f'(expected {MAT_SAMPLES_PER_FRAME}*(frames-1)+1 = {expected})')
    if not np.isfinite(data).all():
        raise ValueError(f'{path}: non-finite IMU values')
    frame_pos = np.arange(len(data)) / MAT_SAMPLES_PER_FRAME
    stamps = np.interp(frame_pos, np.arange(len(times)), times)
    return ImuData(stamps=stamps, accel=data[:, :3].copy(), gyro=data[:, 3:].copy(),
                   source=str(path))


def load_sequence_imu(seq):
    """The IMU of a KittiSequence, by the resolution order above; None when it has none."""
    if seq.imu_path is not None:
        path = Path(seq.imu_path) / f'{seq.sequence}.mat'
        if not path.is_file():
            have = sorted(p.stem for p in Path(seq.imu_path).glob('*.mat'))
            raise FileNotFoundError(f'{path}: no IMU for sequence {seq.sequence} in --imu_path '
                                    f'(have: {", ".join(have) or "none"})')
        return read_mat_imu(path, seq.times)
    oxts_dir = seq.seq_dir / 'oxts'
    if oxts_dir.is_dir():
        return read_oxts_imu(oxts_dir)
    mat_path = seq.data_path / 'imus' / f'{seq.sequence}.mat'
    if mat_path.is_file():
        return read_mat_imu(mat_path, seq.times)
    if seq.raw_root is not None:
        stamps, fields, t0_ns, source = raw_oxts_for_sequence(seq.raw_root, seq.sequence)
        return oxts_to_imu(stamps, fields, t0_ns, source)
    return None


def require_sequence_imu(seq) -> ImuData:
    """The IMU of a KittiSequence; FileNotFoundError naming every place looked at if none."""
    imu = seq.imu
    if imu is None:
        places = [str(seq.seq_dir / 'oxts'), str(seq.data_path / 'imus' / f'{seq.sequence}.mat')]
        if seq.raw_root is not None:
            places.append(f'the raw drive of {seq.sequence} under {seq.raw_root}')
        raise FileNotFoundError(f'sequence {seq.sequence}: no IMU found (looked for '
                                f'{", ".join(places)}; or give --imu_path DIR with '
                                f'DIR/{seq.sequence}.mat)')
    return imu
