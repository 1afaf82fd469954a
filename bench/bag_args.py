"""The synthetic bag's command-line flags, shared by the online benches (bench/online.py's
prepare_bag builds the bag they name). Standard library only, so a bench can parse its flags
before it chooses which mm_fusion_ros tree to import (bench/profile_online.py --src)."""
from pathlib import Path


def add_bag_arguments(p, frames: int = 150):
    p.add_argument('--frames', type=int, default=frames, help='scans in the synthetic sequence')
    p.add_argument('--image_size', type=int, nargs=2, default=[1241, 376],
                   metavar=('WIDTH', 'HEIGHT'), help='camera images (default: KITTI size)')
    p.add_argument('--azimuth_steps', type=int, default=2000,
                   help='LiDAR columns per scan (64 beams; 2000 ~ 128k points, as KITTI)')
    p.add_argument('--work_dir', type=Path, default=None,
                   help='keeps the sequence and bag between runs (default: a temporary folder)')
