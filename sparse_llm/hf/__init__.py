"""Skip-softmax for Hugging Face transformers models: sparsify(), print_sparsity_stats(), verify_output()."""
from sparse_llm.hf.sparsify import dense_attention, desparsify, print_sparsity_stats, sparsify, sparsity_stats, verify_output

__all__ = ["sparsify", "desparsify", "dense_attention", "print_sparsity_stats", "sparsity_stats", "verify_output"]
