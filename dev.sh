#!/usr/bin/env bash
# The README's two commands, on a fresh machine with Python 3.11:
#   ./dev.sh demo   set everything up, then run the main job on the embedded synthetic world
#   ./dev.sh test   set everything up, then run the linter and the whole test suite
# Setup is a venv (.venv, or $VENV) with requirements.txt and an editable install of the package;
# it is redone only when requirements.txt, setup.py or package.xml change.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

setup() {
  local stamp="$VENV/.mm_fusion_ros_setup"
  if [[ -f "$stamp" && "$stamp" -nt requirements.txt && "$stamp" -nt setup.py \
        && "$stamp" -nt package.xml ]]; then
    return
  fi
  if ! "$PYTHON" -m venv "$VENV"; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv
      "$PYTHON" -m venv "$VENV"
    else
      echo "dev.sh: '$PYTHON -m venv' failed; install python3-venv (Debian) and retry" >&2
      exit 1
    fi
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    --no-build-isolation -e .
  # Node executables into .venv/lib/mm_fusion_ros and share files, where ros2 launch looks.
  "$VENV/bin/python" -m mm_fusion_ros.prefix_install
  touch "$stamp"
}

# DDS traffic of every process we start stays on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_LOCALHOST_ONLY=1
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
export PATH="$PWD/$VENV/bin:$PATH"

case "${1:-}" in
  setup) setup ;;
  demo) setup; shift; exec "$VENV/bin/python" -m mm_fusion_ros.cli.demo "$@" ;;
  test)
    setup; shift
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/python" -m pytest test -q -p no:cacheprovider "$@" ;;
  *) echo "usage: ./dev.sh demo|test|setup" >&2; exit 2 ;;
esac
