"""Glass Box LLM core: the model, its data and its training, with no user interface inside."""
