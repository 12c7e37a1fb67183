"""The student/teacher model (Mistral / Mixtral), HF safetensors I/O, upcycling. Knows nothing of processes."""
from model.model import KVCache, ModelArgs, MoEArgs, Transformer, capture_qk
from model.hf import load_hf, save_hf
from model.upcycle import upcycle

__all__ = ["ModelArgs", "MoEArgs", "Transformer", "KVCache", "capture_qk", "load_hf", "save_hf", "upcycle"]
