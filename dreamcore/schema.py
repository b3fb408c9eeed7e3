"""Arrow schemas of every stage's Parquet: the one place the columns are defined.

Curation writes `SAMPLE_SCHEMA` shards (plus `REJECTED_SCHEMA` for what it drops); training reads
them. A change of columns bumps `SCHEMA_VERSION`, which the curation manifest records and the
training job checks, so a reader never guesses at an old layout.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

# One fixed-length training sample: one document or several packed ones.
# images[i] belongs to the blocks at image_slots[i] (first <im_patch> slot of its comprehension
# block, -1 if it has none) and dream_slots[i] (first query slot of its dream block, -1 if none).
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),  # before padding
        pa.field("images", pa.list_(pa.binary()), nullable=False),  # PNG at ModelConfig.image_resolution
        pa.field("image_slots", pa.list_(pa.int32()), nullable=False),
        pa.field("dream_slots", pa.list_(pa.int32()), nullable=False),
    ],
    metadata={"dreamcore.schema_version": SCHEMA_VERSION, "dreamcore.kind": "sample"},
)
