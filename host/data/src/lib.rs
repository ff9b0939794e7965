//! `lora-data`: datasets in, packed token-budgeted micro-batches out.
