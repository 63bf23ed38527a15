"""What can learn in fine-tuning (`--train`): here, apart, so that reading it imports no JAX."""

PARTS = ("language", "projector", "vision")
