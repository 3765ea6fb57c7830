"""Data: read files, map labels, split, tokenise and batch. Knows nothing of models or training."""

from lmtune.data.batching import Encoded, LengthGroupedSampler, collate, encode, restore_order
from lmtune.data.labels import LabelMap
from lmtune.data.reading import Table, read_table
from lmtune.data.split import DataBundle, load_data, stratified_sample, stratified_split

__all__ = [
    "DataBundle",
    "Encoded",
    "LabelMap",
    "LengthGroupedSampler",
    "Table",
    "collate",
    "encode",
    "load_data",
    "read_table",
    "restore_order",
    "stratified_sample",
    "stratified_split",
]
