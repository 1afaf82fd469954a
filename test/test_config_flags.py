"""Command-line flags generated from the dataclass configs (mm_fusion_ros.config.ConfigFlags):
each setting's default and help are written once, in its dataclass field."""
import argparse
import dataclasses
from dataclasses import dataclass, field
import subprocess
import sys

import pytest

from mm_fusion_ros.cli import predict_odometry
from mm_fusion_ros.config import ConfigBase, ConfigFlags, parameter_help, SampleConfig
from mm_fusion_ros.filter.config import FilterRunConfig
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.training import offline
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.online import ONLINE_TRAIN_DEFAULTS

REQUIRED = ['--data_path', 'data', '--train_sequences', '0']


@dataclass(frozen=True)
class Later(ConfigBase):
    """Stands for a config that gains fields after the CLI was written."""

    rate: float = field(default=2.5, metadata={'help': 'a rate [Hz]'})
    mode: str = field(default='gt', metadata={'help': 'gt | self | both'})
    steps: int = field(default=3, metadata={'help': 'steps per sample'})
    widths: tuple = field(default=(4, 8), metadata={'help': 'layer widths'})
    names: tuple = field(default=('a', 'b'), metadata={'help': 'names used'})
    strict: bool = field(default=False, metadata={'help': 'fail on a gap'})
    smooth: bool = field(default=True, metadata={'help': 'smooth the output'})

    def __post_init__(self):
        if self.rate <= 0:
            raise ValueError(f'Later.rate must be > 0, got {self.rate}')


def _actions(parser):
    return {a.dest: a for a in parser._actions}


def _parse(flags, argv):
    parser = argparse.ArgumentParser()
    flags.add(parser)
    return parser, parser.parse_args(argv)


def test_a_new_field_becomes_a_flag_with_its_help_and_default():
    parser, args = _parse(ConfigFlags(Later), [])
    actions = _actions(parser)
    for f in dataclasses.fields(Later):
        assert actions[f.name].option_strings == [f'--{f.name}']
        assert actions[f.name].help.startswith(f.metadata['help'])
    assert 'default: 2.5' in actions['rate'].help and 'default: 4,8' in actions['widths'].help
    assert ConfigFlags(Later).build(args) == Later()


def test_flag_kinds_and_values():
    flags = ConfigFlags(Later)
    _, args = _parse(flags, ['--rate', '10', '--mode', 'self', '--steps', '7', '--widths',
                             '16, 32,64', '--names', 'x', '--strict', '--smooth', 'off'])
    assert flags.build(args) == Later(rate=10.0, mode='self', steps=7, widths=(16, 32, 64),
                                      names=('x',), strict=True, smooth=False)
    for argv in (['--steps', '1.5'], ['--smooth', 'maybe'], ['--widths', '4,x'],
                 ['--strict', '1']):
        with pytest.raises(SystemExit):
            _parse(flags, argv)


def test_range_checks_stay_in_the_dataclass():
    flags = ConfigFlags(Later)
    _, args = _parse(flags, ['--rate', '-1'])
    with pytest.raises(ValueError, match='Later.rate must be > 0'):
        flags.build(args)


def test_prefix_aliases_exclude_and_unset():
    flags = ConfigFlags(Later, prefix='later_', exclude=('names',), aliases={'rate': 'hz'},
                        unset=('steps', 'smooth'), unset_help='default: {default}, or saved')
    parser, args = _parse(flags, ['--later_hz', '4'])
    actions = _actions(parser)
    assert actions['later_rate'].option_strings == ['--later_rate', '--later_hz']
    assert 'later_names' not in actions and 'names' not in actions
    assert 'default: 3, or saved' in actions['later_steps'].help
    assert flags.values(args) == {'rate': 4.0, 'mode': 'gt', 'widths': (4, 8), 'strict': False}
    _, args = _parse(flags, ['--later_steps', '5', '--later_smooth', 'on'])
    assert flags.values(args)['steps'] == 5 and flags.values(args)['smooth'] is True
    assert flags.build(args, names=('z',)) == Later(steps=5, names=('z',))
    with pytest.raises(ValueError, match=r"no fields \['nope'\]"):
        ConfigFlags(Later, exclude=('nope',))


def test_repeatable_tuple_flag():
    flags = ConfigFlags(Later, repeat=('names',), types={'names': str.upper})
    parser, args = _parse(flags, ['--names', 'x', '--names', 'y'])
    assert flags.build(args).names == ('X', 'Y')
    assert 'repeatable' in _actions(parser)['names'].help
    _, args = _parse(flags, [])
    assert flags.build(args).names == ('a', 'b')    # not given: the field's default
    with pytest.raises(ValueError, match='only a tuple field can repeat'):
        ConfigFlags(Later, repeat=('rate',))


def test_predict_odometry_filter_flags_are_the_dataclass_fields():
    parser = predict_odometry.build_parser()
    required = ['--checkpoint', 'c.pth', '--data_path', 'd', '--sequences', '7', '--out_dir', 'o']
    assert predict_odometry.FILTER_FLAGS.build(parser.parse_args(required)) == FilterRunConfig()
    args = parser.parse_args(required + ['--filter', 'on', '--filter_checkpoint', 'f.pth',
                                         '--relpose_var_scale', '4', '--outage', '20:20',
                                         '--outage', '60.5:2'])
    run = predict_odometry.FILTER_FLAGS.build(args)
    assert run == FilterRunConfig(filter='on', filter_checkpoint='f.pth', relpose_var_scale=4.0,
                                  outage=('20:20', '60.5:2'))
    assert run.enabled and run.outage_windows == [(20.0, 20.0), (60.5, 2.0)]


@pytest.mark.parametrize('cls, flags', [(TrainConfig, offline.TRAIN_FLAGS),
                                        (ModelConfig, offline.MODEL_FLAGS),
                                        (SampleConfig, offline.SAMPLE_FLAGS)])
def test_train_multimodal_has_a_flag_for_every_config_field(cls, flags):
    """A field added to one of these configs later gets its flag with no CLI edit."""
    actions = _actions(offline.build_parser())
    excluded = {'image_height', 'image_width', 'imu_steps', 'seed'} if cls is SampleConfig \
        else set()
    for f in dataclasses.fields(cls):
        if f.name in excluded:
            continue
        assert f'--{f.name}' in actions[f.name].option_strings, f.name
        assert actions[f.name].help.startswith(f.metadata['help']), f.name


def test_train_multimodal_defaults_are_the_dataclass_defaults():
    args = offline.build_parser().parse_args(REQUIRED)
    assert offline.TRAIN_FLAGS.build(args) == TrainConfig()
    assert offline.MODEL_FLAGS.values(args) == {}   # unset: a checkpoint's model wins
    assert offline.resolve_model_config(args, None, None) == ModelConfig()
    sample = offline.sample_config(args, ModelConfig(), TrainConfig())
    assert sample == SampleConfig()


def test_train_multimodal_keeps_the_plan_and_documented_flag_names():
    args = offline.build_parser().parse_args(REQUIRED + [
        '--learning_rate', '5e-5', '--num_epochs', '5', '--freeze_visual', '--batch_size', '4',
        '--max_points', '1024', '--aug_point_jitter', '0.02', '--aug_yaw_deg', '5',
        '--calibrate_logvar', 'off', '--aug_yaw_prob', '0.25', '--modalities', 'imu,lidar',
        '--imu_window_s', '1.0', '--seed', '7', '--amp',
        '--visual_encoder', 'real', '--point_encoder', 'dummy', '--shift_prior', 'off',
        '--bev_cells', '64', '--bev_channels', '8,16,32'])
    train = offline.TRAIN_FLAGS.build(args)
    assert train == TrainConfig(learning_rate=5e-5, num_epochs=5, freeze_visual=True,
                                batch_size=4, aug_point_jitter_m=0.02, aug_yaw_max_deg=5.0,
                                calibrate_logvar=False, aug_yaw_prob=0.25, seed=7, amp=True)
    assert offline.MODEL_FLAGS.values(args) == {
        'visual_encoder': 'flow', 'point_encoder': 'dummy', 'shift_prior': False,
        'bev_cells': 64, 'bev_channels': (8, 16, 32)}
    sample = offline.sample_config(args, ModelConfig(image_height=32), train)
    assert sample == SampleConfig(image_height=32, max_points=1024, modalities=('lidar', 'imu'),
                                  imu_window_s=1.0, seed=7)
    args = offline.build_parser().parse_args(REQUIRED + ['--aug_yaw_max_deg', '3'])
    assert offline.TRAIN_FLAGS.build(args).aug_yaw_max_deg == 3.0


def test_finetuning_refuses_model_flags_that_disagree_with_the_checkpoint():
    ckpt = {'config': {'model': ModelConfig(bev_cells=64).to_dict()}}
    args = offline.build_parser().parse_args(REQUIRED + ['--bev_cells', '64'])
    assert offline.resolve_model_config(args, ckpt, 'x.pth') == ModelConfig(bev_cells=64)
    args = offline.build_parser().parse_args(REQUIRED + ['--bev_cells', '32',
                                                         '--shift_prior', 'off'])
    with pytest.raises(ValueError, match=r'x.pth: .*--bev_cells 32 .*--shift_prior False'):
        offline.resolve_model_config(args, ckpt, 'x.pth')


def test_predict_odometry_sample_flags_default_to_the_checkpoint():
    parser = predict_odometry.build_parser()
    required = ['--checkpoint', 'c.pth', '--data_path', 'd', '--sequences', '7', '--out_dir', 'o']
    assert predict_odometry.SAMPLE_FLAGS.values(parser.parse_args(required)) == {}
    args = parser.parse_args(required + ['--modalities', 'imu', '--max_points', '64'])
    saved = SampleConfig(imu_window_s=0.5)
    assert saved.replace(**predict_odometry.SAMPLE_FLAGS.values(args)) == SampleConfig(
        imu_window_s=0.5, modalities=('imu',), max_points=64)


def test_online_node_declares_self_supervision_offline_stays_gt():
    """One override table (training/online.py ONLINE_TRAIN_DEFAULTS) sets the node's default;
    its --help shows that default, the offline flag keeps TrainConfig's."""
    assert ONLINE_TRAIN_DEFAULTS == {'supervision': 'self'}
    assert TrainConfig().supervision == 'gt'
    assert offline.TRAIN_FLAGS.build(offline.build_parser().parse_args(REQUIRED)).supervision \
        == 'gt'
    lines = parameter_help([(TrainConfig, 'train.', ONLINE_TRAIN_DEFAULTS)]).splitlines()
    assert [line for line in lines if 'train.supervision' in line][0].startswith(
        '  train.supervision (self): ')
    assert '  train.learning_rate (0.0001): ' in '\n'.join(lines)   # others: the dataclass's
    shown = subprocess.run([sys.executable, '-m', 'mm_fusion_ros.ros.online', '--help'],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert '  train.supervision (self): ' in shown.stdout
