"""Pure cores of the online processes (no rclpy): supervised worker threads, sample dispatch
and idle flush, diagnostics, path throttling, run-time parameter updates and process tuning.
The ROS nodes in mm_fusion_ros/ros are thin shells over these."""
