"""Arrow schemas of every stage's Parquet: the one place the columns are defined.

Curation writes `SAMPLE_SCHEMA` shards (plus `REJECTED_SCHEMA` for what it drops); training reads
them. A change of columns bumps `SCHEMA_VERSION`, which the curation manifest records and the
training job checks, so a reader never guesses at an old layout.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: doc_lengths (per-document attention and positions in packed rows)

# One fixed-length training sample: one document or several packed ones.
# images[i] belongs to the blocks at image_slots[i] (first <im_patch> slot of its comprehension
# block, -1 if it has none) and dream_slots[i] (first query slot of its dream block, -1 if none).
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
        pa.field("doc_lengths", pa.list_(pa.int32()), nullable=False),  # one per doc_ids entry
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),  # before padding
        pa.field("images", pa.list_(pa.binary()), nullable=False),  # PNG at ModelConfig.image_resolution
        pa.field("image_slots", pa.list_(pa.int32()), nullable=False),
        pa.field("dream_slots", pa.list_(pa.int32()), nullable=False),
    ],
    metadata={"dreamcore.schema_version": SCHEMA_VERSION, "dreamcore.kind": "sample"},
)

# ----------------------------------------------------------------------------------------------
# Curation (pipelines/curate): the document row that flows read -> crawl -> filter -> tokenize,
# and the rejected rows written to DIR/rejected/. Dropped documents and images stay in the row
# with the stage and reason that dropped them, so every count in the manifest comes from rows.

CURATE_IMAGE_TYPE = pa.struct(
    [
        pa.field("url", pa.string()),
        pa.field("matched_text_index", pa.int32()),
        pa.field("matched_sim", pa.float32()),
        pa.field("face_count", pa.int32()),  # faces the source detected (MMC4 face_detections); -1: unknown
        pa.field("drop_stage", pa.string()),  # "" while kept
        pa.field("reason", pa.string()),  # "" while kept; a short reason name otherwise
        pa.field("error", pa.string()),  # human-readable detail behind the reason
        pa.field("http_status", pa.int32()),
        pa.field("sha256", pa.string()),  # of the downloaded bytes (img2dataset does the same)
        pa.field("phash", pa.string()),  # perceptual hash (hex) of the stored image
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("num_bytes", pa.int64()),  # downloaded size
        pa.field("data", pa.binary()),  # stored image (PNG at the configured resolution)
        # Where the crawl gets the bytes: "web" fetches `url`; "embedded": `data` holds the source
        # bytes (img2dataset shards); "dataset": `url` is a file of the dataset's own storage
        # (instruction data), read there, never fetched and never taken from a web document.
        pa.field("source", pa.string()),
    ]
)

CURATE_DOC_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),  # "<shard name>:<line or row>"
        pa.field("shard", pa.string(), nullable=False),  # input shard path or URI
        pa.field("url", pa.string()),
        pa.field("texts", pa.list_(pa.string())),
        pa.field("similarity", pa.list_(pa.list_(pa.float32()))),  # images x sentences; [] if none
        pa.field("drop_stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("error", pa.string()),
        pa.field("images", pa.list_(CURATE_IMAGE_TYPE)),
        # Conversations (instruction data): the role of each `texts` entry ("system", "user",
        # "assistant"); [] for documents. The tokenizer's chat layout trains on assistant turns only.
        pa.field("roles", pa.list_(pa.string())),
    ],
    metadata={"dreamcore.schema_version": SCHEMA_VERSION, "dreamcore.kind": "curate_document"},
)

# One row per dropped document or image (image_index -1: the row is a document).
REJECTED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("image_index", pa.int32(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ],
    metadata={"dreamcore.schema_version": SCHEMA_VERSION, "dreamcore.kind": "rejected"},
)

# A curation document after the tokenize stage's encode step (in memory between Ray Data steps,
# never a published file): the layout of the document, whose images are `enc_images` (indices
# into `images`), ready to be packed into SAMPLE_SCHEMA rows.
CURATE_ENCODED_SCHEMA = pa.schema(
    list(CURATE_DOC_SCHEMA)
    + [
        pa.field("enc_input_ids", pa.list_(pa.int32())),
        pa.field("enc_labels", pa.list_(pa.int32())),
        pa.field("enc_image_slots", pa.list_(pa.int32())),
        pa.field("enc_dream_slots", pa.list_(pa.int32())),
        pa.field("enc_images", pa.list_(pa.int32())),
    ],
    metadata={"dreamcore.schema_version": SCHEMA_VERSION, "dreamcore.kind": "curate_encoded"},
)


# ----------------------------------------------------------------------------------------------
# Offline batch generation (pipelines/generate): the documents it writes, and the rows between rounds

GENERATED_SCHEMA_VERSION = 1
GENERATED_PART = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", pa.binary()), ("seed", pa.int64())])
GENERATED_DOCUMENT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("line", pa.int64()),  # 1-based line of the input file
    ("prompt", pa.list_(GENERATED_PART)),  # the prompt's text and image parts, in order
    ("parts", pa.list_(GENERATED_PART)),  # generated text chunks and PNG images, in order (image seed per image)
    ("finish_reason", pa.string()),  # "eos" | "length"
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("images", pa.int64()),
    ("seed", pa.int64()),
    ("params", pa.string()),  # the GenerationParams as JSON: rerun one line with generate_document
])
# Rows between the rounds: the Document in flight, and why it stopped when the engine refused it.
GENERATION_STATE_SCHEMA = pa.schema([("id", pa.string()), ("line", pa.int64()), ("state", pa.binary()),
                          ("reason", pa.string()), ("error", pa.string())])
