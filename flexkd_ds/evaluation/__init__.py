"""Measuring a model: batched generation and the metrics of the MiniLLM / Flex-KD protocol. No DeepSpeed."""
