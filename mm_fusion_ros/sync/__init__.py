"""sync layer of mm_fusion_ros."""
