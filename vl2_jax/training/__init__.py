"""Fine-tuning: supervised conversations -> labelled batches (`data`), their loss and its gradient
(`loss`)."""
