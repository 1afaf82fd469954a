#!/usr/bin/env python3
"""Train or fine-tune the multimodal odometry model; see mm_fusion_ros/training/offline.py."""
from mm_fusion_ros.training.offline import main

raise SystemExit(main())
