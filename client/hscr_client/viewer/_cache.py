"""Keep recently viewed datasets in memory for the service, re-read when their files change."""

from __future__ import annotations

import threading
from collections import OrderedDict

from .. import schema
from ..storage import Location, open_location
from ._dataset import ViewerDataset


def fingerprint(location: Location) -> tuple:
    """Path, size and modification time of every file the viewer reads: changes when a shard lands."""
    from pyarrow import fs as pafs

    infos = [location.fs.get_file_info(location.path(name)) for name in (schema.MANIFEST, schema.ERRORS)]
    for folder in (schema.RANKED, "_errors"):
        infos += location.fs.get_file_info(pafs.FileSelector(location.path(folder), allow_not_found=True))
    return tuple(sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File))


class DatasetCache:
    """At most ``maxsize`` :class:`ViewerDataset` objects, least recently used dropped first.

    ``get`` costs one listing of the dataset's folders when the dataset is unchanged, so a page
    request never re-reads 10,000 rows of text.
    """

    def __init__(self, maxsize: int = 4):
        self.maxsize = maxsize
        self._entries: OrderedDict[str, tuple[tuple, ViewerDataset]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, uri: str, *, allow_empty: bool = False) -> ViewerDataset:
        location = open_location(uri)
        key = fingerprint(location)
        with self._lock:
            entry = self._entries.get(uri)
            if entry is not None and entry[0] == key:
                self._entries.move_to_end(uri)
                return entry[1]
        dataset = ViewerDataset.open(location, allow_empty=allow_empty)
        with self._lock:
            self._entries[uri] = (key, dataset)
            self._entries.move_to_end(uri)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return dataset
