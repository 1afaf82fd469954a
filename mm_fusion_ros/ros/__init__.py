"""ros layer of mm_fusion_ros."""
