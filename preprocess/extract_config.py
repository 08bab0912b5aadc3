"""The extract job's config (``ExtractConfig``, ``configs/preprocess/*.yaml``), without torch.

Kept apart from the extractor (``preprocess.extract``) so that ``python -m preprocess extract``
checks a config, and reports a mistake, before torch, torchvision and webdataset are imported.
docs/preprocess.md lists every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from preprocess.detector_config import DetectorConfig

if TYPE_CHECKING:
    from preprocess.raw_input import SampleRules


@dataclass
class ExtractConfig:
    """The whole extract job (``configs/preprocess/*.yaml``); see docs/preprocess.md for every key."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    batch_size: int = 8  # images per detector forward pass (batches never span two shards)
    num_workers: int = 2  # decode processes (DataLoader workers); 0 decodes in the main process
    prefetch_batches: int = 2  # batches each worker decodes ahead
    write_queue_batches: int = 4  # detected batches waiting for the writer thread
    torch_threads: int = 0  # intra-op threads of the detector process; 0 keeps torch's default
    max_image_pixels: int = 100_000_000  # larger images are skipped (image_too_large); 10000x10000 passes
    downscale_in_workers: bool = True  # shrink images to the detector's input size while decoding
    caption_min_chars: int = 1  # shorter captions (after stripping whitespace) are skipped (empty_caption)
    caption_max_chars: int = 1000  # longer captions are cut to this many characters
    boxes_field: str = "boxes"  # given_boxes: JSON field with [[x1, y1, x2, y2], ...] in pixels
    labels_field: str = "labels"  # given_boxes: JSON field with one class id or name per box
    progress: bool = True  # tqdm bar on rank 0
    # Seeds torch before the detector is built: without weights the network is randomly
    # initialised, and every worker and every rerun must build the SAME random network.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "prefetch_batches", "write_queue_batches", "max_image_pixels", "caption_max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "torch_threads", "caption_min_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.caption_min_chars > self.caption_max_chars:
            raise ValueError(
                f"caption_min_chars ({self.caption_min_chars}) must not exceed caption_max_chars ({self.caption_max_chars})"
            )
        if not self.boxes_field or not self.labels_field:
            raise ValueError("boxes_field and labels_field must be non-empty JSON field names")

    def sample_rules(self) -> SampleRules:
        from preprocess.raw_input import SampleRules  # torch and webdataset: imported where samples are read

        d = self.detector
        return SampleRules(
            max_image_pixels=self.max_image_pixels,
            min_size=d.min_size,
            max_size=d.max_size,
            downscale=self.downscale_in_workers,
            caption_min_chars=self.caption_min_chars,
            caption_max_chars=self.caption_max_chars,
            given_boxes=d.backend == "given_boxes",
            max_boxes=d.max_boxes,
            boxes_field=self.boxes_field,
            labels_field=self.labels_field,
            class_names=list(d.class_names),
        )
