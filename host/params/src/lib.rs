//! `lora-params`: every parameter of the "lora" component as one typed struct.
