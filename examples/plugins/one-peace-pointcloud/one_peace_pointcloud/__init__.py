"""one-peace-pointcloud: point clouds as a one-peace modality (entry point ``pointcloud``)."""

from one_peace_pointcloud.plugin import (
    PointCloudAdapter,
    PointCloudModality,
    PointCloudOptions,
    farthest_point_sample,
    load_points,
)

__all__ = ["PointCloudAdapter", "PointCloudModality", "PointCloudOptions", "farthest_point_sample", "load_points"]
