"""synthetic layer of mm_fusion_ros."""
