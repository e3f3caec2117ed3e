"""Tokenizers (through their libraries) and prompt datasets for the text-to-image teachers."""
from sida_jax.text.clip_tokenizer import CLIPTokenizer, Tokens

__all__ = ['CLIPTokenizer', 'Tokens']
