"""Real labelled data: ImageFolder classification, COCO / YOLO-label detection, and calibration sets.

Every loader returns tensors in the model's normalized input space (``LoadedModel.spec``) and raises
:class:`DatasetError` (a ``ValueError``) with a one-line message on bad input.
"""

from dgh.data.calibration import load_calibration_set, noise_images, validate_calibration_images
from dgh.data.classification import (
    ImageFolderDataset,
    balanced_subset,
    is_image_folder,
    scan_image_folder,
)
from dgh.data.detection import (
    COCO80_TO_91,
    DetectionData,
    LetterboxDataset,
    load_detection_data,
    map_classes_to_categories,
    yolo_labels_to_coco,
)
from dgh.data.images import DatasetError, LetterboxInfo, letterbox

__all__ = [
    "COCO80_TO_91",
    "DatasetError",
    "DetectionData",
    "ImageFolderDataset",
    "LetterboxDataset",
    "LetterboxInfo",
    "balanced_subset",
    "is_image_folder",
    "letterbox",
    "load_calibration_set",
    "load_detection_data",
    "map_classes_to_categories",
    "noise_images",
    "scan_image_folder",
    "validate_calibration_images",
    "yolo_labels_to_coco",
]
