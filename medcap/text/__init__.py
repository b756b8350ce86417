"""The text side: tokenizers with chat templates, and training samples with masked labels."""

from medcap.text.llama import Llama2ChatTokenizer, Llama3ChatTokenizer, llama2_tokenizer, llama3_tokenizer
from medcap.text.samples import IGNORE_INDEX, build_conversation_sample, build_sample
from medcap.text.smollm2 import SmolLM2Tokenizer, smollm2_tokenizer
from medcap.text.tokenizers import IMAGE_PLACEHOLDER, ChatTokenizer
from medcap.text.vicuna import VicunaTokenizer, llava_hf_tokenizer

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "ChatTokenizer", "Llama2ChatTokenizer", "Llama3ChatTokenizer",
           "SmolLM2Tokenizer", "VicunaTokenizer", "build_conversation_sample", "build_sample", "llama2_tokenizer",
           "llama3_tokenizer", "llava_hf_tokenizer", "smollm2_tokenizer"]
