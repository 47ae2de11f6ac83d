"""The model side: the engine, the inference worker process and which adapters are resident in the model."""
