"""The exceptions mlx_gemma raises for bad input.

Every error a user can cause (a malformed file, an unknown architecture, a bad
generation setting) is one of these types, and its message names the file and
the problem.  Catch `MlxGemmaError` to catch them all.  They also derive from
`ValueError`, so callers that already catch that keep working.
"""

from __future__ import annotations

import os


class MlxGemmaError(ValueError):
    """Base class of every error mlx_gemma raises on purpose."""


class ModelFileError(MlxGemmaError):
    """A file on disk is missing, malformed, truncated or not what it claims.

    `path` is the offending file (or folder); the message starts with it.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(ModelFileError):
    """`config.json` is missing, unreadable, or holds impossible values."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture (model_type / Keras class) is not one we support."""


class UnsafeCheckpointError(ModelFileError):
    """The checkpoint asks us to run code (pickles, `auto_map`, `model_file`): refused."""


class WeightsMismatchError(ModelFileError):
    """Weights are missing, unexpected or of the wrong shape for the config."""


class TokenizerError(ModelFileError):
    """The tokenizer file is missing, corrupt or does not fit the model."""


class ImageError(ModelFileError):
    """An image is unreadable, empty, or too large to decode safely."""


class AudioError(ModelFileError):
    """An audio clip is unreadable, empty, not finite, or too long to decode safely."""


class GenerationError(MlxGemmaError):
    """Generation was asked for something impossible (bad settings, NaN logits, ...)."""


class AdapterError(ModelFileError):
    """An adapter folder is malformed or was trained for another model (shape, rank, layers)."""


class DatasetError(ModelFileError):
    """A training data file is missing, empty or holds a malformed example (the message names file and line)."""


class TrainingError(MlxGemmaError):
    """Training was asked for something impossible (bad settings, an unknown optimizer, ...)."""


class PromptCacheError(ModelFileError):
    """A prompt-cache file is not ours, is malformed, or was made for another model."""


class DistributedError(MlxGemmaError):
    """A distributed setup that cannot work: a rank count that does not fit the model, ranks that disagree
    on the model, or a peer that died or went silent."""
