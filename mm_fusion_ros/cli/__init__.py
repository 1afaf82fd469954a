"""cli layer of mm_fusion_ros."""
