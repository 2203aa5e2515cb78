"""Data pipeline: sources → tokenizer → token shards → pure mixture sampler → packed batches.

Public API:

* `build_dataset(BuildOptions)`: build a data directory (also `moe-train data build`).
* `validate_data(cfg)`: check data.* against the directory before training; raises DataError.
* `build_train_source(cfg) -> TrainSource` with `get_batch(sample_indices) -> Batch`.
* `build_val_batches(cfg) -> dict[domain, list[Batch]]`.
* `IndexedDataset`, `IndexedWriter`, `TokenStream`: Megatron indexed-dataset shards and a domain's stream.
* `TrainData` (moe_train.data.loader): sampler + policy + prefetch + ledger, what the trainer uses.
"""

from moe_train.data.build import BuildOptions, build_dataset
from moe_train.data.errors import DataError
from moe_train.data.inputs import hf_documents, input_source
from moe_train.data.shards import IndexedDataset, IndexedWriter, TokenStream
from moe_train.data.source import (
    Batch,
    MockSource,
    ShardSource,
    TrainSource,
    build_train_source,
    build_val_batches,
)
from moe_train.data.validate import validate_data

__all__ = [
    "Batch",
    "BuildOptions",
    "DataError",
    "MockSource",
    "ShardSource",
    "IndexedDataset",
    "IndexedWriter",
    "TokenStream",
    "TrainSource",
    "build_dataset",
    "build_train_source",
    "build_val_batches",
    "hf_documents",
    "input_source",
    "validate_data",
]
