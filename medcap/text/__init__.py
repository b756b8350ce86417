"""The text side: tokenizers with chat templates, and training samples with masked labels."""

from medcap.text.samples import IGNORE_INDEX, build_sample
from medcap.text.tokenizers import (
    Llama2ChatTokenizer,
    Llama3ChatTokenizer,
    SmolLM2Tokenizer,
    llama2_tokenizer,
    llama3_tokenizer,
    smollm2_tokenizer,
)

__all__ = ["IGNORE_INDEX", "Llama2ChatTokenizer", "Llama3ChatTokenizer", "SmolLM2Tokenizer", "build_sample",
           "llama2_tokenizer", "llama3_tokenizer", "smollm2_tokenizer"]
