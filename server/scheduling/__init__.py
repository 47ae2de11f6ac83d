"""Request-level work: the runtime, composition resolution and the batcher that groups jobs into forward passes."""
