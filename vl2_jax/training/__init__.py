"""Fine-tuning: supervised conversations -> labelled batches (`data`), their loss and its gradient
(`loss`), an optax step over a chosen subset of the parameters (`train`)."""
