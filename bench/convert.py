"""kitti_to_bag speed: a full-size synthetic sequence (1241x376 PNGs, 64-beam ~128k-point scans,
100 Hz OXTS) converted to raw and png images, mcap and sqlite3, against a plain copy of the same
source files (shutil.copytree of the sequence's image_2/, velodyne/, oxts/ and text files) in the
same run, on the same file system.

    python bench/convert.py [--frames 200] [--repeats 3] [--data_path DIR] [--work_dir DIR]

MB/s is source megabytes (the files a conversion reads) per wall second, for the copy and every
conversion alike, so the ratio compares the same work; the bag's own size and write rate are
printed beside it. Each measurement starts after os.sync() (so one run's write-back does not
slow the next), measurements are interleaved, and the median of --repeats runs is reported.
Target: mcap raw >= 50% of the copy's MB/s.
"""
import argparse
import os
from pathlib import Path
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_fusion_ros.bag.writer import convert_sequence, ConvertOptions  # noqa: E402
from mm_fusion_ros.kitti.odometry import KittiSequence  # noqa: E402
from mm_fusion_ros.synthetic.writer import generate_sequence  # noqa: E402

TARGET_RATIO = 0.5
CASES = (('mcap', 'raw'), ('mcap', 'png'), ('sqlite3', 'raw'), ('sqlite3', 'png'))


def source_files(seq: KittiSequence, frames: int):
    """Every file a conversion of frames 0..frames-1 reads, relative to the data root."""
    files = [seq.times_path, seq.calib_path, seq.poses_path,
             seq.seq_dir / 'calib_imu_to_velo.txt']
    files += [seq.image_path(k) for k in range(frames)]
    files += [seq.scan_path(k) for k in range(frames)]
    files += sorted((seq.seq_dir / 'oxts').rglob('*.txt'))
    return files


def copy_sources(seq: KittiSequence, files, dest: Path):
    """The baseline: shutil.copytree of the sequence's folders, limited to the source files."""
    wanted = {str(f) for f in files}

    def unwanted(folder, names):
        return [n for n in names
                if (Path(folder) / n).is_file() and str(Path(folder) / n) not in wanted]

    for i, folder in enumerate((seq.seq_dir, seq.velodyne_dir, seq.poses_path.parent)):
        shutil.copytree(folder, dest / f'{i}_{folder.name}', ignore=unwanted)


def timed(fn, out: Path):
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    fn(out)
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob('*') if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--frames', type=int, default=200, help='frames to generate and convert')
    p.add_argument('--repeats', type=int, default=3, help='runs per measurement (median)')
    p.add_argument('--data_path', type=Path, default=None,
                   help='reuse a synthetic KITTI root with sequence 00 (skips generation)')
    p.add_argument('--work_dir', type=Path, default=None,
                   help='where data, copies and bags go (default: a temporary folder)')
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix='bench_convert_', dir=args.work_dir))
    try:
        data = args.data_path
        if data is None:
            data = work / 'data'
            t0 = time.perf_counter()
            generate_sequence(data, '00', args.frames, seed=0)
            print(f'generated {args.frames} full-size frames in {time.perf_counter() - t0:.1f} s')
        seq = KittiSequence(data, '00')
        frames = min(args.frames, len(seq))
        files = source_files(seq, frames)
        src_mb = sum(f.stat().st_size for f in files) / 1e6
        for f in files:                       # warm the page cache for every contender
            f.read_bytes()
        print(f'source: {frames} frames, {len(files)} files, {src_mb:.1f} MB')

        contenders = {'copy': lambda out: copy_sources(seq, files, out)}
        for storage, fmt in CASES:
            contenders[f'{storage} {fmt}'] = (
                lambda out, storage=storage, fmt=fmt: convert_sequence(ConvertOptions(
                    data_path=data, sequence='00', output=out, storage=storage,
                    image_format=fmt, end=frames)))
        times = {name: [] for name in contenders}
        sizes = {}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                out = work / name.replace(' ', '_')
                times[name].append(timed(fn, out))
                sizes[name] = folder_bytes(out) / 1e6
                shutil.rmtree(out)
        report(times, sizes, src_mb, frames)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(times, sizes, src_mb, frames):
    copy_rate = src_mb / statistics.median(times['copy'])
    print(f'\n{"":<14}{"median s":>9}{"frames/s":>10}{"src MB/s":>10}{"vs copy":>9}'
          f'{"out MB":>9}{"out MB/s":>10}   runs [s]')
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f'{name:<14}{t:>9.2f}{frames / t:>10.1f}{src_mb / t:>10.1f}'
              f'{src_mb / t / copy_rate:>8.0%} {sizes[name]:>9.1f}{sizes[name] / t:>10.1f}   '
              + ' '.join(f'{x:.2f}' for x in ts))
    ratio = src_mb / statistics.median(times['mcap raw']) / copy_rate
    verdict = 'meets' if ratio >= TARGET_RATIO else 'misses'
    print(f'\nmcap raw runs at {ratio:.0%} of the MB/s of the copy: {verdict} the '
          f'{TARGET_RATIO:.0%} target')


if __name__ == '__main__':
    sys.exit(main())
