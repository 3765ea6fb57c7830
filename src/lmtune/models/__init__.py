"""Model sources (alias, hub id, folder, GGUF) and classifier set-up."""

from lmtune.models.aliases import ALIASES, Alias
from lmtune.models.classifier import LoadedModel, check_max_length, load_classifier, load_tokenizer, set_pad_token, to_plain_transformers
from lmtune.models.source import ResolvedModel, cache_root, resolve

__all__ = [
    "ALIASES", "Alias", "LoadedModel", "check_max_length", "ResolvedModel", "cache_root", "load_classifier", "load_tokenizer",
    "resolve", "set_pad_token", "to_plain_transformers",
]
