"""Write a synthetic sequence in the exact KITTI layout (DESIGN §2), through kitti/'s writers.

OUT/sequences/NN/{calib.txt, times.txt, image_2/%06d.png, oxts/, calib_imu_to_velo.txt},
OUT/poses/NN.txt and OUT/pointclouds/sequences/NN/velodyne/%06d.bin. Every random choice comes
from a generator seeded by (seed, sequence, purpose[, frame]), so files are byte-identical for a
seed whatever the number of worker processes.

Hybrid sequences (trajectory= a real KITTI pose file, imu_source= that drive's .mat IMU) write
the real IMU in the same OXTS folder, so every reader and bag converter takes it with no flag:
ax ay az and wx wy wz are the .mat's values at its sample times (repr-formatted, so they read
back bit-exact), timestamps are the sequence epoch plus those times (the first OXTS stamp is
frame 0's time, the clock rule of kitti/imu.py), and the navigation fields (lat/lon/alt,
roll/pitch/yaw, velocities) come from the ground-truth trajectory as for the synthetic IMU.
Those attitudes are relative to frame 0's attitude (KITTI poses start at the identity), which
for 07 is 0.84 deg off the gravity vertical that the real accelerometer sees. oxts/source.txt
says where the IMU came from. The .mat itself is not copied to OUT/imus/: the OXTS folder is
what readers prefer, and a copy cut to --frames would no longer be the original file.
"""
from dataclasses import dataclass, field
import logging
import multiprocessing
import os
from pathlib import Path
import shutil
import time

import numpy as np
from PIL import Image

from mm_fusion_ros.geometry import base_link_to_cam0, invert_pose
from mm_fusion_ros.kitti.ids import normalize_sequence_id
from mm_fusion_ros.kitti.odometry import (
    Calib,
    write_calib,
    write_poses,
    write_times,
    write_velodyne,
)
from mm_fusion_ros.kitti.raw import write_calib_imu_to_velo, write_oxts_folder
from mm_fusion_ros.stamps import NS_PER_S
from mm_fusion_ros.synthetic.camera import (
    Camera,
    camera_pose,
    CameraModel,
    kitti_calib,
    KITTI_SIZE,
)
from mm_fusion_ros.synthetic.domain import DomainConfig
from mm_fusion_ros.synthetic.imu import (
    imu_sample_times,
    kitti_T_velo_imu,
    measured_oxts,
    sequence_epoch_ns,
    synthesize_oxts,
)
from mm_fusion_ros.synthetic.lidar import Lidar, LidarConfig
from mm_fusion_ros.synthetic.real_imu import check_imu_follows_trajectory, load_real_imu
from mm_fusion_ros.synthetic.trajectory import (
    extend_for_imu,
    frame_times,
    load_kitti_trajectory,
    route_from_poses,
    synthesize_drive,
    Trajectory,
)
from mm_fusion_ros.synthetic.world import build_world

log = logging.getLogger(__name__)

PNG_COMPRESSION = 1  # zlib level: deterministic, and faster than the default 6 (measured_figures)
# Purposes of the per-sequence random streams (never reorder: it would change every dataset).
_DRIVE, _WORLD, _TIMES, _IMU, _SCAN, _CAMERA = range(6)
# Below this much work (full-size frames) a worker pool costs more than it saves.
_POOL_MIN_FRAMES = 24


@dataclass(frozen=True)
class SequencePaths:
    root: Path
    sequence: str

    @property
    def seq_dir(self) -> Path:
        return self.root / 'sequences' / self.sequence

    @property
    def image_dir(self) -> Path:
        return self.seq_dir / 'image_2'

    @property
    def oxts_dir(self) -> Path:
        return self.seq_dir / 'oxts'

    @property
    def velodyne_dir(self) -> Path:
        return self.root / 'pointclouds' / 'sequences' / self.sequence / 'velodyne'

    @property
    def poses(self) -> Path:
        return self.root / 'poses' / f'{self.sequence}.txt'

    def outputs(self):
        """Everything generate_sequence writes for this sequence."""
        s = self.seq_dir
        return [s / 'calib.txt', s / 'times.txt', s / 'calib_imu_to_velo.txt', self.poses,
                self.image_dir, self.oxts_dir, self.velodyne_dir]


@dataclass
class SequenceSummary:
    sequence: str
    frames: int
    duration_s: float               # last frame time [s]
    points: tuple                   # (min, mean, max) points per scan
    imu_samples: int
    wall_s: float
    cpu_s: dict = field(default_factory=dict)  # part -> CPU seconds (frame parts summed)
    trajectory: str = 'synthetic'
    workers: int = 1
    imu: str = 'synthetic'          # or 'real, from <.mat file>'
    domain: dict = field(default_factory=dict)  # DomainConfig fields that differ from defaults


@dataclass
class _FrameContext:
    """What a process needs to render frames (sent once to each worker)."""

    world: object
    lidar: Lidar
    camera: Camera
    calib: object
    paths: SequencePaths
    seed: int
    seq_int: int
    images: bool
    scans: bool


def generate_sequence(out_dir, sequence, frames: int, seed: int = 0, *,
                      image_size=KITTI_SIZE, azimuth_steps: int = 2000, beams: int = 64,
                      trajectory=None, imu_source=None, workers=None, overwrite=False,
                      images=True, scans=True,
                      domain: DomainConfig = None) -> SequenceSummary:
    """Generate one sequence of `frames` frames under out_dir (the KITTI layout above).

    image_size: (width, height); intrinsics scale with it. trajectory: a KITTI poses file
    (cam0 poses) to follow instead of a synthetic drive. imu_source: that drive's real
    frame-aligned IMU (.mat, see real_imu.py), written instead of the synthetic one; it needs
    trajectory. workers: processes rendering frames (None: 2 when the job is big enough).
    overwrite: replace an existing sequence's files. domain: scene style, LiDAR mount and
    camera exposure (domain.py; None: DomainConfig(), the pretraining world).

    The drive (synthetic or real) moves the vehicle reference frame, the KITTI car's Velodyne
    mount; the LiDAR (base_link) rides on it at domain.T_vehicle_lidar(), the camera and the
    IMU at their KITTI offsets from that reference.
    """
    start = time.perf_counter()
    domain = DomainConfig() if domain is None else domain
    seq = normalize_sequence_id(sequence)
    _validate(frames, seed, image_size, trajectory, imu_source)
    paths = SequencePaths(Path(out_dir), seq)
    cpu = {}

    def lap(name, t0):
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - t0
        return time.process_time()

    t0 = time.process_time()
    vehicle_calib = kitti_calib(*image_size)  # camera <- vehicle reference (KITTI's Velodyne)
    T_vehicle_imu = kitti_T_velo_imu()
    rng = _streams(seed, int(seq))
    traj, vehicle_poses, times, route, source = _drive(rng, frames, trajectory,
                                                       vehicle_calib.Tr)
    # Everything that can refuse the input runs before a file is touched.
    real_imu = _real_imu(imu_source, trajectory, frames, times, vehicle_poses, T_vehicle_imu)
    _prepare_outputs(paths, overwrite, images, scans)
    t0 = lap('trajectory', t0)
    world = sequence_world(seq, seed, route, domain.scene)
    t0 = lap('world', t0)

    calib, T_velo_imu, world_poses = mount_lidar(vehicle_calib, T_vehicle_imu, vehicle_poses,
                                                 domain.T_vehicle_lidar())
    poses_base = invert_pose(world_poses[0]) @ world_poses
    write_calib(paths.seq_dir / 'calib.txt', calib)
    write_calib_imu_to_velo(paths.seq_dir / 'calib_imu_to_velo.txt', T_velo_imu)
    # The IMU rides on the vehicle, whatever the LiDAR's mount: its data follow the vehicle.
    if real_imu is None:
        imu_t = imu_sample_times(times[-1])
        fields = synthesize_oxts(traj, imu_t, T_vehicle_imu, rng(_IMU))
    else:
        imu_t = real_imu.stamps
        fields = measured_oxts(traj, imu_t, T_vehicle_imu, real_imu.accel, real_imu.gyro)
    stamps = sequence_epoch_ns(seq) + np.rint(imu_t * NS_PER_S).astype(np.int64)
    write_oxts_folder(paths.oxts_dir, stamps, fields)
    if real_imu is not None:
        _write_imu_provenance(paths.oxts_dir / 'source.txt', real_imu, trajectory)
    t0 = lap('imu+text', t0)

    lidar = Lidar(LidarConfig(beams=beams, azimuth_steps=azimuth_steps,
                              top_deg=domain.lidar_top_deg, bottom_deg=domain.lidar_bottom_deg))
    camera = Camera(CameraModel.from_calib(calib, *image_size),
                    exposure_ev=domain.camera_exposure_ev, gamma=domain.camera_gamma,
                    noise=domain.camera_noise)
    ctx = _FrameContext(world=world, lidar=lidar, camera=camera, calib=calib, paths=paths,
                        seed=seed, seq_int=int(seq), images=images, scans=scans)
    workers = _choose_workers(workers, frames, image_size, beams * azimuth_steps)
    results = _render_all(ctx, world_poses, workers)
    # times.txt and the poses last: a run that fails or is killed before here leaves a
    # sequence without them, which every reader refuses (not one that looks whole with frames
    # missing or a scan cut short).
    write_poses(paths.poses, base_link_to_cam0(poses_base, calib.Tr))
    write_times(paths.seq_dir / 'times.txt', times)
    for name in ('lidar', 'camera', 'png', 'bin'):
        cpu[name] = sum(r[name] for r in results)
    counts = np.array([r['points'] for r in results])
    summary = SequenceSummary(
        sequence=seq, frames=frames, duration_s=float(times[-1]),
        points=(int(counts.min()), float(counts.mean()), int(counts.max())),
        imu_samples=len(imu_t), wall_s=time.perf_counter() - start, cpu_s=cpu,
        trajectory=source, workers=workers,
        imu='synthetic' if real_imu is None else f'real, from {imu_source}',
        domain=domain.changes())
    log.info('sequence %s: %d frames, %.1f s, %.0f points/scan, %.1f s wall, IMU %s', seq,
             frames, summary.duration_s, summary.points[1], summary.wall_s, summary.imu)
    return summary


def _validate(frames, seed, image_size, trajectory, imu_source):
    if int(frames) != frames or frames < 2:
        raise ValueError(f'frames must be an integer >= 2, got {frames!r}')
    if int(seed) != seed or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
    if len(image_size) != 2 or min(image_size) < 8:
        raise ValueError(f'image_size must be (width, height) >= 8 px, got {image_size!r}')
    if imu_source is not None and trajectory is None:
        raise ValueError(f'imu_source={str(imu_source)!r} needs trajectory= (--trajectory): a '
                         'real IMU only makes sense along its own real path, not a synthetic '
                         'drive')


def _real_imu(imu_source, trajectory, frames, times, world_poses, T_velo_imu):
    """The real IMU for the first `frames` frames, checked against the trajectory; or None."""
    if imu_source is None:
        return None
    imu = load_real_imu(imu_source, trajectory, frames)
    # The frames' clock (from load_kitti_trajectory) and the IMU's come from one times file.
    if abs(imu.stamps[-1] - times[-1]) > 1e-9:
        raise ValueError(f'IMU {imu_source} ends at {imu.stamps[-1]:.9f} s but frame '
                         f'{frames - 1} of {trajectory} is at {times[-1]:.9f} s')
    rms = check_imu_follows_trajectory(imu, times, world_poses, T_velo_imu[:3, :3], trajectory)
    log.info('real IMU %s: %d samples, yaw rate within %.4f rad/s RMS of %s', imu_source,
             len(imu), rms, trajectory)
    return imu


def _write_imu_provenance(path, imu, trajectory):
    Path(path).write_text(
        f'accel ax ay az, gyro wx wy wz: real IMU from {imu.source} '
        f'(samples 0..{len(imu) - 1}, 10 per frame interval, sample 10*k at frame k)\n'
        f'timestamps: sequence epoch + the frame times of {trajectory}\n'
        'lat lon alt, roll pitch yaw, vn ve vf vl vu: derived from the ground-truth poses\n')


def sequence_world(sequence, seed, route, scene='street'):
    """The world that generate_sequence builds for (sequence, seed) along a route."""
    return build_world(route, _streams(seed, int(sequence))(_WORLD), scene)


def mount_lidar(vehicle_calib: Calib, T_vehicle_imu, vehicle_poses, T_vehicle_lidar):
    """-> (calib, T_lidar_imu, T_world_lidar poses) for a LiDAR (= base_link) mounted at
    T_vehicle_lidar on a vehicle whose camera calibration (Tr: vehicle reference -> cam0) and
    IMU offset are given. Cameras and IMU keep their place on the vehicle, so the cam0 poses
    Tr · T_odom_base · Tr^-1 are the camera's own motion whatever the mount. The KITTI mount
    (identity) returns the inputs themselves, bit for bit."""
    if np.array_equal(T_vehicle_lidar, np.eye(4)):
        return vehicle_calib, T_vehicle_imu, vehicle_poses
    calib = Calib(P=vehicle_calib.P, Tr=vehicle_calib.Tr @ T_vehicle_lidar)
    return (calib, invert_pose(T_vehicle_lidar) @ T_vehicle_imu,
            vehicle_poses @ T_vehicle_lidar)


def _streams(seed, seq_int):
    """rng(purpose, *more) -> an independent generator per purpose (and frame)."""
    return lambda purpose, *more: np.random.default_rng([seed, seq_int, purpose, *more])


def _drive(rng, frames, trajectory, tr):
    """-> (Trajectory, frame poses T_world_base, frame times, Route, source description)."""
    if trajectory is None:
        times = frame_times(rng(_TIMES), frames)
        traj, route = synthesize_drive(rng(_DRIVE), float(times[-1]) + 1.0)
        return traj, traj.poses(times), times, route, 'synthetic'
    times, poses, times_source = load_kitti_trajectory(trajectory, frames, tr)
    traj = Trajectory(*extend_for_imu(times, poses))
    return traj, poses, times, route_from_poses(poses), f'{trajectory} (times: {times_source})'


def _prepare_outputs(paths: SequencePaths, overwrite, images, scans):
    existing = [p for p in paths.outputs() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f'sequence {paths.sequence} already exists under {paths.root} '
                              f'({existing[0]}); pass overwrite=True (--overwrite) to replace it')
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    wanted = [paths.poses.parent] + [paths.image_dir] * images + [paths.velodyne_dir] * scans
    for d in wanted:
        d.mkdir(parents=True, exist_ok=True)


def _choose_workers(workers, frames, image_size, rays):
    if workers is not None:
        if int(workers) != workers or workers < 1:
            raise ValueError(f'workers must be a positive integer, got {workers!r}')
        return int(workers)
    full = KITTI_SIZE[0] * KITTI_SIZE[1] + 64 * 2000
    work = frames * (image_size[0] * image_size[1] + rays) / full
    return min(2, os.cpu_count() or 1) if work >= _POOL_MIN_FRAMES else 1


def _render_all(ctx: _FrameContext, poses, workers):
    jobs = list(enumerate(poses))
    if workers == 1:
        return [_render_frame(ctx, k, pose) for k, pose in jobs]
    # forkserver/spawn, not fork: the caller may hold threads (torch) that fork would break.
    method = 'forkserver' if 'forkserver' in multiprocessing.get_all_start_methods() else 'spawn'
    mp = multiprocessing.get_context(method)
    with mp.Pool(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
        return pool.starmap(_worker_frame, jobs, chunksize=max(1, len(jobs) // (8 * workers)))


_WORKER_CTX = {}  # per worker process: the context its initializer received


def _init_worker(ctx):
    _WORKER_CTX['ctx'] = ctx


def _worker_frame(k, pose):
    return _render_frame(_WORKER_CTX['ctx'], k, pose)


def _render_frame(ctx: _FrameContext, k, pose) -> dict:
    """Scan and image of frame k at world pose T_world_velo, written to disk; CPU seconds."""
    out = {'points': 0, 'lidar': 0.0, 'camera': 0.0, 'png': 0.0, 'bin': 0.0}
    clock = time.process_time
    if ctx.scans:
        t0 = clock()
        rng = np.random.default_rng([ctx.seed, ctx.seq_int, _SCAN, k])
        points = ctx.lidar.scan(ctx.world, pose, rng)
        t1 = clock()
        write_velodyne(ctx.paths.velodyne_dir / f'{k:06d}.bin', points)
        out.update(points=len(points), lidar=t1 - t0, bin=clock() - t1)
    if ctx.images:
        t0 = clock()
        noise = np.random.default_rng([ctx.seed, ctx.seq_int, _CAMERA, k]) \
            if ctx.camera.noise else None
        rgb, _ = ctx.camera.render(ctx.world, camera_pose(pose, ctx.calib), noise)
        t1 = clock()
        Image.fromarray(rgb).save(ctx.paths.image_dir / f'{k:06d}.png', format='PNG',
                                  compress_level=PNG_COMPRESSION)
        out.update(camera=t1 - t0, png=clock() - t1)
    return out
