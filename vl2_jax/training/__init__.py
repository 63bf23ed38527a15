"""Fine-tuning: supervised conversations -> labelled batches (`data`), their loss and its gradient
(`loss`), an optax step over a chosen subset of the parameters (`train`)."""

PARTS = ("language", "projector", "vision")  # what can learn (`--train`); here, where reading it imports no JAX
