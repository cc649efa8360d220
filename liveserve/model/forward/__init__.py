"""The LM forward the engine runs: the direct layer loop over Llama-style stacks (Llama, Qwen2, Qwen2-VL and
Qwen2.5-VL text), its CUDA graphs, and rotary embeddings."""
