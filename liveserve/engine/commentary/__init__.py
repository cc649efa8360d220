"""The commentary family's session (Qwen2-VL, Qwen2.5-VL as StreamingVLM runs them): a turn per chunk of
video, its chunk inputs, its windowed cache and its decoding."""
