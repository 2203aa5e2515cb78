"""Interoperability: loading trained models, Hugging Face transformers export / import (and upcycling)."""
