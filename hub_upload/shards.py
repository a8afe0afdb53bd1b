"""Which safetensors files hold a checkpoint directory's weights: the one reader of shard indices, for the converters
and the upload check."""

import json
from pathlib import Path

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def read_shard_index(index: str | Path) -> list[str]:
    """The shard file names a `model.safetensors.index.json` names (sorted, unique); a `ValueError` says what is
    wrong with an unreadable index or one without a `weight_map` of tensor names to files."""
    index = Path(index)
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{index.name} is not valid JSON ({error}).") from error
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index.name} has no 'weight_map' object mapping tensor names to shard files.")
    return sorted(set(weight_map.values()))


def safetensors_files(directory: str | Path) -> list[str]:
    """The weight files of a checkpoint directory, relative to it: the shards of its index when it has one, else
    `model.safetensors`; `[]` when it has neither. Shards named by the index are not checked for existence here."""
    directory = Path(directory)
    if (directory / SHARD_INDEX).is_file():
        return read_shard_index(directory / SHARD_INDEX)
    return [SINGLE_FILE] if (directory / SINGLE_FILE).is_file() else []
