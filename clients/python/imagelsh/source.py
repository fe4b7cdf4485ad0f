"""What `ingest_folder` reads: every image file under a folder, with the same ids, labels and
metadata as `imagelsh ingest FOLDER`, so that either client resumes the other's job."""
import os
from dataclasses import dataclass
from typing import Dict, List

# The metadata key naming where an item came from (as the Rust client and the web page use it).
SOURCE_KEY = "source"
# Files a folder source takes, by extension (what the server decodes).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})


@dataclass(frozen=True)
class PlannedItem:
    id: str
    label: str
    metadata: Dict[str, str]
    path: str


def plan_folder(root: str) -> List[PlannedItem]:
    """Every image file under `root`, recursively and sorted; the id is the path below `root`
    ('/'-separated), the label the first folder below `root` (empty for files directly in it),
    and metadata["source"] the file's path."""
    if not os.path.isdir(root):
        raise NotADirectoryError(root)
    items = []
    for folder, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            path = os.path.join(folder, name)
            if extension not in IMAGE_EXTENSIONS or not os.path.isfile(path):
                continue
            parts = os.path.relpath(path, root).split(os.sep)
            label = parts[0] if len(parts) > 1 else ""
            items.append(PlannedItem("/".join(parts), label, {SOURCE_KEY: path}, path))
    # By path components, as the Rust client orders them (not os.walk's order).
    items.sort(key=lambda item: item.id.split("/"))
    return items
