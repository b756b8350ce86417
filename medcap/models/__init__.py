"""Models: vision encoders, projectors, LLM decoders and the vision-language model built from them."""
