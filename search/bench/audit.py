"""What the search benchmarks share: the audit split, held out of every sweep's reach, and the
results kept as they are measured, so that a benchmark of many hours can stop and go on.

A pipeline is judged by the model it leads to, scored on images it never saw: 5,000 of the
training images (the audit split), the same for every pipeline and seed. The maximum of many noisy
validation figures is biased upward, the more so the more configs a sweep tries, so a sweep's own
best validation accuracy cannot judge it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from search.storage import StoredFile
from trainables.config import DataSettings
from trainables.data import LabeledImages, list_images, load_images, stratified_split

AUDIT_IMAGES = 5000  # the default of --audit-images
AUDIT_SEED = 20261127  # the audit split is the same for every pipeline and seed


def hold_out_audit(data: DataSettings, audit_images: int, links: Path) -> tuple[LabeledImages, Path]:
    """The audit images (in memory), and a folder of links: train/ all the other training images,
    for the sweeps, and test/ the audit images, so a retrain or a registered model is tested on them."""
    images = load_images(data, "train")  # the same files, in the same order, as list_images gives
    audit_index, _ = stratified_split(images.labels, audit_images, AUDIT_SEED)
    audited = set(audit_index.tolist())
    folder = links / "images"
    for index, (_, path) in enumerate(list_images(Path(data.source) / "train").files):
        target = folder / ("test" if index in audited else "train") / Path(path).parent.name / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    audit = LabeledImages(images.images[audit_index], images.labels[audit_index], images.classes, "audit")
    print(
        f"Audit split: {len(audit.labels)} images held out; sweeps see the other {len(images) - len(audit)}"
    )
    return audit, folder


class KeptResults:
    """The results measured so far under one set of conditions, kept in a JSON file as each comes.

    A later run under the same conditions reuses them instead of measuring again; under other
    conditions (other code defaults, ranges or data) the file is not reused. Delete it to start over.
    """

    def __init__(self, path: Path, conditions: dict[str, Any]) -> None:
        self.file = StoredFile(str(path))
        self.conditions = json.loads(json.dumps(conditions))  # as it reads back from the file
        self.results: list[dict[str, Any]] = []
        if self.file.exists():
            kept = json.loads(self.file.read_text())
            if kept.get("conditions") == self.conditions:
                self.results = kept["results"]
                print(f"Reusing {len(self.results)} results measured before, from {path}")
            else:
                print(f"Not reusing {path}: it was measured under other conditions")

    def find(self, **keys: Any) -> dict[str, Any] | None:
        """The result whose fields have these values, if one was kept."""
        return next((r for r in self.results if all(r.get(k) == v for k, v in keys.items())), None)

    def add(self, result: dict[str, Any]) -> None:
        self.results.append(json.loads(json.dumps(result)))
        # Atomically: a stop while writing leaves the last good file.
        self.file.write_text_atomically(
            json.dumps({"conditions": self.conditions, "results": self.results}, indent=2)
        )
