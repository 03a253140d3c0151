"""Hugging Face ``transformers`` integration: reversible patches, attention registration, generation."""
